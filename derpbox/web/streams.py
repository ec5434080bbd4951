"""The two ways a DERP stream rides a connection, each the ``Conn`` its Peer writes to.

``DERPStream`` carries frames as they are, after an upgrade head; ``WebSocketStream``
carries them in binary WebSocket messages. The front door (derpbox.web.connection)
builds one after the head, then calls ``attach(peer)``, which returns the function
that takes the connection's further bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol.websocket import (
    BinaryData,
    Close,
    Ping,
    WebSocketDecoder,
    WebSocketError,
    encode_binary,
    encode_close,
    encode_pong,
)
from ..relay.peer import CLOSED, HANDSHAKE, Peer

__all__ = ["DERPStream", "WebSocketStream", "WS_CHUNK"]

# Browsers accept any size, but small messages keep every WebSocket reader happy.
WS_CHUNK = 32 << 10
# WebSocket frames decoded for one connection per reactor pass: a real client sends one
# frame per DERP write; a flood of 1-byte frames waits its turn after everyone else.
WS_FRAMES_PER_PASS = 512
# WebSocket bytes a client may send before its ClientInfo is complete (ClientInfo is a
# few hundred bytes; this allows it in 1-byte frames many times over).
WS_HANDSHAKE_BUDGET = 64 << 10


class _Stream:
    """What both stream kinds do the same way: abort, flow control, orderly close."""

    __slots__ = ("transport", "peer_paused")

    def __init__(self, transport):
        self.transport = transport
        # The peer's own read pause (admission pending, rate limit, its frame budget).
        self.peer_paused = False

    def abort(self) -> None:
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        self.peer_paused = True
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.peer_paused = False
        self.transport.resumeProducing()

    def close(self) -> None:
        # While a producer is registered, Twisted's TLS transport postpones the
        # close_notify (and so the close) until it unregisters.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def detach(self) -> None:
        """The connection is gone: drop any reference back to the peer."""


class DERPStream(_Stream):
    """DERP frames straight on the transport, after the upgrade head."""

    __slots__ = ("write",)

    def __init__(self, transport):
        super().__init__(transport)
        # The transport's own method, so a peer's write is transport.write with no layer between.
        self.write = transport.write

    def attach(self, peer: Peer) -> Callable[[bytes], None]:
        return peer.feed


class WebSocketStream(_Stream):
    """DERP frames in binary WebSocket messages (the "derp" subprotocol)."""

    __slots__ = ("_decoder", "_peer", "_before_handshake", "_next_pass")

    def __init__(self, transport):
        super().__init__(transport)
        self._decoder = WebSocketDecoder(frames_per_feed=WS_FRAMES_PER_PASS)
        self._peer: Peer | None = None
        self._before_handshake = 0
        self._next_pass = None

    def attach(self, peer: Peer) -> Callable[[bytes], None]:
        self._peer = peer
        return self.data_received

    def detach(self) -> None:
        # The peer holds this stream as its conn: a cycle refcounting alone cannot free.
        self._peer = None
        if self._next_pass is not None and self._next_pass.active():
            self._next_pass.cancel()
        self._next_pass = None

    def resume_reading(self) -> None:
        self.peer_paused = False
        if self._next_pass is None:
            self.transport.resumeProducing()

    def write(self, data: bytes) -> None:
        write = self.transport.write
        for i in range(0, len(data), WS_CHUNK):
            write(encode_binary(data[i : i + WS_CHUNK]))

    def close(self) -> None:
        self.transport.write(encode_close(1000, ""))
        super().close()

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer.state == HANDSHAKE:
            self._before_handshake += len(data)
            if self._before_handshake > WS_HANDSHAKE_BUDGET:
                peer.fail(f"sent over {WS_HANDSHAKE_BUDGET} WebSocket bytes without completing the DERP handshake")
                return
        try:
            events = self._decoder.feed(data)
        except WebSocketError as e:
            # Logged by fail(), folded with the other connections failing the same way.
            self.transport.write(encode_close(e.code, e.reason))
            peer.fail(f"WebSocket error {e.code}: {e.reason}")
            return
        ping = None
        # The DERP bytes of every data frame in this read, handed over in one piece.
        stream: list = []
        for event in events:
            if isinstance(event, BinaryData):
                stream.append(event.data)
            elif isinstance(event, Ping):
                ping = event
            elif isinstance(event, Close):
                self._feed(peer, stream)
                self._pong(ping, peer)
                self.close()
                peer.connection_lost("WebSocket closed by the client")
                return
        self._feed(peer, stream)
        self._pong(ping, peer)
        if self._decoder.more and peer.state != CLOSED and self._next_pass is None:
            # This read held more frames than one pass decodes: the rest after the others.
            self.transport.pauseProducing()
            self._next_pass = peer.relay.clock.callLater(0, self._go_on)

    @staticmethod
    def _feed(peer: Peer, stream: list) -> None:
        if stream:
            peer.feed(stream[0] if len(stream) == 1 else b"".join(stream))

    def _go_on(self) -> None:
        self._next_pass = None
        if self._peer is None:
            return
        self.data_received(b"")
        if self._next_pass is None and not self.peer_paused and self._peer is not None:
            self.transport.resumeProducing()

    def _pong(self, ping: Ping | None, peer: Peer) -> None:
        # One pong per read, answering the latest ping (RFC 6455 5.5.3 allows that), and none
        # while the client is not reading what it is sent: pings cannot grow the output.
        if ping is not None and not peer.paused:
            self.transport.write(encode_pong(ping.payload))
