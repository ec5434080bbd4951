"""STUN codec unit tests and STUN server tests over real loopback UDP sockets."""

import errno
import ipaddress
import itertools
import os
import random
import socket
import struct
import time
import zlib

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from derpbox.protocol import stun
from derpbox.protocol.stun import (
    STUNError,
    build_binding_request,
    build_binding_response,
    parse_binding_request,
    parse_binding_response,
)
from derpbox.bind_errors import ListenError
from derpbox.stun_server import STUNProtocol, STUNService, STUNStats, listen_stun

TIMEOUT = 5
MAGIC = bytes.fromhex("2112a442")
TXID = bytes(range(12))

# RFC 5769 test vectors (sections 2.1-2.3); their FINGERPRINTs vouch for the bytes.
RFC_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010" + b"STUN test client".hex() + "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC_RESPONSE_IPV4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b" + b"test vector ".hex() + "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC_RESPONSE_IPV6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b" + b"test vector ".hex() + "00200014"
    "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
RFC_XOR_MAPPED_IPV4 = bytes.fromhex("002000080001a147e112a643")
RFC_XOR_MAPPED_IPV6 = bytes.fromhex("002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback on this machine")


def fingerprint(data: bytes) -> int:
    return zlib.crc32(data) ^ 0x5354554E


def attr(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + b"\0" * (-len(value) % 4)


def message(
    attrs: bytes,
    *,
    msg_type: int = 0x0001,
    cookie: bytes = MAGIC,
    txid: bytes = TXID,
    length: int | None = None,
    with_fingerprint: bool = True,
) -> bytes:
    """A STUN message; its header length is right unless `length` overrides it."""
    if length is None:
        length = len(attrs) + (8 if with_fingerprint else 0)
    data = struct.pack("!HH4s12s", msg_type, length, cookie, txid) + attrs
    if with_fingerprint:
        data += struct.pack("!HHI", 0x8028, 4, fingerprint(data))
    return data


TAILNODE = attr(0x8022, b"tailnode")
VALID = build_binding_request(TXID)


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _fingerprint_length_8() -> bytes:
    # Its last 4 bytes hold the right CRC, so only the length check rejects it.
    head = message(TAILNODE, with_fingerprint=False) + struct.pack("!HH", 0x8028, 8)
    return head + bytes(4) + struct.pack("!I", fingerprint(head))


# Datagrams derper ignores; each is one failing check of spec section 3.
GENERIC_REQUESTS = {
    "rfc5769 request": RFC_REQUEST,
    "software other": message(attr(0x8022, b"other")),
    "no software": message(b""),
    "software TAILNODE": message(attr(0x8022, b"TAILNODE")),
    "software tailnode padded longer": message(attr(0x8022, b"tailnode\0")),
    "no fingerprint": message(TAILNODE, with_fingerprint=False),
}
MALFORMED = {
    "top bits set": message(TAILNODE, msg_type=0x4001),
    "wrong cookie": message(TAILNODE, cookie=b"\x21\x12\xa4\x43"),
    "binding success type": message(TAILNODE, msg_type=0x0101),
    "binding indication type": message(TAILNODE, msg_type=0x0011),
    "bad fingerprint": _flip(VALID, 39),
    "fingerprint not last": VALID + attr(0x8022, b"tailnode"),
    "fingerprint length 8": _fingerprint_length_8(),
    "attribute length overrun": message(struct.pack("!HH", 0x8022, 0x00FF) + b"tailnode"),
    "missing padding": message(attr(0x8022, b"tailnode") + struct.pack("!HH", 0x0006, 1) + b"x"),
    "trailing bytes": VALID + b"\0\0",
    "header only": VALID[:20],
}


def _random_garbage() -> list[bytes]:
    rng = random.Random(5389)
    datagrams = [rng.randbytes(rng.randrange(0, 120)) for _ in range(30)]
    return datagrams + [rng.randbytes(9000)]


# --- codec -------------------------------------------------------------------


def test_rfc5769_vectors_carry_valid_fingerprints():
    for vector in (RFC_REQUEST, RFC_RESPONSE_IPV4, RFC_RESPONSE_IPV6):
        assert struct.unpack("!I", vector[-4:])[0] == fingerprint(vector[:-8])


def test_request_is_byte_exact_tailscale_form():
    head = bytes.fromhex("000100142112a442") + TXID + bytes.fromhex("80220008") + b"tailnode"
    assert VALID == head + bytes.fromhex("80280004") + struct.pack("!I", fingerprint(head))
    assert len(VALID) == stun.REQUEST_LEN == 40
    assert VALID[-4:] == bytes.fromhex("8aabad90")


@given(st.binary(min_size=12, max_size=12))
def test_request_round_trip(txid):
    assert parse_binding_request(build_binding_request(txid)) == txid


def test_request_accepts_memoryview():
    assert parse_binding_request(memoryview(VALID)) == TXID


def test_request_with_other_attributes_and_padding_is_accepted():
    # RFC 5769's request, with its SOFTWARE swapped for tailnode: the walk must
    # step over PRIORITY, ICE-CONTROLLED, a padded USERNAME and MESSAGE-INTEGRITY.
    attrs = RFC_REQUEST[20 + 20 : -8]
    data = message(TAILNODE + attrs, txid=RFC_TXID)
    assert parse_binding_request(data) == RFC_TXID


@pytest.mark.parametrize("length", [0, 8, 0xFFFF])
def test_request_header_length_field_is_ignored(length):
    assert parse_binding_request(message(TAILNODE, length=length)) == TXID


@pytest.mark.parametrize("name", sorted(GENERIC_REQUESTS | MALFORMED))
def test_request_rejected(name):
    assert parse_binding_request((GENERIC_REQUESTS | MALFORMED)[name]) is None


@pytest.mark.parametrize("length", range(len(VALID)))
def test_truncated_request_rejected(length):
    assert parse_binding_request(VALID[:length]) is None


def test_every_single_bit_flip_rejected():
    for index in range(len(VALID)):
        for bit in range(8):
            flipped = _flip(VALID, index, 1 << bit)
            assert parse_binding_request(flipped) is None, (index, bit)


def test_response_ipv4_is_byte_exact():
    expected = bytes.fromhex("0101000c2112a442") + RFC_TXID + RFC_XOR_MAPPED_IPV4
    assert build_binding_response(RFC_TXID, "192.0.2.1", 32853) == expected
    assert len(expected) == stun.RESPONSE_LEN_IPV4


def test_response_ipv6_is_byte_exact():
    expected = bytes.fromhex("010100182112a442") + RFC_TXID + RFC_XOR_MAPPED_IPV6
    ip = "2001:db8:1234:5678:11:2233:4455:6677"
    assert build_binding_response(RFC_TXID, ip, 32853) == expected
    assert len(expected) == stun.RESPONSE_LEN_IPV6


def test_response_to_ipv4_mapped_source_is_ipv4():
    mapped = build_binding_response(RFC_TXID, "::ffff:192.0.2.1", 32853)
    assert mapped == build_binding_response(RFC_TXID, "192.0.2.1", 32853)


@pytest.mark.parametrize(
    "txid, ip, port", [(TXID[:11], "192.0.2.1", 1), (TXID, "192.0.2.1", 65536), (TXID, "x", 1)]
)
def test_response_rejects_bad_arguments(txid, ip, port):
    with pytest.raises(ValueError):
        build_binding_response(txid, ip, port)


def test_request_rejects_bad_txid():
    with pytest.raises(ValueError):
        build_binding_request(TXID + b"\0")


@given(
    st.binary(min_size=12, max_size=12),
    st.ip_addresses().map(str),
    st.integers(0, 0xFFFF),
)
def test_response_round_trip(txid, ip, port):
    addr = ipaddress.ip_address(ip)
    expected = str(addr.ipv4_mapped or addr) if addr.version == 6 else ip
    assert parse_binding_response(build_binding_response(txid, ip, port)) == (txid, expected, port)


def test_parse_rfc5769_responses():
    assert parse_binding_response(RFC_RESPONSE_IPV4) == (RFC_TXID, "192.0.2.1", 32853)
    assert parse_binding_response(RFC_RESPONSE_IPV6) == (
        RFC_TXID,
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )


def _success(attrs: bytes, msg_type: int = 0x0101, **kwargs) -> bytes:
    return message(attrs, msg_type=msg_type, with_fingerprint=False, **kwargs)


MAPPED = attr(0x0001, bytes.fromhex("0001") + struct.pack("!H", 4000) + bytes([10, 0, 0, 1]))
XOR_ALT = struct.pack("!H", 0x8020) + RFC_XOR_MAPPED_IPV4[2:]


@pytest.mark.parametrize(
    "attrs, expected",
    [
        (XOR_ALT, ("192.0.2.1", 32853)),
        (MAPPED, ("10.0.0.1", 4000)),
        (MAPPED + RFC_XOR_MAPPED_IPV4, ("192.0.2.1", 32853)),
        (RFC_XOR_MAPPED_IPV4 + MAPPED, ("192.0.2.1", 32853)),
    ],
)
def test_parse_response_address_attributes(attrs, expected):
    assert parse_binding_response(_success(attrs, txid=RFC_TXID)) == (RFC_TXID, *expected)


def test_parse_response_unmaps_ipv4_mapped_xor_address():
    mapped = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    xored = bytes(a ^ b for a, b in zip(mapped, MAGIC + TXID))
    value = bytes.fromhex("0002") + struct.pack("!H", 1 ^ 0x2112) + xored
    assert parse_binding_response(_success(attr(0x0020, value))) == (TXID, "127.0.0.1", 1)


def test_parse_response_ignores_bytes_past_header_length():
    assert parse_binding_response(RFC_RESPONSE_IPV4 + b"junk!")[1:] == ("192.0.2.1", 32853)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x01\x01\x00\x00", "too short"),
        (_success(RFC_XOR_MAPPED_IPV4, msg_type=0x4101), "top two bits"),
        (_success(RFC_XOR_MAPPED_IPV4, cookie=b"\0\0\0\0"), "magic cookie"),
        (VALID, "not a Binding Success response: type 0x0001"),
        (_success(RFC_XOR_MAPPED_IPV4, length=13), "exceeds"),
        (_success(RFC_XOR_MAPPED_IPV4, length=10), "malformed attributes"),
        (_success(attr(0x0020, bytes.fromhex("0003a147e112a643"))), "unknown address family 0x03"),
        (_success(attr(0x0020, bytes.fromhex("0002a147e112a643"))), "too short for family 0x02"),
        (_success(attr(0x0001, b"\0\1")), "address attribute too short: 2 bytes"),
        (_success(TAILNODE), "no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"),
        (_success(b""), "no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"),
    ],
)
def test_parse_response_errors(data, error):
    with pytest.raises(STUNError, match=error):
        parse_binding_response(data)


def test_stun_error_is_value_error():
    assert issubclass(STUNError, ValueError)


FUZZ_MSG_TYPES = (0x0001, 0x0101, 0x0111, 0x4001)
FUZZ_ATTR_TYPES = (0x0001, 0x0020, 0x8020, 0x8022, 0x8028, 0x0006)


def stun_shaped(raw: bytes) -> bytes:
    """Turn fuzz bytes into a message with a real cookie and plausible attributes.

    Interpreting one binary draw is far cheaper than many small hypothesis
    draws, which would dominate the run time of 2000 examples.
    """
    ops = iter(raw)
    msg_type = FUZZ_MSG_TYPES[next(ops, 0) % 4]
    flags = next(ops, 0)
    body = b""
    for op in ops:
        attr_type, variant = FUZZ_ATTR_TYPES[op % 6], op // 6 % 6
        value = bytes(itertools.islice(ops, next(ops, 0) % 21))
        if attr_type == 0x8022 and variant == 0:
            value = b"tailnode"
        elif attr_type in (0x0001, 0x0020, 0x8020):
            value = bytes([0, variant]) + value
        length = next(ops, 0) * 257 if variant == 4 else len(value)
        padding = b"" if variant == 5 else b"\0" * (-len(value) % 4)
        body += struct.pack("!HH", attr_type, length) + value + padding
    with_fingerprint = bool(flags & 1)
    length = None
    if flags & 2:
        length = max(0, len(body) + 8 * with_fingerprint + (flags >> 2) % 16 - 8)
    return message(body, msg_type=msg_type, length=length, with_fingerprint=with_fingerprint)


FUZZ_INPUT = (
    st.binary(max_size=200)
    | st.binary(max_size=120).map(stun_shaped)
    | st.just(bytearray(VALID))
)


@settings(max_examples=2000, deadline=None)
@given(FUZZ_INPUT)
def test_fuzz_parse_binding_request(data):
    txid = parse_binding_request(data)
    assert txid is None or txid == bytes(data[8:20])


@settings(max_examples=2000, deadline=None)
@given(FUZZ_INPUT)
def test_fuzz_parse_binding_response(data):
    try:
        txid, ip, port = parse_binding_response(data)
    except STUNError:
        return
    assert txid == bytes(data[8:20])
    assert isinstance(ip, str) and 0 <= port <= 0xFFFF


# --- server over real sockets --------------------------------------------------


class Client(DatagramProtocol):
    def __init__(self) -> None:
        self.received = defer.DeferredQueue()

    def datagramReceived(self, data, addr):
        self.received.put((data, addr))


@pytest.fixture
def stats():
    return STUNStats()


@pytest.fixture
def ports():
    """Listening ports opened by a test; all are closed afterwards."""
    opened = []
    yield opened
    pytest_twisted.blockon(
        defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in opened])
    )


def serve(ports, stats, host):
    listening = listen_stun(reactor, host, 0, stats)
    ports.extend(listening)
    return listening


def open_client(ports, host) -> Client:
    client = Client()
    ports.append(reactor.listenUDP(0, client, interface=host))
    return client


@defer.inlineCallbacks
def ask(client, server, txid):
    client.transport.write(build_binding_request(txid), server)
    data, addr = yield client.received.get().addTimeout(TIMEOUT, reactor)
    assert addr == server
    return data


@defer.inlineCallbacks
def assert_each_ignored(client, server, datagrams):
    """Follow every datagram with a valid request: the first reply must be to that.

    The server handles datagrams in order and loopback keeps their order, so a
    reply to the datagram would arrive before the reply to the request.
    """
    for data in datagrams:
        client.transport.write(data, server)
        txid = os.urandom(12)
        reply = yield ask(client, server, txid)
        assert parse_binding_response(reply)[0] == txid, data.hex()


def assert_counts(stats, success=0, not_stun=0, write_error=0, ipv4=0, ipv6=0):
    assert stats.requests == dict(
        success=success, not_stun=not_stun, read_error=0, write_error=write_error
    )
    assert stats.addrfamily == dict(ipv4=ipv4, ipv6=ipv6)


@pytest_twisted.inlineCallbacks
def test_ipv4_request_answered(ports, stats):
    [server] = serve(ports, stats, "127.0.0.1")
    client = open_client(ports, "127.0.0.1")
    reply = yield ask(client, ("127.0.0.1", server.getHost().port), TXID)
    assert len(reply) == 32
    assert parse_binding_response(reply) == (TXID, "127.0.0.1", client.transport.getHost().port)
    assert reply[24:26] == b"\x00\x01"
    assert_counts(stats, success=1, ipv4=1)


@needs_ipv6
@pytest_twisted.inlineCallbacks
def test_ipv6_request_answered(ports, stats):
    [server] = serve(ports, stats, "::1")
    client = open_client(ports, "::1")
    reply = yield ask(client, ("::1", server.getHost().port), TXID)
    assert len(reply) == 44
    assert parse_binding_response(reply) == (TXID, "::1", client.transport.getHost().port)
    assert reply[24:26] == b"\x00\x02"
    assert_counts(stats, success=1, ipv6=1)


@pytest_twisted.inlineCallbacks
def test_generic_stun_requests_get_no_answer(ports, stats):
    [server] = serve(ports, stats, "127.0.0.1")
    client = open_client(ports, "127.0.0.1")
    datagrams = list(GENERIC_REQUESTS.values())
    yield assert_each_ignored(client, ("127.0.0.1", server.getHost().port), datagrams)
    assert_counts(stats, success=len(datagrams), not_stun=len(datagrams), ipv4=len(datagrams))


@pytest_twisted.inlineCallbacks
def test_truncated_requests_get_no_answer(ports, stats):
    [server] = serve(ports, stats, "127.0.0.1")
    client = open_client(ports, "127.0.0.1")
    prefixes = [VALID[:n] for n in range(len(VALID))]
    yield assert_each_ignored(client, ("127.0.0.1", server.getHost().port), prefixes)
    assert_counts(stats, success=40, not_stun=40, ipv4=40)


@pytest_twisted.inlineCallbacks
def test_garbage_gets_no_answer_and_server_survives(ports, stats):
    [server] = serve(ports, stats, "127.0.0.1")
    address = ("127.0.0.1", server.getHost().port)
    client = open_client(ports, "127.0.0.1")
    garbage = list(MALFORMED.values()) + _random_garbage()
    yield assert_each_ignored(client, address, garbage)

    other = open_client(ports, "127.0.0.1")
    reply = yield ask(other, address, TXID)
    assert parse_binding_response(reply) == (TXID, "127.0.0.1", other.transport.getHost().port)
    n = len(garbage)
    assert_counts(stats, success=n + 1, not_stun=n, ipv4=n + 1)
    assert not client.received.pending and not other.received.pending


@needs_ipv6
@pytest_twisted.inlineCallbacks
def test_wildcard_listens_on_both_families_on_one_port(ports, stats):
    listening = serve(ports, stats, "")
    assert len(listening) == 2
    port = listening[0].getHost().port
    assert listening[1].getHost().port == port
    assert [p.getHost().host for p in listening] == ["0.0.0.0", "::"]

    reply4 = yield ask(open_client(ports, "127.0.0.1"), ("127.0.0.1", port), TXID)
    reply6 = yield ask(open_client(ports, "::1"), ("::1", port), TXID)
    assert (len(reply4), len(reply6)) == (32, 44)
    assert_counts(stats, success=2, ipv4=1, ipv6=1)


@needs_ipv6
@pytest_twisted.inlineCallbacks
def test_wildcard_fails_when_the_ipv6_port_is_taken(ports, stats):
    """Every STUN listener starts or none does: an IPv6 port in use is no reason to carry on
    over IPv4 alone (only a host without IPv6 is)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as blocker:
        blocker.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        blocker.bind(("::", 0))
        taken = blocker.getsockname()[1]
        with pytest.raises(ListenError, match=rf"^STUN \(IPv6\) on UDP \[::\]:{taken}: port in use by pid {os.getpid()} "):
            listen_stun(reactor, "", taken, stats)
    # The IPv4 socket it had opened is closed again (at the next reactor pass): the port is free.
    deadline = time.monotonic() + 5
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            try:
                again.bind(("127.0.0.1", taken))
                break
            except OSError:
                assert time.monotonic() < deadline, "the IPv4 STUN socket stayed open"
        yield deferLater(reactor, 0.01, lambda: None)


def _dual_stack_default() -> bool:
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


@needs_ipv6
@pytest.mark.skipif(not _dual_stack_default(), reason="[::] sockets are not dual-stack here")
@pytest_twisted.inlineCallbacks
def test_dual_stack_socket_answers_ipv4_client_as_ipv4(ports, stats):
    [server] = serve(ports, stats, "::")
    client = open_client(ports, "127.0.0.1")
    client.transport.write(VALID, ("127.0.0.1", server.getHost().port))
    reply, _ = yield client.received.get().addTimeout(TIMEOUT, reactor)
    assert len(reply) == 32
    assert parse_binding_response(reply) == (TXID, "127.0.0.1", client.transport.getHost().port)
    assert_counts(stats, success=1, ipv4=1)


class RecordingTransport:
    def __init__(self, error: OSError | None = None) -> None:
        self.error = error
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data, addr):
        if self.error:
            raise self.error
        self.written.append((data, addr))


def test_write_error_is_counted_not_raised(stats):
    proto = STUNProtocol(stats)
    proto.transport = RecordingTransport(OSError(errno.ENOBUFS, "No buffer space available"))
    proto.datagramReceived(VALID, ("192.0.2.1", 4242))
    assert_counts(stats, write_error=1, ipv4=1)


def test_ipv4_mapped_source_counted_and_answered_as_ipv4(stats):
    proto = STUNProtocol(stats)
    proto.transport = RecordingTransport()
    proto.datagramReceived(VALID, ("::ffff:192.0.2.1", 4242))
    [(reply, addr)] = proto.transport.written
    assert addr == ("::ffff:192.0.2.1", 4242)
    assert reply == build_binding_response(TXID, "192.0.2.1", 4242)
    assert_counts(stats, success=1, ipv4=1)


@pytest_twisted.inlineCallbacks
def test_service_starts_and_stops(ports, stats):
    svc = STUNService("127.0.0.1", 0, stats, reactor=reactor)
    svc.startService()
    try:
        [listener] = svc.ports
        number = listener.getHost().port
        reply = yield ask(open_client(ports, "127.0.0.1"), ("127.0.0.1", number), TXID)
        assert parse_binding_response(reply)[0] == TXID
    finally:
        yield svc.stopService()
    assert svc.ports == [] and not svc.running
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", number))
    assert_counts(stats, success=1, ipv4=1)
