"""derpbox.web.streams: the connection objects a Peer writes to, raw and over WebSocket."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from derpbox.protocol.websocket import (
    BinaryData,
    Close,
    Opcode,
    Pong,
    WebSocketDecoder,
    encode_frame,
    encode_masked_binary,
)
from derpbox.relay.peer import ACTIVE, HANDSHAKE, Peer
from derpbox.web.streams import WS_CHUNK, WS_FRAMES_PER_PASS, WS_HANDSHAKE_BUDGET, DERPStream, WebSocketStream

from .test_server import relay_roundtrip, wait_for


class FakePeer:
    def __init__(self, state=ACTIVE):
        self.fed = []
        self.failed = None
        self.lost = False
        self.paused = False  # the transport's buffer is full: the client does not read
        self.state = state
        self.relay = SimpleNamespace(clock=Clock())

    def feed(self, data):
        self.fed.append(data)

    def fail(self, reason):
        self.failed = reason

    def connection_lost(self, reason="closed by the client"):
        self.lost = reason


class RecordingTransport(StringTransport):
    """A transport that also records the order of producer and close calls."""

    def __init__(self):
        super().__init__()
        self.calls = []
        # As after the front door wired a peer: the peer is the push producer.
        self.registerProducer(FakePeer(), True)

    def unregisterProducer(self):
        self.calls.append("unregisterProducer")
        super().unregisterProducer()

    def loseConnection(self):
        self.calls.append("loseConnection")
        super().loseConnection()


def server_messages(data: bytes) -> list:
    return WebSocketDecoder(client=True).feed(data)


def test_derp_stream_writes_with_the_transports_own_method():
    # The hot path: a peer's write must be transport.write itself, with no layer between.
    transport = StringTransport()
    stream = DERPStream(transport)
    assert stream.write == transport.write
    peer = FakePeer()
    assert stream.attach(peer) == peer.feed


def test_derp_stream_close_unregisters_the_producer_before_closing():
    # Twisted's TLS transport postpones close_notify while a producer is registered.
    transport = RecordingTransport()
    DERPStream(transport).close()
    assert transport.calls == ["unregisterProducer", "loseConnection"]


def test_websocket_stream_writes_binary_messages_of_at_most_ws_chunk():
    transport = StringTransport()
    data = bytes(range(256)) * ((2 * WS_CHUNK + 100) // 256 + 1)
    WebSocketStream(transport).write(data)
    messages = server_messages(transport.value())
    assert all(isinstance(m, BinaryData) and len(m.data) <= WS_CHUNK for m in messages)
    assert len(messages) == 3 and b"".join(m.data for m in messages) == data


def test_websocket_stream_feeds_binary_messages_to_the_peer():
    transport = StringTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer()
    receive = stream.attach(peer)
    receive(encode_masked_binary(b"frame one") + encode_masked_binary(b"frame two"))
    # The DERP bytes of all the frames one read brought, in one piece.
    assert peer.fed == [b"frame oneframe two"]


def test_websocket_stream_answers_ping_and_close():
    transport = RecordingTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer()
    receive = stream.attach(peer)
    mask = b"\x01\x02\x03\x04"
    receive(encode_frame(Opcode.PING, b"hi", mask=mask) + encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=mask))
    pong, close = server_messages(transport.value())
    assert isinstance(pong, Pong) and pong.payload == b"hi"
    assert isinstance(close, Close) and close.code == 1000
    assert peer.lost == "WebSocket closed by the client" and transport.calls == ["unregisterProducer", "loseConnection"]


def test_pings_get_one_pong_per_read_and_none_while_the_client_does_not_read():
    transport = RecordingTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer()
    receive = stream.attach(peer)
    mask = b"\x01\x02\x03\x04"
    receive(b"".join(encode_frame(Opcode.PING, b"%d" % i, mask=mask) for i in range(1000)))
    [pong] = server_messages(transport.value())
    # One pass decodes WS_FRAMES_PER_PASS frames; the rest wait for the next pass.
    assert isinstance(pong, Pong) and pong.payload == b"%d" % (WS_FRAMES_PER_PASS - 1)
    peer.relay.clock.advance(0)
    assert [p.payload for p in server_messages(transport.value())] == [pong.payload, b"999"]
    peer.paused = True
    before = transport.value()
    receive(b"".join(encode_frame(Opcode.PING, b"x" * 125, mask=mask) for i in range(1000)))
    assert transport.value() == before


def test_websocket_stream_close_sends_1000_then_closes_like_the_raw_stream():
    transport = RecordingTransport()
    WebSocketStream(transport).close()
    [close] = server_messages(transport.value())
    assert isinstance(close, Close) and close.code == 1000
    assert transport.calls == ["unregisterProducer", "loseConnection"]


def test_websocket_stream_error_fails_the_peer():
    transport = StringTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer()
    stream.attach(peer)(b"\x82\x01x")  # unmasked client frame
    assert peer.failed.startswith("WebSocket error 1002")


@pytest.mark.parametrize("websocket", [False, True], ids=["derp", "websocket"])
@pytest_twisted.inlineCallbacks
def test_closed_peers_and_streams_are_freed_without_cyclic_gc(start_server, websocket):
    """A WebSocket stream and its peer refer to each other; the close must break that."""
    server = yield start_server()

    def left():
        # derpbox.heap freezes objects every few seconds; frozen ones are not listed.
        gc.unfreeze()
        return [o for o in gc.get_objects() if isinstance(o, (Peer, DERPStream, WebSocketStream))]

    gc.collect()
    gc.disable()
    try:
        yield deferToThread(relay_roundtrip, server.url, 3, websocket=websocket)
        yield wait_for(lambda: server.stats.current_connections == 0)
        yield wait_for(lambda: not left(), timeout=2)
    finally:
        gc.enable()


def test_a_head_timeout_is_counted_and_closes_the_connection():
    from nacl.public import PrivateKey
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from derpbox.relay.relay import Relay
    from derpbox.tls.stats import TLSStats
    from derpbox.web.connection import HEAD_TIMEOUT, FrontFactory

    clock = Clock()
    relay = Relay(PrivateKey.generate(), clock)
    tls_stats = TLSStats()
    factory = FrontFactory(relay, Site(Resource()), clock, tls_stats=tls_stats)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
    conn = factory.buildProtocol(None)
    conn.makeConnection(transport)
    conn.dataReceived(b"GET / HT")  # a head that never ends
    clock.advance(HEAD_TIMEOUT)
    assert transport.disconnecting or transport.disconnected
    assert relay.stats.head_timeouts == 1
    conn.connectionLost(Failure(ConnectionDone()))
    assert tls_stats.handshake_failures == {"timeout": 1, "tls_error": 0, "closed": 0}  # it never got further


class PausableTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.reading = True

    def pauseProducing(self):
        self.reading = False

    def resumeProducing(self):
        self.reading = True


def test_a_flood_of_tiny_frames_is_decoded_a_pass_at_a_time():
    transport = PausableTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer()
    receive = stream.attach(peer)
    mask = b"\x01\x02\x03\x04"
    receive(b"".join(encode_frame(Opcode.BINARY, bytes([i % 256]), mask=mask) for i in range(2000)))
    assert peer.fed == [bytes(i % 256 for i in range(WS_FRAMES_PER_PASS))] and not transport.reading
    # Each further pass is a timed call: the reactor serves other connections in between.
    assert len(peer.relay.clock.getDelayedCalls()) == 1
    peer.relay.clock.advance(0)
    assert [len(piece) for piece in peer.fed] == [512, 512, 512, 464] and transport.reading
    assert b"".join(peer.fed) == bytes(i % 256 for i in range(2000))
    # The peer's own pause outlasts the stream's: reading resumes only when both are over.
    receive(b"".join(encode_frame(Opcode.BINARY, b"x", mask=mask) for _ in range(600)))
    stream.pause_reading()
    peer.relay.clock.advance(0)
    assert not transport.reading
    stream.resume_reading()
    assert transport.reading


def test_websocket_bytes_before_the_derp_handshake_are_budgeted():
    transport = PausableTransport()
    stream = WebSocketStream(transport)
    peer = FakePeer(state=HANDSHAKE)
    receive = stream.attach(peer)
    mask = b"\x01\x02\x03\x04"
    one_byte_frames = b"".join(encode_frame(Opcode.BINARY, b"\x02", mask=mask) for _ in range(1000))
    while peer.failed is None:
        receive(one_byte_frames)
        peer.relay.clock.advance(0)
        assert sum(map(len, peer.fed)) < WS_HANDSHAKE_BUDGET
    assert peer.failed == f"sent over {WS_HANDSHAKE_BUDGET} WebSocket bytes without completing the DERP handshake"
