"""PROXY protocol v1/v2: the sans-IO parser, the listener wrapper, and derpbox end to end.

The headers built here are the ones testing-infra.md saw on the wire: Traefik and
HAProxy send a 28-byte v2 TCP4 header without TLVs, Nginx stream sends v1 text.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import struct

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.config import ConfigError
from derpbox.netaddr import remote_address
from derpbox.protocol import frames as F
from derpbox.protocol.frames import FrameType
from derpbox.protocol.proxy import (
    LOCAL_V2,
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    NO_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    local_preamble,
    looks_like_proxy_header,
    parse_proxy_header,
)
from derpbox.web.proxied import ProxyProtocolFactory, came_via_proxy

from .support import wait_for

# -- building headers ---------------------------------------------------------


def v2(src=("203.0.113.7", 4242), dst=("127.0.0.1", 18443), *, cmd=0x21, fam=None, tlvs=b"", body=None) -> bytes:
    """A PROXY v2 header (default: what Traefik and HAProxy send for a TCP4 client)."""
    if body is None:
        if src is None:
            body = b""
            fam = 0x00 if fam is None else fam
        else:
            s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
            body = s.packed + d.packed + struct.pack(">HH", src[1], dst[1])
            if fam is None:
                fam = 0x11 if s.version == 4 else 0x21
        body += tlvs
    return V2_SIGNATURE + bytes([cmd, fam]) + struct.pack(">H", len(body)) + body


def v1(src=("198.51.100.9", 5151), dst=("127.0.0.1", 38443)) -> bytes:
    """A PROXY v1 line as Nginx stream ``proxy_protocol on`` writes it."""
    proto = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


# -- parser: good headers -----------------------------------------------------


def test_v2_tcp4_as_traefik_and_haproxy_send_it():
    header = v2()
    assert len(header) == 28
    rest = b"\x16\x03\x01\x02\x00client hello"
    got = parse_proxy_header(header + rest, "v2")
    assert got == ProxyHeader(2, "PROXY", ("203.0.113.7", 4242), ("127.0.0.1", 18443), 28)
    assert parse_proxy_header(header + rest, "auto") == got
    assert (header + rest)[got.length :] == rest


def test_v2_tcp6():
    got = parse_proxy_header(v2(("2001:db8::7", 65535), ("::1", 443)), "v2")
    assert got == ProxyHeader(2, "PROXY", ("2001:db8::7", 65535), ("::1", 443), 16 + 36)


def test_v2_local_keeps_the_real_address_and_ignores_the_block():
    got = parse_proxy_header(LOCAL_V2 + b"GET /", "v2")
    assert got == ProxyHeader(2, "LOCAL", None, None, 16)
    # LOCAL with an address block (and a family LOCAL ignores): still no source.
    got = parse_proxy_header(v2(cmd=0x20, fam=0xFF, body=b"x" * 40), "auto")
    assert got == ProxyHeader(2, "LOCAL", None, None, 56)


@pytest.mark.parametrize(
    "fam, size",
    [(0x00, 0), (0x31, 216), (0x32, 216), (0x12, 12), (0x22, 36)],
    ids=["unspec", "unix-stream", "unix-dgram", "udp4", "udp6"],
)
def test_v2_families_without_a_tcp_peer_keep_the_real_address(fam, size):
    header = v2(fam=fam, body=b"\x01" * size + tlv(0x04, b""))
    assert parse_proxy_header(header, "v2") == ProxyHeader(2, "PROXY", None, None, 16 + size + 3)


def test_v2_tlvs_are_skipped_and_counted():
    tlvs = tlv(0x01, b"h2") + tlv(0x02, b"derp.example.com") + tlv(0x04, b"\0" * 5) + tlv(0x20, b"\x07" + tlv(0x21, b"TLSv1.3"))
    header = v2(tlvs=tlvs)
    got = parse_proxy_header(header + b"\x16\x03", "v2")
    assert got.source == ("203.0.113.7", 4242) and got.length == 28 + len(tlvs)


def test_v1_tcp4_as_nginx_sends_it():
    header = b"PROXY TCP4 127.0.0.1 127.0.0.1 60888 38443\r\n"
    got = parse_proxy_header(header + b"\x16\x03\x01", "v1")
    assert got == ProxyHeader(1, "PROXY", ("127.0.0.1", 60888), ("127.0.0.1", 38443), len(header))
    assert parse_proxy_header(header, "auto") == got


def test_v1_tcp6_and_port_bounds():
    header = b"PROXY TCP6 2001:db8::7 ::1 0 65535\r\n"
    assert parse_proxy_header(header, "v1") == ProxyHeader(1, "PROXY", ("2001:db8::7", 0), ("::1", 65535), len(header))


def test_v1_longest_header_fits():
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()
    assert parse_proxy_header(header, "v1").source == (a.replace("ffff", "ffff"), 65535)
    # The spec's worst case is the UNKNOWN form with addresses: exactly 107 bytes.
    header = f"PROXY UNKNOWN {a} {a} 65535 65535\r\n".encode()
    assert len(header) == MAX_V1_LENGTH
    assert parse_proxy_header(header + b"more", "v1").length == MAX_V1_LENGTH
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107"):
        parse_proxy_header(header[:-2] + b"0\r\n", "v1")


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", b"PROXY UNKNOWN anything at all\r\n"])
def test_v1_unknown_keeps_the_real_address(line):
    assert parse_proxy_header(line + b"GET / HTTP/1.1\r\n", "v1") == ProxyHeader(1, "PROXY", None, None, len(line))


GOOD = [
    ("v2", v2()),
    ("v2", v2(("2001:db8::7", 1), ("::1", 2))),
    ("v2", LOCAL_V2),
    ("v2", v2(tlvs=tlv(0x01, b"http/1.1") + tlv(0x04, b""))),
    ("v2", v2(fam=0x31, body=b"\0" * 216)),
    ("v1", v1()),
    ("v1", v1(("2001:db8::7", 65535), ("::1", 443))),
    ("v1", b"PROXY UNKNOWN\r\n"),
]


@pytest.mark.parametrize("mode, header", GOOD, ids=[f"{m}-{i}" for i, (m, _) in enumerate(GOOD)])
def test_every_truncation_needs_more_bytes(mode, header):
    for allow in (mode, "auto"):
        for cut in range(len(header)):
            assert parse_proxy_header(header[:cut], allow) is None, (allow, cut)
        assert parse_proxy_header(header, allow).length == len(header)


def test_local_preamble_is_accepted_by_its_mode():
    assert parse_proxy_header(local_preamble("v2"), "v2").command == "LOCAL"
    assert parse_proxy_header(local_preamble("v1"), "v1").source is None
    assert local_preamble("auto") == local_preamble("off") == b""


# -- parser: auto mode and detection ------------------------------------------


@pytest.mark.parametrize(
    "first", [b"\x16\x03\x01\x02\x00\x01", b"GET /derp HTTP/1.1\r\n", b"POST", b"PROXZ", b"\r\n\r\n\x01", b"PROXy "]
)
def test_auto_passes_other_bytes_through(first):
    assert parse_proxy_header(first, "auto") is NO_HEADER
    assert NO_HEADER.length == 0 and not NO_HEADER.present
    assert looks_like_proxy_header(first) is False


def test_detection_waits_for_a_decision():
    assert looks_like_proxy_header(b"") is None
    assert looks_like_proxy_header(b"PROXY") is None
    assert looks_like_proxy_header(b"PROXY ") is True
    assert looks_like_proxy_header(V2_SIGNATURE[:11]) is None
    assert looks_like_proxy_header(V2_SIGNATURE) is True


# -- parser: malformed --------------------------------------------------------

MALFORMED = [
    ("v1", b"\x16\x03\x01\x00", "no PROXY v1 header"),
    ("v1", b"GET / HTTP/1.1\r\n", "no PROXY v1 header"),
    ("v2", b"\x16\x03\x01\x00", "no PROXY v2 header"),
    ("v2", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1 header, but only v2"),
    ("v1", v2(), "PROXY v2 header, but only v1"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "line feed without a carriage return"),
    ("v1", b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "carriage return without a line feed"),
    ("auto", b"PROXY TCP4 1.2.3.4 " + b"1" * 100, "no CRLF within 107 bytes"),
    ("v1", b"PROXY TCP6 " + b"f" * 100 + b"\r\n", "no CRLF within 107 bytes"),
    ("v1", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol 'UDP4'"),
    ("v1", b"PROXY \r\n", "unknown protocol ''"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "got 3"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "got 5"),
    ("v1", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "got 5"),
    ("v1", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "invalid IPv4 source address '1.2.3.256'"),
    ("v1", b"PROXY TCP4 1.2.3.4 05.6.7.8 1 2\r\n", "invalid IPv4 destination address"),
    ("v1", b"PROXY TCP4 ::1 ::1 1 2\r\n", "invalid IPv4 source address '::1'"),
    ("v1", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "invalid IPv6 source address '1.2.3.4'"),
    ("v1", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "invalid IPv6 source address"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "invalid source port '65536'"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "invalid source port '01'"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "invalid destination port '-2'"),
    ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "invalid destination port"),
    ("v1", b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "invalid IPv4 source address"),
    ("v2", V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1, expected 2"),
    ("v2", V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 0x2"),
    ("v2", V2_SIGNATURE + b"\x21\x41\x00\x0c", "unknown address family 0x4"),
    ("v2", V2_SIGNATURE + b"\x21\x13\x00\x0c", "unknown transport protocol 0x3"),
    ("v2", V2_SIGNATURE + b"\x21\x11\xff\xff", "more than the 4096 accepted"),
    ("auto", V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", MAX_V2_LENGTH - 15), "more than the 4096"),
    ("v2", v2(body=b"\0" * 11, fam=0x11), "length 11 is too short for its address family (needs 12)"),
    ("v2", v2(body=b"\0" * 35, fam=0x21), "needs 36"),
    ("v2", v2(tlvs=b"\x01\x00"), "truncated TLV"),
    ("v2", v2(tlvs=tlv(0x01, b"h2") + b"\x02\x00\x09abc"), "claims 9 bytes, only 3 remain"),
]


@pytest.mark.parametrize("mode, buf, message", MALFORMED, ids=[m for _, _, m in MALFORMED])
def test_malformed_headers_name_the_problem(mode, buf, message):
    with pytest.raises(ProxyHeaderError, match=None) as info:
        parse_proxy_header(buf, mode)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_mode_is_an_error():
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"", "off")


def test_max_v2_length_is_accepted():
    header = v2(tlvs=tlv(0xEE, b"\0" * (MAX_V2_LENGTH - 28 - 3)))
    assert len(header) == MAX_V2_LENGTH
    assert parse_proxy_header(header, "v2").length == MAX_V2_LENGTH


# -- parser: fuzz -------------------------------------------------------------

_prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE,
                             V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x21\x21\x00\x24", V2_SIGNATURE + b"\x20"])
_buffers = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda p, b: p + b, _prefixes, st.binary(max_size=300)),
    st.builds(lambda p, t: p + t.encode("latin-1"), _prefixes,
              st.text(alphabet="0123456789abcdef.:% \r\nPROXYTCUNKW", max_size=120)),
    st.sampled_from([h for _, h in GOOD]).flatmap(lambda h: st.builds(lambda i, b: h[:i] + b, st.integers(0, len(h)), st.binary(max_size=40))),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(buf=_buffers, mode=st.sampled_from(["v1", "v2", "auto"]), extra=st.binary(max_size=20))
def test_fuzz_never_raises_anything_else(buf, mode, extra):
    try:
        got = parse_proxy_header(buf, mode)
    except ProxyHeaderError as e:
        assert str(e)
        return
    if got is None:
        return
    assert isinstance(got, ProxyHeader) and 0 <= got.length <= len(buf)
    assert got.length <= max(MAX_V1_LENGTH, MAX_V2_LENGTH)
    # A complete header does not change with what follows it.
    assert parse_proxy_header(buf + extra, mode) == got
    if got.source is not None:
        ipaddress.ip_address(got.source[0])
        assert 0 <= got.source[1] <= 65535


# -- the wrapper, on a fake transport -------------------------------------------


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.made = self.lost = False

    def connectionMade(self):
        self.made = True
        self.peer = self.transport.getPeer()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


class RecorderFactory(Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder()
        p.addr = addr
        self.built.append(p)
        return p


def wrapped_connection(peer_ip, mode="v2", trusted=("127.0.0.1",)):
    inner = RecorderFactory()
    clock = Clock()
    factory = ProxyProtocolFactory(inner, mode, trusted, clock=clock)
    proto = factory.buildProtocol(IPv4Address("TCP", peer_ip, 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer_ip, 5555), hostAddress=IPv4Address("TCP", "127.0.0.1", 443))
    transport.abortConnection = lambda: setattr(transport, "aborted", True)
    transport.aborted = False
    proto.makeConnection(transport)
    return proto, inner, clock, transport


def test_wrapper_byte_at_a_time_then_real_peer_for_every_layer(log_lines):
    proto, inner, clock, transport = wrapped_connection("127.0.0.1")
    assert inner.built == []  # nothing above runs before the header
    payload = v2(("2001:db8::7", 4242), ("::1", 443)) + b"hello"
    for i in range(len(payload)):
        proto.dataReceived(payload[i : i + 1])
    [app] = inner.built
    assert app.made and app.data == b"hello"
    assert app.addr == IPv6Address("TCP", "2001:db8::7", 4242) == app.peer == proto.getPeer()
    assert remote_address(app.transport) == ("2001:db8::7", 4242)
    assert proto.getHost() == IPv4Address("TCP", "127.0.0.1", 443)
    assert came_via_proxy(app.transport) and not transport.aborted
    clock.advance(10)
    assert not transport.aborted  # the header timer is gone


def test_wrapper_header_timeout(log_lines):
    proto, inner, clock, transport = wrapped_connection("127.0.0.1")
    proto.dataReceived(V2_SIGNATURE[:5])
    clock.advance(4.9)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted and inner.built == []
    assert any("no complete PROXY header from 127.0.0.1 within 5 s" in line for line in log_lines)


def test_wrapper_local_keeps_tcp_peer_but_is_via_proxy():
    proto, inner, clock, transport = wrapped_connection("127.0.0.1")
    proto.dataReceived(LOCAL_V2 + b"x")
    [app] = inner.built
    assert app.peer == IPv4Address("TCP", "127.0.0.1", 5555) and app.data == b"x"
    assert came_via_proxy(app.transport)


def test_wrapper_untrusted_direct_and_peeked(log_lines):
    proto, inner, clock, transport = wrapped_connection("127.0.0.2")
    [app] = inner.built  # connected at once: a direct client
    assert not came_via_proxy(app.transport)
    proto.dataReceived(b"PRO")
    assert app.data == b""
    proto.dataReceived(b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert transport.aborted and app.data == b""
    assert any("PROXY header from untrusted 127.0.0.2" in line for line in log_lines)

    proto, inner, clock, transport = wrapped_connection("127.0.0.2")
    proto.dataReceived(b"PO")
    proto.dataReceived(b"ST / HTTP/1.1\r\n")
    assert inner.built[0].data == b"POST / HTTP/1.1\r\n" and not transport.aborted


def test_wrapper_ipv4_mapped_peer_is_matched():
    inner = RecorderFactory()
    factory = ProxyProtocolFactory(inner, "auto", ["127.0.0.0/8"], clock=Clock())
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport(peerAddress=IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
    proto.dataReceived(v1() + b"rest")
    assert inner.built[0].peer == IPv4Address("TCP", "198.51.100.9", 5151)


# -- end to end ---------------------------------------------------------------


def nodekey(key: PrivateKey) -> str:
    return "nodekey:" + bytes(key.public_key).hex()


def connect_with(port, preamble: bytes, key=None, *, source=None, mesh_key=None):
    """A DERP client over TLS whose TCP stream starts with ``preamble`` (a PROXY header)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=source)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(preamble)
    try:
        return DERPClient._handshake(
            sock, True, "127.0.0.1", port, "/derp", key or PrivateKey.generate(), 10, None, None,
            True, False, mesh_key, True, False, {},
        )
    except BaseException:
        sock.close()
        raise


def raw_exchange(port, data: bytes, *, source=None, tls_after=None) -> bytes:
    """Send ``data`` (then, with ``tls_after``, a TLS request); everything read until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source) as raw:
        raw.sendall(data)
        s = raw
        if tls_after is not None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(raw)
            s.sendall(tls_after)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError, OSError):
                return out
            if not chunk:
                return out
            out += chunk


@pytest.mark.parametrize(
    "mode, preamble, client",
    [
        ("v2", v2(("203.0.113.7", 4242)), ("203.0.113.7", 4242)),
        ("v1", v1(("203.0.113.7", 4242)), ("203.0.113.7", 4242)),
        ("auto", v1(("2001:db8::7", 4343), ("::1", 443)), ("2001:db8::7", 4343)),
    ],
    ids=["v2", "v1", "auto-v1-tcp6"],
)
@pytest_twisted.inlineCallbacks
def test_real_client_address_reaches_admission_peers_and_logs(start_server, headscale, log_lines, mode, preamble, client):
    member = PrivateKey.generate()
    hs = headscale([nodekey(member)])
    server = yield start_server(
        "-proxy-protocol", mode, "-trusted-proxies", "127.0.0.1",
        "-verify-client-url", hs.url, "-verify-client-url-fail-open=false",
    )
    c = yield deferToThread(connect_with, server.port, preamble, member)
    try:
        remotes = [p.remote for p in server.relay.peers()]
        assert remotes == [client]
        bodies = [json.loads(r.body) for r in hs.requests if r.body]
        assert {"NodePublic": nodekey(member), "Source": client[0]} in bodies
        assert not any(b.get("Source") == "127.0.0.1" for b in bodies)
        # A broken frame: derpbox closes the connection and logs the peer, real address included.
        c.send_frame(FrameType.SEND_PACKET, b"short")
        assert (yield deferToThread(c.is_closed_by_server))
    finally:
        yield deferToThread(c.close)
    yield wait_for(lambda: not list(server.relay.peers()))
    # A stranger through the same proxy is rejected, and the log lines name the real client.
    stranger = PrivateKey.generate()
    with pytest.raises((ConnectionError, OSError)):
        yield deferToThread(connect_with, server.port, preamble, stranger)
    assert any(f"{nodekey(stranger)} from {client[0]} rejected by url check" in line for line in log_lines)
    closing = [line for line in log_lines if line.startswith("closing client ")]
    host = f"[{client[0]}]" if ":" in client[0] else client[0]
    assert closing and f" from {host}:{client[1]}: " in closing[0], "\n".join(log_lines)
    assert not any("127.0.0.1" in line for line in closing)


@pytest_twisted.inlineCallbacks
def test_peer_present_carries_the_real_client(start_server, tmp_path):
    mesh_key = os.urandom(32)
    (tmp_path / "mesh.key").write_text(mesh_key.hex() + "\n")
    server = yield start_server(
        "-proxy-protocol", "v2", "-trusted-proxies", "127.0.0.0/8", "-mesh-psk-file", str(tmp_path / "mesh.key")
    )

    def go():
        # (a first: WatchConns lists those already connected)
        a = connect_with(server.port, v2(("203.0.113.7", 4242)))
        mesh = connect_with(server.port, LOCAL_V2, mesh_key=mesh_key)
        mesh.send_frame(FrameType.WATCH_CONNS)
        try:
            while True:
                key, ip16, port, _ = F.parse_peer_present(mesh.recv_until(FrameType.PEER_PRESENT).payload)
                if key == a.public_key:
                    return ip16, port
        finally:
            a.close()
            mesh.close()

    ip16, port = yield deferToThread(go)
    assert ipaddress.ip_address(ip16).ipv4_mapped == ipaddress.ip_address("203.0.113.7") and port == 4242


@pytest_twisted.inlineCallbacks
def test_header_from_untrusted_address_is_closed_and_logged(start_server, log_lines):
    server = yield start_server("-proxy-protocol", "auto", "-trusted-proxies", "127.0.0.1")
    got = yield deferToThread(raw_exchange, server.port, v2() + b"\x16\x03\x01", source=("127.0.0.2", 0))
    assert got == b""
    assert any("PROXY header from untrusted 127.0.0.2" in line for line in log_lines)
    assert not list(server.relay.peers())
    # The same address without a header is an ordinary direct client, seen as itself.
    c = yield deferToThread(connect_with, server.port, b"", source=("127.0.0.2", 0))
    try:
        assert [p.remote[0] for p in server.relay.peers()] == ["127.0.0.2"]
    finally:
        yield deferToThread(c.close)


@pytest.mark.parametrize(
    "mode, data, problem",
    [
        ("v2", V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\0" * 12, "unknown address family 0x4"),
        ("v1", b"PROXY TCP4 203.0.113.700 127.0.0.1 1 2\r\n", "invalid IPv4 source address '203.0.113.700'"),
        ("v2", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no PROXY v2 header"),
        ("auto", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "line feed without a carriage return"),
    ],
    ids=["bad-family", "bad-ip", "missing-in-v2", "bare-lf"],
)
@pytest_twisted.inlineCallbacks
def test_malformed_header_is_closed_and_logged(start_server, log_lines, mode, data, problem):
    server = yield start_server("-proxy-protocol", mode, "-trusted-proxies", "127.0.0.1")
    got = yield deferToThread(raw_exchange, server.port, data)
    assert got == b""
    assert any(line.startswith("bad PROXY header from 127.0.0.1: ") and problem in line for line in log_lines), "\n".join(
        log_lines
    )


VARZ = b"GET /debug/varz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest_twisted.inlineCallbacks
def test_debug_refused_through_a_proxy(start_server):
    server = yield start_server("-proxy-protocol", "auto", "-trusted-proxies", "127.0.0.1")
    direct = yield deferToThread(raw_exchange, server.port, b"", source=("127.0.0.2", 0), tls_after=VARZ)
    assert direct.startswith(b"HTTP/1.1 200 ") and b"derp_current_connections" in direct
    for preamble in (v2(("127.0.0.5", 1000)), v2(("203.0.113.7", 4242)), v1(("127.0.0.5", 1001)), LOCAL_V2, b""):
        got = yield deferToThread(raw_exchange, server.port, preamble, tls_after=VARZ)
        assert got.startswith(b"HTTP/1.1 403 "), (preamble, got[:80])
        assert b"derp_current_connections" not in got


@pytest_twisted.inlineCallbacks
def test_auto_without_header_relays(start_server):
    server = yield start_server("-proxy-protocol", "auto", "-trusted-proxies", "127.0.0.1")

    def go():
        a = DERPClient.connect(server.url)
        b = connect_with(server.port, v2(("203.0.113.9", 9)))
        try:
            a.send_packet(b.public_key, b"through")
            return b.recv_packet(), a.public_key
        finally:
            a.close()
            b.close()

    (src, data), a_key = yield deferToThread(go)
    assert src == a_key and data == b"through"


@pytest_twisted.inlineCallbacks
def test_port80_listener_is_wrapped_too(start_server):
    server = yield start_server("-proxy-protocol", "v1", "-trusted-proxies", "127.0.0.1")
    request = b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = yield deferToThread(raw_exchange, server.service.http_port, v1() + request)
    assert got.startswith(b"HTTP/1.1 204 ")
    got = yield deferToThread(raw_exchange, server.service.http_port, request)
    assert got == b""  # v1 mode: a header is mandatory from a trusted proxy


@pytest_twisted.inlineCallbacks
def test_off_leaves_the_listener_alone(start_server):
    server = yield start_server("-trusted-proxies", "127.0.0.1")
    got = yield deferToThread(raw_exchange, server.service.http_port, v1() + b"GET / HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 ")


def test_proxy_protocol_without_trusted_proxies_refuses_to_start(start_server):
    with pytest.raises(ConfigError, match="needs -trusted-proxies.*anyone could claim any client address"):
        start_server("-proxy-protocol", "v2")


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest_twisted.inlineCallbacks
def test_socket_tuning_reaches_the_tcp_transport_under_the_wrapper(start_server, tls):
    from twisted.internet import tcp

    from derpbox.web.connection import tcp_transport
    from derpbox.web.transports import TRANSPORT_BUFFER

    server = yield start_server("-proxy-protocol", "auto", "-trusted-proxies", "127.0.0.1", tls=tls)
    c = yield deferToThread(DERPClient.connect, server.url)
    try:
        [peer] = list(server.relay.peers())
        found = tcp_transport(peer.conn.transport)
        assert isinstance(found, tcp.Server) and found.bufferSize == TRANSPORT_BUFFER
    finally:
        yield deferToThread(c.close)
