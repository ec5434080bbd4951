"""Sans-IO STUN codec for the subset of RFC 5389 that Tailscale speaks.

The server side answers only Tailscale-shaped Binding Requests (SOFTWARE
"tailnode" plus FINGERPRINT), exactly as derper does; the client side builds
that request and parses Binding Success responses tolerantly, as Tailscale's
netcheck does.
"""

import ipaddress
import struct
import zlib

# RFC 5389's port: derper's default, and what a DERP map node with STUNPort 0 means.
DEFAULT_STUN_PORT = 3478

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
HEADER_LEN = 20
TXID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Out of spec, but some servers send it (a slip into the comprehension-optional range).
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

SOFTWARE = b"tailnode"
FINGERPRINT_XOR = 0x5354554E

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

REQUEST_LEN = 40
RESPONSE_LEN_IPV4 = 32
RESPONSE_LEN_IPV6 = 44

_HEADER = struct.Struct("!HH4s12s")
_ATTR = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_ADDR_HEADER = struct.Struct("!xBH")
_XOR_PORT = 0x2112
_ADDR_LEN = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}


class STUNError(ValueError):
    """A datagram is not a well-formed STUN Binding Success response."""


def _fingerprint(data) -> int:
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _walk_attrs(data, end: int) -> list[tuple[int, int, int]] | None:
    """Return (type, value offset, value length) for each attribute in data[20:end].

    None means the walk does not land exactly on `end` (a length overruns, or
    fewer than 4 bytes are left over).
    """
    attrs = []
    pos = HEADER_LEN
    while pos < end:
        if end - pos < 4:
            return None
        attr_type, length = _ATTR.unpack_from(data, pos)
        value = pos + 4
        pos = value + ((length + 3) & ~3)
        if pos > end:
            return None
        attrs.append((attr_type, value, length))
    return attrs


def parse_binding_request(data: bytes) -> bytes | None:
    """Return the transaction id of a Tailscale Binding Request, else None.

    Never raises for bytes-like input: anything on the wire may arrive here.
    """
    # Type 0x0001 also means the top two bits (zero for any STUN message) are clear.
    if len(data) < HEADER_LEN or data[4:8] != MAGIC_COOKIE:
        return None
    if _HEADER.unpack_from(data)[0] != BINDING_REQUEST:
        return None
    # derper ignores the header's length field and walks to the datagram's end.
    end = len(data)
    attrs = _walk_attrs(data, end)
    if not attrs:
        return None
    last_type, _, last_len = attrs[-1]
    if last_type != ATTR_FINGERPRINT or last_len != 4:
        return None
    if not any(
        t == ATTR_SOFTWARE and data[v : v + n] == SOFTWARE for t, v, n in attrs
    ):
        return None
    if _U32.unpack_from(data, end - 4)[0] != _fingerprint(memoryview(data)[: end - 8]):
        return None
    return bytes(data[8:HEADER_LEN])


def _unmap(addr: ipaddress.IPv4Address | ipaddress.IPv6Address):
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; treat them as IPv4.
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _check_txid(txid: bytes) -> None:
    if len(txid) != TXID_LEN:
        raise ValueError(f"transaction id must be {TXID_LEN} bytes, got {len(txid)}")


def _xor(value: bytes, key: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(value, key))


def build_binding_response(txid: bytes, ip: str, port: int) -> bytes:
    """Binding Success carrying exactly one XOR-MAPPED-ADDRESS for ip:port."""
    _check_txid(txid)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    packed = _unmap(ipaddress.ip_address(ip)).packed
    family = FAMILY_IPV4 if len(packed) == 4 else FAMILY_IPV6
    value_len = 4 + len(packed)
    return b"".join(
        (
            _HEADER.pack(BINDING_SUCCESS, 4 + value_len, MAGIC_COOKIE, txid),
            _ATTR.pack(ATTR_XOR_MAPPED_ADDRESS, value_len),
            _ADDR_HEADER.pack(family, port ^ _XOR_PORT),
            _xor(packed, MAGIC_COOKIE + txid),
        )
    )


def build_binding_request(txid: bytes) -> bytes:
    """The 40-byte Binding Request a Tailscale client sends."""
    _check_txid(txid)
    body = b"".join(
        (
            _HEADER.pack(BINDING_REQUEST, REQUEST_LEN - HEADER_LEN, MAGIC_COOKIE, txid),
            _ATTR.pack(ATTR_SOFTWARE, len(SOFTWARE)),
            SOFTWARE,
        )
    )
    return body + _ATTR.pack(ATTR_FINGERPRINT, 4) + _U32.pack(_fingerprint(body))


def _decode_address(data, value: int, length: int, key: bytes | None) -> tuple[str, int]:
    if length < 4:
        raise STUNError(f"address attribute too short: {length} bytes")
    family, port = _ADDR_HEADER.unpack_from(data, value)
    addr_len = _ADDR_LEN.get(family)
    if addr_len is None:
        raise STUNError(f"unknown address family 0x{family:02x}")
    if length < 4 + addr_len:
        raise STUNError(
            f"address attribute too short for family 0x{family:02x}: {length} bytes"
        )
    packed = bytes(data[value + 4 : value + 4 + addr_len])
    if key is not None:
        packed = _xor(packed, key)
        port ^= _XOR_PORT
    return str(_unmap(ipaddress.ip_address(packed))), port


def parse_binding_response(data: bytes) -> tuple[bytes, str, int]:
    """Return (txid, ip, port) from a Binding Success response.

    Prefers XOR-MAPPED-ADDRESS (0x0020 or 0x8020), falls back to
    MAPPED-ADDRESS; bytes past the header's length field are ignored.
    """
    if len(data) < HEADER_LEN:
        raise STUNError(f"datagram too short for a STUN header: {len(data)} bytes")
    if data[0] & 0xC0:
        raise STUNError("not STUN: top two bits of the message type are set")
    msg_type, length, cookie, txid = _HEADER.unpack_from(data)
    if cookie != MAGIC_COOKIE:
        raise STUNError("not STUN: wrong magic cookie")
    if msg_type != BINDING_SUCCESS:
        raise STUNError(f"not a Binding Success response: type 0x{msg_type:04x}")
    if HEADER_LEN + length > len(data):
        raise STUNError(
            f"header length {length} exceeds the {len(data) - HEADER_LEN} bytes present"
        )
    attrs = _walk_attrs(data, HEADER_LEN + length)
    if attrs is None:
        raise STUNError("malformed attributes: a length overruns the message")
    mapped = xor_mapped = None
    for attr_type, value, attr_len in attrs:
        if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            xor_mapped = _decode_address(data, value, attr_len, MAGIC_COOKIE + txid)
        elif attr_type == ATTR_MAPPED_ADDRESS:
            mapped = _decode_address(data, value, attr_len, None)
    address = xor_mapped or mapped
    if address is None:
        raise STUNError("no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS attribute")
    return (txid, *address)
