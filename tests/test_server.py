"""derpbox end to end on loopback: real sockets, real TLS, the package client."""

from __future__ import annotations

import gc
import os
import re
import resource
import socket
import ssl
import time
import weakref

import pytest
import pytest_twisted
from nacl.public import Box, PrivateKey, PublicKey
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient, DERPClientError
from derpbox.config import ConfigError, load_settings
from derpbox.protocol import frames as F
from derpbox.protocol import stun
from derpbox.protocol.frames import FrameType
from derpbox.protocol.handshake import client_info_frame

from .conftest import make_cert
from .support import SteadyPair, expect_closed, wait_for


def relay_roundtrip(url, n=20, **kw):
    a = DERPClient.connect(url, **kw)
    b = DERPClient.connect(url, **kw)
    try:
        for i in range(n):
            a.send_packet(b.public_key, b"a->b %d" % i)
            b.send_packet(a.public_key, b"b->a %d" % i)
        got_b = [b.recv_packet() for _ in range(n)]
        got_a = [a.recv_packet() for _ in range(n)]
        assert got_b == [(a.public_key, b"a->b %d" % i) for i in range(n)]
        assert got_a == [(b.public_key, b"b->a %d" % i) for i in range(n)]
        return a.connected, b.connected
    finally:
        a.close()
        b.close()


@pytest_twisted.inlineCallbacks
def test_tls_relay_uses_fast_start(start_server):
    server = yield start_server()
    ca, cb = yield deferToThread(relay_roundtrip, server.url)
    assert ca.tls_version == "TLSv1.3" and ca.fast_start and cb.fast_start
    assert ca.server_key == server.relay.public_key
    assert ca.server_info == {"version": 2}
    assert server.stats.fast_start_upgrades == 2
    assert server.stats.accepts == 2
    assert server.stats.packets_sent == 40


@pytest_twisted.inlineCallbacks
def test_tls12_relay_without_fast_start(start_server):
    server = yield start_server()

    def tls12():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
                data = b""
                while len(data) < 200:
                    data += s.recv(4096)
                return s.version(), s.selected_alpn_protocol(), data

    version, alpn, data = yield deferToThread(tls12)
    assert version == "TLSv1.2" and alpn is None
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert F.server_key_frame(server.relay.public_key) in data
    assert server.stats.fast_start_upgrades == 0


@pytest_twisted.inlineCallbacks
def test_exact_101_then_server_key(start_server):
    server = yield start_server(tls=False)

    def raw():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /derp HTTP/1.1\r\nHost: h\r\nUser-Agent: Go-http-client/1.1\r\n"
                      b"Connection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
            data = b""
            while len(data) < 45 or b"\r\n\r\n" not in data:
                data += s.recv(4096)
            return data

    data = yield deferToThread(raw)
    key = server.relay.public_key
    expected = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
        b"Derp-Version: 2\r\nDerp-Public-Key: " + key.hex().encode() + b"\r\n\r\n"
    )
    assert data == expected + F.server_key_frame(key)


@pytest_twisted.inlineCallbacks
def test_fast_start_sends_no_http_response_and_reads_pipelined_client_info(start_server):
    server = yield start_server(tls=False)
    key = PrivateKey.generate()
    peer = PrivateKey.generate()

    def raw():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            head = b"GET /derp HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n"
            info = client_info_frame(key, server.relay.public_key, {"version": 2})
            # Head, ClientInfo and a packet in one write, as Go clients do.
            s.sendall(head + info + F.send_packet_frame(bytes(peer.public_key), b"early"))
            data = b""
            while len(data) < 45 + 58:
                data += s.recv(4096)
            return data

    data = yield deferToThread(raw)
    assert data.startswith(F.server_key_frame(server.relay.public_key))
    assert data[45] == FrameType.SERVER_INFO
    assert server.stats.fast_start_upgrades == 1
    assert server.stats.dropped_packets[("unknown_dest", "other")] == 1


def http_get(port, request: bytes, tls=False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        s = raw
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(raw)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)", head)
            if sep and length and len(body) >= int(length[1]):
                return data


@pytest_twisted.inlineCallbacks
def test_plain_get_derp_is_426_and_endpoints_answer_over_tls(start_server):
    server = yield start_server()
    data = yield deferToThread(http_get, server.port, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True)
    assert data.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert data.endswith(b"DERP requires connection upgrade\n")
    data = yield deferToThread(http_get, server.port, b"GET /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n", True)
    assert data.startswith(b"HTTP/1.1 200 ") and b"Access-Control-Allow-Origin: *" in data
    data = yield deferToThread(
        http_get, server.port, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_1.2.3.4\r\nConnection: close\r\n\r\n", True
    )
    assert data.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response ts_1.2.3.4\r\n" in data
    assert server.stats.accepts == 0


@pytest_twisted.inlineCallbacks
def test_port80_listener_in_tls_mode(start_server):
    server = yield start_server()
    port = server.service.http_port
    data = yield deferToThread(
        http_get, port, b"GET /generate_204 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Tailscale-Challenge: ts_127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response ts_127.0.0.1" in data
    data = yield deferToThread(http_get, port, b"GET /x?y=1 HTTP/1.1\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n")
    # To the port DERP listens on (ephemeral here), not port 80's own number from the Host.
    location = b"Location: https://example.com:%d/x?y=1\r\n" % server.service.derp_port
    assert data.startswith(b"HTTP/1.1 302 ") and location in data


@pytest_twisted.inlineCallbacks
def test_port80_redirects_to_the_public_port(start_server):
    server = yield start_server("-public-port", "443")
    data = yield deferToThread(http_get, server.service.http_port,
                               b"GET /x HTTP/1.1\r\nHost: example.com:80\r\nConnection: close\r\n\r\n")
    assert b"Location: https://example.com/x\r\n" in data


@pytest_twisted.inlineCallbacks
def test_websocket_derp_relays_to_plain_client(start_server):
    server = yield start_server()

    def go():
        w = DERPClient.connect(server.url, websocket=True)
        p = DERPClient.connect(server.url)
        try:
            big = os.urandom(60000)
            w.send_packet(p.public_key, big)
            p.send_packet(w.public_key, b"to ws")
            return p.recv_packet(), w.recv_packet(), big, w.public_key, p.public_key
        finally:
            w.close()
            p.close()

    (src1, data1), (src2, data2), big, wkey, pkey = yield deferToThread(go)
    assert (src1, data1) == (wkey, big)
    assert (src2, data2) == (pkey, b"to ws")
    assert server.stats.websocket_accepts == 1


def good_client_info(server_key):
    return client_info_frame(PrivateKey.generate(), server_key, {"version": 2})


BAD_INPUTS = {
    "wrong first frame": (lambda k: F.ping_frame(b"12345678"), "first frame is PING"),
    "bad box": (lambda k: good_client_info(k)[:-1] + b"\x00", "box cannot be opened"),
    "bad json": (None, "not valid JSON"),
    "deeply nested json": (lambda k: sealed_info(k, b"[" * 10_000), "nested too deeply"),
    "client info too short": (lambda k: F.pack_header(2, 55) + bytes(55), "CLIENT_INFO length 55 outside"),
    "client info too long": (lambda k: F.pack_header(2, 262145), "CLIENT_INFO length 262145 outside"),
    "oversize send": (lambda k: good_client_info(k) + F.pack_header(4, 32 + 65537), "SEND_PACKET frame length 65569"),
    "short send": (lambda k: good_client_info(k) + F.pack_header(4, 31) + bytes(31), "SEND_PACKET frame length 31"),
    "note preferred 2": (lambda k: good_client_info(k) + F.pack_header(7, 2) + b"\x01\x01", "NOTE_PREFERRED frame length 2"),
    "ping 7": (lambda k: good_client_info(k) + F.pack_header(0x12, 7) + bytes(7), "PING frame length 7"),
    "ping 1001": (lambda k: good_client_info(k) + F.pack_header(0x12, 1001) + bytes(1001), "PING frame length 1001"),
    "watch without mesh key": (lambda k: good_client_info(k) + F.WATCH_CONNS_FRAME, "requires the mesh key"),
    "forward without mesh key": (lambda k: good_client_info(k) + F.forward_packet_frame(bytes(32), bytes(32), b"x"), "requires the mesh key"),
    "close peer without mesh key": (lambda k: good_client_info(k) + F.close_peer_frame(bytes(32)), "requires the mesh key"),
}


def sealed_info(server_key, plaintext: bytes) -> bytes:
    key = PrivateKey.generate()
    sealed = bytes(Box(key, PublicKey(server_key)).encrypt(plaintext))
    return F.encode_frame(2, bytes(key.public_key) + sealed)


def bad_json_info(server_key):
    return sealed_info(server_key, b"{nope")


@pytest_twisted.inlineCallbacks
def test_each_bad_input_closes_only_its_connection(start_server, log_lines):
    server = yield start_server(tls=False)
    pair = yield deferToThread(SteadyPair, server.url)
    key = server.relay.public_key
    for name, (make, message) in BAD_INPUTS.items():
        payload = bad_json_info(key) if make is None else make(key)
        yield deferToThread(expect_closed, server.port, payload)
        assert any(message in line for line in log_lines), (name, message, log_lines[-3:])
    # Garbage instead of an HTTP request: a 400 and a close.
    reply = yield deferToThread(expect_closed, server.port, b"\x16\x03\x01garbage\r\n\r\n", upgrade=False)
    assert reply.startswith(b"HTTP/1.1 400")
    assert any("bad HTTP request" in line for line in log_lines)
    # Keep the pair going a moment after the last bad client.
    yield deferToThread(time.sleep, 0.3)
    sent, received = yield deferToThread(pair.stop)
    assert sent > 20
    assert received == list(range(len(received))) and len(received) >= sent - 1
    # The clients closed from a thread: the server sees it a moment later.
    yield wait_for(lambda: server.stats.current_connections == 0)
    assert server.relay.check_consistency() == []


@pytest_twisted.inlineCallbacks
def test_slow_reader_is_isolated_and_dropped(start_server):
    server = yield start_server(tls=False)
    pair = yield deferToThread(SteadyPair, server.url)

    def flood():
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        slow_key = PrivateKey.generate()
        slow.sendall(client_info_frame(slow_key, server.relay.public_key, {}))
        time.sleep(0.2)
        sender = DERPClient.connect(server.url)
        batch = F.send_packet_frame(bytes(slow_key.public_key), bytes(1200)) * 100
        # Keep the slow reader's socket full for longer than the 2 s write timeout.
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            sender.write(batch)
            time.sleep(0.01)
        sender.close()
        return slow

    slow = yield deferToThread(flood)
    sent, received = yield deferToThread(pair.stop)
    slow.close()
    stats = server.stats
    assert stats.dropped_packets[("queue_head", "other")] > 1000
    assert stats.sclient_write_timeouts == 1
    # Once it was closed, packets for it are unknown_dest.
    assert stats.dropped_packets[("unknown_dest", "other")] > 0
    assert received == list(range(len(received))) and len(received) >= sent - 1


@pytest_twisted.inlineCallbacks
def test_duplicate_key_connections_over_tls(start_server):
    server = yield start_server()
    key = PrivateKey.generate()

    def go():
        first = DERPClient.connect(server.url, key)
        second = DERPClient.connect(server.url, key)
        other = DERPClient.connect(server.url)
        other.send_packet(first.public_key, b"to newest")
        got_second = second.recv_packet()
        first.ping()
        first.recv_until(FrameType.PONG)
        other.send_packet(first.public_key, b"to first")
        got_first = first.recv_packet()
        first.send_packet(other.public_key, b"reply")
        other.recv_packet()
        second.close()
        deadline = time.monotonic() + 5
        while server.stats.current_connections != 2:
            assert time.monotonic() < deadline, "the server did not see the duplicate close"
            time.sleep(0.01)
        # A PeerGone, if any, was queued before the pong: frames arrive in order.
        other.ping()
        before_pong = []
        while (frame := other.recv(timeout=5)).type != FrameType.PONG:
            before_pong.append(frame.type)
        assert FrameType.PEER_GONE not in before_pong  # one connection of the key is left
        first.close()
        gone = other.recv_until(FrameType.PEER_GONE)
        other.close()
        return got_second, got_first, gone.payload

    got_second, got_first, gone = yield deferToThread(go)
    assert got_second[1] == b"to newest" and got_first[1] == b"to first"
    assert gone == bytes(key.public_key) + b"\x00"
    assert server.stats.total_dup_client_conns == 1


@pytest_twisted.inlineCallbacks
def test_sni_must_match_dns_hostname(start_server, tmp_path):
    ca, _, _ = make_cert(tmp_path / "certs", "derp.test")
    server = yield start_server("-hostname", "derp.test")

    def go():
        good = DERPClient.connect(server.url, server_name="derp.test", cafile=str(ca))
        good.close()
        with pytest.raises(Exception):
            DERPClient.connect(server.url, server_name="other.test")
        with pytest.raises(Exception):
            DERPClient.connect(server.url, server_name="")
        return good.connected

    connected = yield deferToThread(go)
    assert connected.fast_start


@pytest_twisted.inlineCallbacks
def test_stun_through_the_service(start_server):
    server = yield start_server()
    port = server.service.stun_port

    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.bind(("127.0.0.1", 0))
            txid = os.urandom(12)
            s.sendto(stun.build_binding_request(txid), ("127.0.0.1", port))
            reply = s.recv(1500)
            return stun.parse_binding_response(reply), (txid, "127.0.0.1", s.getsockname()[1])

    got, expected = yield deferToThread(go)
    assert got == expected
    assert server.service.stun_stats.requests["success"] == 1


@pytest_twisted.inlineCallbacks
def test_derp_disabled(start_server):
    server = yield start_server("-derp=false")
    data = yield deferToThread(
        http_get, server.port, b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: close\r\n\r\n", True
    )
    assert data.startswith(b"HTTP/1.1 404 ") and data.endswith(b"derp server disabled\n")
    with pytest.raises(DERPClientError, match="HTTP 404"):
        yield deferToThread(DERPClient.connect, server.url, fast_start=False)


@pytest_twisted.inlineCallbacks
def test_mesh_peer_watches_forwards_and_closes(start_server, tmp_path):
    mesh_key = os.urandom(32)
    (tmp_path / "mesh.key").write_text(mesh_key.hex() + "\n")
    server = yield start_server("-mesh-psk-file", str(tmp_path / "mesh.key"))

    def go():
        a = DERPClient.connect(server.url)
        # A wrong mesh key makes an ordinary client, which WatchConns gets closed.
        bad = DERPClient.connect(server.url, mesh_key=os.urandom(32))
        bad.send_frame(FrameType.WATCH_CONNS)
        bad_closed = bad.is_closed_by_server()
        mesh = DERPClient.connect(server.url, mesh_key=mesh_key)
        mesh.send_frame(FrameType.WATCH_CONNS)
        present = mesh.recv_until(FrameType.PEER_PRESENT)
        key, ip16, port, flags = F.parse_peer_present(present.payload)
        mesh.send_frame(FrameType.FORWARD_PACKET, b"S" * 32 + a.public_key + b"forwarded")
        got = a.recv_packet()
        mesh.send_frame(FrameType.CLOSE_PEER, a.public_key)
        closed = a.is_closed_by_server()
        gone = mesh.recv_until(FrameType.PEER_GONE)
        mesh.close()
        return bad_closed, key, ip16, flags, got, closed, gone.payload, a.public_key

    bad_closed, key, ip16, flags, got, closed, gone, a_key = yield deferToThread(go)
    assert bad_closed
    assert key == a_key and ip16 == bytes(10) + b"\xff\xff\x7f\x00\x00\x01" and flags == 1
    assert got == (b"S" * 32, b"forwarded")
    assert closed and gone == a_key + b"\x00"
    assert server.stats.packets_forwarded_in == 1


@pytest_twisted.inlineCallbacks
def test_peer_gone_not_here_for_disco_to_unknown_key(start_server):
    server = yield start_server()

    def go():
        a = DERPClient.connect(server.url)
        nobody = os.urandom(32)
        a.send_packet(nobody, b"plain wireguard")
        a.send_packet(nobody, F.DISCO_MAGIC + bytes(56))
        frame = a.recv_until(FrameType.PEER_GONE)
        a.close()
        return frame.payload, nobody

    payload, nobody = yield deferToThread(go)
    assert payload == nobody + b"\x01"
    assert server.stats.dropped_packets[("unknown_dest", "other")] == 1
    assert server.stats.dropped_packets[("unknown_dest", "disco")] == 1


@pytest_twisted.inlineCallbacks
def test_ping_pong_and_note_preferred_over_tls(start_server):
    server = yield start_server()

    a = yield deferToThread(DERPClient.connect, server.url)

    def go():
        a.ping(b"8 bytes!")
        pong = a.recv_until(FrameType.PONG)
        a.note_preferred(True)
        a.ping(b"sync....")
        a.recv_until(FrameType.PONG)
        return pong.payload

    assert (yield deferToThread(go)) == b"8 bytes!"
    assert server.stats.got_ping == 2 and server.stats.sent_pong == 2
    assert server.stats.current_home_connections == 1
    a.close()
    yield wait_for(lambda: server.stats.current_connections == 0)
    assert server.stats.current_home_connections == 0


def ws_request(extra: str) -> bytes:
    return (
        "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + extra + "\r\n"
    ).encode()


@pytest_twisted.inlineCallbacks
def test_websocket_edge_cases(start_server):
    server = yield start_server(tls=False)
    # A subprotocol list merely containing "derp": handshake, then close 1008.
    data = yield deferToThread(expect_closed, server.port, ws_request("Sec-WebSocket-Protocol: notderp\r\n"), upgrade=False)
    head, _, frame = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol" not in head
    assert frame[:2] == b"\x88" + bytes([len(frame) - 2]) and frame[2:4] == (1008).to_bytes(2, "big")
    # A wrong version is refused and told which one to use.
    data = yield deferToThread(
        expect_closed, server.port,
        ws_request("Sec-WebSocket-Protocol: derp\r\n").replace(b"Version: 13", b"Version: 8"), upgrade=False,
    )
    assert data.startswith(b"HTTP/1.1 400 ") and b"Sec-WebSocket-Version: 13\r\n" in data
    # Very old clients: Upgrade: websocket without the subprotocol speak raw DERP.
    def old_client():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(ws_request(""))
            data = b""
            while not data.endswith(F.server_key_frame(server.relay.public_key)):
                data += s.recv(4096)
            return data

    data = yield deferToThread(old_client)
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n")
    assert server.stats.websocket_accepts == 0 and server.stats.accepts == 1


@pytest_twisted.inlineCallbacks
def test_tls_groups_setting_takes_effect(start_server):
    server = yield start_server("-tls-groups", "P-256")

    def handshake(groups):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ecdh_curve(groups)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                return s.version()

    assert (yield deferToThread(handshake, "prime256v1")) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        yield deferToThread(handshake, "X25519")


def test_tls_groups_validated():
    with pytest.raises(ConfigError, match="-tls-groups.*'NOPE'.*OpenSSL group list"):
        load_settings(["-c", "/tmp/k", "-tls-groups", "NOPE"], {})
    assert load_settings(["-c", "/tmp/k", "-tls=off"], {"DERP_TLS_GROUPS": "X25519:P-256"}).tls_groups == "X25519:P-256"


@pytest.mark.parametrize("websocket", [False, True])
@pytest_twisted.inlineCallbacks
def test_closed_connections_are_freed_without_cyclic_gc(start_server, websocket):
    """derpbox.heap freezes long-lived objects; that is only safe if a closed
    connection needs no cyclic collection to be freed."""
    server = yield start_server()
    front = server.service.main.factory.wrappedFactory
    built = []
    original = front.buildProtocol

    def tracking(addr):
        p = original(addr)
        built.append(weakref.ref(p))
        return p

    front.buildProtocol = tracking
    gc.collect()
    gc.disable()
    try:
        yield deferToThread(relay_roundtrip, server.url, 3, websocket=websocket)
        yield wait_for(lambda: server.stats.current_connections == 0)
        yield wait_for(lambda: all(ref() is None for ref in built), timeout=2)
        assert len(built) == 2
    finally:
        gc.enable()


@pytest_twisted.inlineCallbacks
def test_client_recv_timeout_over_tls_is_a_timeout_not_a_close(start_server):
    server = yield start_server()

    def go():
        c = DERPClient.connect(server.url)
        try:
            with pytest.raises(TimeoutError):
                c.recv(0.3)
            closed = c.is_closed_by_server(0.5)
            c.ping()
            return closed, c.recv_until(FrameType.PONG).payload
        finally:
            c.close()

    closed, pong = yield deferToThread(go)
    assert not closed and pong == b"pingpong"


@pytest_twisted.inlineCallbacks
def test_many_clients_failing_the_same_way_make_one_log_line(start_server, log_lines):
    """Per-connection failure lines are folded: 30 bad WebSocket clients, one line."""
    server = yield start_server(tls=False)

    def bad_websocket_client():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Protocol: derp\r\n\r\n")
            s.sendall(b"\x81\x80abcd")  # a masked text frame: DERP takes binary only
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass  # the server aborts the connection after its close frame

    for _ in range(30):
        yield deferToThread(bad_websocket_client)
    lines = [line for line in log_lines if "text messages are not supported" in line]
    assert len(lines) == 1, lines


@pytest_twisted.inlineCallbacks
def test_client_handshakes_with_descriptors_above_select_s_limit(start_server):
    """derpbox's client (the checks, the benches' load generators) holds many sockets at once;
    select() cannot wait on a descriptor above 1,023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"the hard open-file limit is {hard}, below the 1,200 this needs")
    server = yield start_server()
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = yield deferToThread(DERPClient.connect, server.url)
        assert client.stream.sock.fileno() > 1024
        client.close()
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
