"""The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary), sans-IO.

A TCP proxy in front of derpbox (Traefik ``proxyProtocol.version: 2``, HAProxy
``send-proxy-v2``, Nginx stream ``proxy_protocol on`` which sends v1 only) writes
one header before the client's first byte, naming the real client. This module
only parses bytes; who may send a header is decided by derpbox.web.proxied.

``parse_proxy_header(buf, allow)`` returns

* ``None`` while ``buf`` is a proper prefix of an acceptable header (need more bytes);
* a ``ProxyHeader`` once complete; ``length`` bytes are the header, the rest is the
  client's stream. ``source`` is ``None`` when the real connection address must be
  used (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC/UNIX/UDP families);
* ``NO_HEADER`` (``version == 0``, ``length == 0``) in ``auto`` mode when the bytes
  cannot start a header: they belong to the client unchanged;

and raises ``ProxyHeaderError`` (a ValueError) for anything malformed or not
allowed by ``allow`` ("v1", "v2" or "auto"; in v1/v2 the header is mandatory).
It raises nothing else, whatever the input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "NO_HEADER",
    "ProxyHeader",
    "ProxyHeaderError",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "looks_like_proxy_header",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's worst case: "PROXY TCP6 " + 2 x 39 + 2 x 5 + 3 spaces + CRLF.
MAX_V1_LENGTH = 107
# 16 fixed bytes + addresses + TLVs. The format allows 64 KiB; real proxies send
# a few dozen bytes (Traefik, HAProxy: 28 for TCP4 without TLVs).
MAX_V2_LENGTH = 4096

_V2_FIXED = 16
# Address block size per v2 address family (high nibble of byte 14).
_V2_ADDR_SIZE = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
_MODES = ("v1", "v2", "auto")


class ProxyHeaderError(ValueError):
    """A malformed PROXY header, or one the configured mode does not accept."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1, 2, or 0 for "no header" (auto mode)
    command: str  # "PROXY", "LOCAL", or "NONE" (no header)
    source: tuple[str, int] | None  # the real client; None: use the connection's own address
    dest: tuple[str, int] | None
    length: int  # bytes consumed from the buffer

    @property
    def present(self) -> bool:
        return self.version != 0


NO_HEADER = ProxyHeader(0, "NONE", None, None, 0)


def _prefix_of(buf: bytes, sig: bytes) -> bool:
    """True when buf starts with sig, or is a (possibly empty) prefix of it."""
    n = min(len(buf), len(sig))
    return buf[:n] == sig[:n]


def looks_like_proxy_header(buf: bytes) -> bool | None:
    """True: buf starts a v1 or v2 signature; False: it cannot; None: too short to say."""
    v1, v2 = _prefix_of(buf, V1_PREFIX), _prefix_of(buf, V2_SIGNATURE)
    if (v1 and len(buf) >= len(V1_PREFIX)) or (v2 and len(buf) >= len(V2_SIGNATURE)):
        return True
    if v1 or v2:
        return None
    return False


def parse_proxy_header(buf: bytes, allow: str) -> ProxyHeader | None:
    if allow not in _MODES:
        raise ProxyHeaderError(f"PROXY protocol mode {allow!r} is not one of v1, v2, auto")
    buf = bytes(buf)
    v1, v2 = _prefix_of(buf, V1_PREFIX), _prefix_of(buf, V2_SIGNATURE)
    if allow == "v1":
        if v1:
            return _parse_v1(buf)
        if v2:
            if len(buf) < len(V2_SIGNATURE):
                return None
            raise ProxyHeaderError("PROXY v2 header, but only v1 is accepted (-proxy-protocol v1)")
        raise ProxyHeaderError("no PROXY v1 header: the connection must start with 'PROXY '")
    if allow == "v2":
        if v2:
            return _parse_v2(buf)
        if v1:
            if len(buf) < len(V1_PREFIX):
                return None
            raise ProxyHeaderError("PROXY v1 header, but only v2 is accepted (-proxy-protocol v2)")
        raise ProxyHeaderError("no PROXY v2 header: the connection must start with the 12-byte v2 signature")
    # auto: either version, or none at all
    if v1:  # the two signatures differ in their first byte, so at most one matches
        return _parse_v1(buf)
    if v2:
        return _parse_v2(buf)
    return NO_HEADER


# -- v1 -------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    if len(buf) < len(V1_PREFIX):
        return None
    window = buf[:MAX_V1_LENGTH]
    end = window.find(b"\r\n")
    lf = window.find(b"\n")
    if lf != -1 and (end == -1 or lf < end + 1):
        raise ProxyHeaderError("PROXY v1 header has a line feed without a carriage return")
    cr = window.find(b"\r")
    if cr != -1 and cr != end and cr + 1 < len(window):
        raise ProxyHeaderError("PROXY v1 header has a carriage return without a line feed")
    if end == -1:
        if len(buf) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 header has no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    length = end + 2
    line = buf[len(V1_PREFIX) : end]
    parts = line.split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "PROXY", None, None, length)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 header has unknown protocol {_show(proto)} (expected TCP4, TCP6 or UNKNOWN)")
    if len(parts) != 5:
        raise ProxyHeaderError(
            f"PROXY v1 {proto.decode()} header needs exactly 4 single-space-separated fields after the protocol, "
            f"got {len(parts) - 1}"
        )
    version = 4 if proto == b"TCP4" else 6
    src = _v1_ip(parts[1], version, "source")
    dst = _v1_ip(parts[2], version, "destination")
    sport = _v1_port(parts[3], "source")
    dport = _v1_port(parts[4], "destination")
    return ProxyHeader(1, "PROXY", (src, sport), (dst, dport), length)


def _show(b: bytes) -> str:
    return repr(b[:40].decode("ascii", "backslashreplace"))


def _v1_ip(field: bytes, version: int, what: str) -> str:
    try:
        text = field.decode("ascii")
        if "%" in text:
            raise ValueError("scoped address")
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"PROXY v1 header has an invalid IPv{version} {what} address {_show(field)}") from None
    return str(ip)


def _v1_port(field: bytes, what: str) -> int:
    if not _PORT.match(field) or int(field) > 65535:
        raise ProxyHeaderError(
            f"PROXY v1 header has an invalid {what} port {_show(field)} (0-65535, no leading zeros)"
        )
    return int(field)


# -- v2 -------------------------------------------------------------------


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < 13:
        return None
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header has version {ver_cmd >> 4}, expected 2")
    command = ver_cmd & 0x0F
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"PROXY v2 header has unknown command {command:#x} (expected LOCAL or PROXY)")
    if len(buf) < 14:
        return None
    fam = buf[13]
    family, transport = fam >> 4, fam & 0x0F
    if command == 0x1:
        # LOCAL ignores the family altogether (spec: "discard the protocol block").
        if family not in _V2_ADDR_SIZE:
            raise ProxyHeaderError(f"PROXY v2 header has unknown address family {family:#x}")
        if transport > 0x2:
            raise ProxyHeaderError(f"PROXY v2 header has unknown transport protocol {transport:#x}")
    if len(buf) < _V2_FIXED:
        return None
    body = int.from_bytes(buf[14:16], "big")
    total = _V2_FIXED + body
    if total > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 header is {total} bytes, more than the {MAX_V2_LENGTH} accepted")
    if len(buf) < total:
        return None
    if command == 0x0:
        return ProxyHeader(2, "LOCAL", None, None, total)
    addr_size = _V2_ADDR_SIZE[family]
    if body < addr_size:
        raise ProxyHeaderError(
            f"PROXY v2 header length {body} is too short for its address family (needs {addr_size})"
        )
    _check_tlvs(buf[_V2_FIXED + addr_size : total])
    block = buf[_V2_FIXED : _V2_FIXED + addr_size]
    if fam == 0x11:  # TCP over IPv4
        src = str(ipaddress.IPv4Address(block[0:4]))
        dst = str(ipaddress.IPv4Address(block[4:8]))
        ports = block[8:12]
    elif fam == 0x21:  # TCP over IPv6
        src = str(ipaddress.IPv6Address(block[0:16]))
        dst = str(ipaddress.IPv6Address(block[16:32]))
        ports = block[32:36]
    else:
        # UNSPEC, UNIX, UDP: nothing usable as a TCP peer; keep the connection's address.
        return ProxyHeader(2, "PROXY", None, None, total)
    sport, dport = int.from_bytes(ports[0:2], "big"), int.from_bytes(ports[2:4], "big")
    return ProxyHeader(2, "PROXY", (src, sport), (dst, dport), total)


def _check_tlvs(data: bytes) -> None:
    """TLVs are skipped, but their framing must fill the header exactly."""
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyHeaderError(f"PROXY v2 header has a truncated TLV at offset {i} of its TLV block")
        size = int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + size > len(data):
            raise ProxyHeaderError(
                f"PROXY v2 TLV type {data[i]:#04x} claims {size} bytes, only {len(data) - i - 3} remain"
            )
        i += 3 + size


# -- for local probes ------------------------------------------------------

LOCAL_V2 = V2_SIGNATURE + b"\x20\x00\x00\x00"  # v2 LOCAL, no addresses: "use the real connection"
UNKNOWN_V1 = b"PROXY UNKNOWN\r\n"


def local_preamble(mode: str) -> bytes:
    """What a local prober (derpbox healthcheck) sends first when its address is a trusted proxy.

    In v1/v2 mode a header is mandatory; LOCAL / UNKNOWN keep the prober's own
    address. In auto (and off) mode nothing is needed.
    """
    return {"v1": UNKNOWN_V1, "v2": LOCAL_V2}.get(mode, b"")
