"""The main listener's per-connection protocol.

The first request head decides what a connection is: a DERP upgrade (raw DERP
frames after the head), DERP over WebSocket, or ordinary HTTP handed to the
twisted.web site. Bytes that follow the head in the same read are DERP stream
(fast-start clients send ClientInfo with the request). The DERP stream kinds, the
connection objects a Peer writes to, are in derpbox.web.streams.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import Site
from zope.interface import implementer

from ..netaddr import remote_address
from ..protocol.upgrade import (
    MAX_HEAD,
    HTTPHeadError,
    classify_derp_request,
    derp_switching_response,
    error_response,
    ideal_node,
    is_fast_start,
    parse_request_head,
)
from ..protocol.websocket import CloseCode, accept_response, encode_close, negotiated_subprotocol
from ..relay.peer import Peer
from ..relay.relay import Relay
from ..tls.stats import TLSStats, tls_version_label
from .endpoints import CLOSE_GRACE
from .streams import DERPStream, WebSocketStream

log = Logger()

# Go's server gives a request 30 s to arrive; a connection that sends nothing is closed.
HEAD_TIMEOUT = 30.0
GO_DEFAULT_KEEPALIVE = 15.0


def tcp_transport(transport):
    """The socket transport under a (possibly TLS- or PROXY-wrapped) transport."""
    # A wrapper holds the transport below as its own attribute, and hands lookups of
    # attributes it lacks (such as "socket") down to it: unwrap first, then look.
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport if isinstance(getattr(transport, "socket", None), socket.socket) else None


@implementer(IHandshakeListener)
class FrontConnection(Protocol):
    """The front door: reads the first request head and hands the connection on.

    After the head, every read goes straight to ``_receive``: the twisted.web
    channel's dataReceived, Peer.feed (raw DERP) or the WebSocket stream's decoder.
    """

    # The negotiated TLS version label ("1.3"), once the handshake completed.
    tls_version: str | None = None

    def __init__(self, factory: FrontFactory):
        self.factory = factory
        self._buf = b""
        self._receive: Callable[[bytes], None] | None = None
        self._peer: Peer | None = None
        self._stream: DERPStream | WebSocketStream | None = None
        self._web = None
        self._timer = None
        self.timed_out = False

    def connectionMade(self) -> None:
        self.factory.open_connections.add(self)
        tls_stats = self.factory.tls_stats
        if tls_stats is not None:
            tls_stats.accepted_connections += 1
        self.factory.tune(self.transport)
        self._timer = self.factory.clock.callLater(HEAD_TIMEOUT, self._head_timeout)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLSMemoryBIOProtocol calls this once per TLS connection."""
        tls_stats = self.factory.tls_stats
        if tls_stats is None:
            return
        # The app's transport is the TLS protocol itself (BufferingTLSTransport);
        # getHandle() is its pyOpenSSL Connection.
        try:
            name = self.transport.getHandle().get_protocol_version_name()
        except Exception:  # noqa: BLE001 - a metric must never break a connection
            name = "unknown"
        self.tls_version = tls_version_label(name)
        tls_stats.handshake(self.tls_version)

    def _head_timeout(self) -> None:
        self._timer = None
        self.timed_out = True
        self.factory.relay.stats.head_timeouts += 1
        log.debug("{addr}: no request within {t:g} s", addr=remote_address(self.transport), t=HEAD_TIMEOUT)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        receive = self._receive
        if receive is not None:
            receive(data)
        else:
            self._head_received(data)

    def connectionLost(self, reason) -> None:
        self.factory.open_connections.discard(self)
        tls_stats = self.factory.tls_stats
        if self.tls_version is not None:
            tls_stats.closed(self.tls_version)
            self.tls_version = None
        elif tls_stats is not None:
            tls_stats.handshake_failed("timeout" if self.timed_out else "tls_error" if reason.check(SSL.Error)
                                       else "closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._peer is not None:
            self._peer.connection_lost("closed by the client" if reason.check(ConnectionDone)
                                       else f"connection lost: {reason.getErrorMessage()}")
            self.transport.unregisterProducer()
            self._stream.detach()
        elif self._web is not None:
            self._web.connectionLost(reason)
        # Break our reference cycles so reference counting frees the connection
        # (derpbox.heap keeps long-lived objects out of the cyclic GC's reach).
        self._receive = self._peer = self._stream = self._web = None

    # -- the first request ------------------------------------------------

    def _head_received(self, data: bytes) -> None:
        self._buf += data
        # The head can only have ended in a chunk holding a newline; skipping the
        # re-parse otherwise keeps a byte-at-a-time client from costing quadratic time.
        if b"\n" not in data and len(self._buf) <= MAX_HEAD:
            return
        try:
            head = parse_request_head(self._buf)
        except HTTPHeadError as e:
            self._refuse(e)
            return
        if head is None:
            return
        self._timer.cancel()
        self._timer = None
        buf, self._buf = self._buf, b""
        kind = classify_derp_request(head) if head.path == "/derp" and self.factory.derp_enabled else "none"
        if kind == "none":
            self._to_web(buf)
        elif kind == "websocket":
            self._start_websocket(head, buf[head.head_length :])
        else:
            self._start_derp(head, buf[head.head_length :])

    def _to_web(self, buf: bytes) -> None:
        channel = self.factory.site.buildProtocol(self.transport.getPeer())
        self._web = channel
        self._receive = channel.dataReceived
        channel.makeConnection(self.transport)
        channel.dataReceived(buf)

    def _refuse(self, e: HTTPHeadError) -> None:
        refusals = self.factory.relay.stats.http_refusals
        refusals[str(e.status)] = refusals.get(str(e.status), 0) + 1
        # Scanners send the same junk over and over: one line per reason and minute.
        self.factory.relay.noise.info(
            f"http:{e.reason}", "{addr}: bad HTTP request: {reason}", addr=remote_address(self.transport), reason=e.reason
        )
        self.transport.write(error_response(e.status, e.reason, e.headers))
        self._buf = b""
        self._close_soon()

    def _close_soon(self) -> None:
        """Close after what was written; cut off if the client has not let go in CLOSE_GRACE."""
        self.transport.loseConnection()
        # Whatever else the client sends is not read as a request.
        self._receive = _ignore
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.factory.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _start_derp(self, head, rest: bytes) -> None:
        stats = self.factory.relay.stats
        stats.accepts += 1
        if is_fast_start(head):
            stats.fast_start_upgrades += 1
        else:
            self.transport.write(derp_switching_response(self.factory.relay.public_key))
        self._accept(head, DERPStream(self.transport), rest)

    def _start_websocket(self, head, rest: bytes) -> None:
        try:
            response = accept_response(head)
        except HTTPHeadError as e:
            self._refuse(e)
            return
        if negotiated_subprotocol(head) is None:
            # As derper: accept the handshake, then close with policy violation.
            self.transport.write(response + encode_close(CloseCode.POLICY_VIOLATION, "client must speak the derp subprotocol"))
            self._close_soon()
            return
        stats = self.factory.relay.stats
        stats.accepts += 1
        stats.websocket_accepts += 1
        self.transport.write(response)
        self._accept(head, WebSocketStream(self.transport), rest)

    def _accept(self, head, stream: DERPStream | WebSocketStream, rest: bytes) -> None:
        """Wire a peer to *stream*: the transport's push producer, fed every later read."""
        transport = self.transport
        peer = Peer(self.factory.relay, stream, remote_address(transport), not_ideal=ideal_node(head) is not None)
        self._peer = peer
        self._stream = stream
        self._receive = receive = stream.attach(peer)
        transport.registerProducer(peer, True)
        peer.start()
        if rest:
            receive(rest)


class FrontFactory(Factory):
    protocol = FrontConnection
    noisy = False

    def __init__(
        self,
        relay: Relay,
        site: Site,
        clock,
        *,
        derp_enabled: bool = True,
        tcp_keepalive: float = 600.0,
        tcp_user_timeout: float = 15.0,
        tls_stats: TLSStats | None = None,
    ):
        self.relay = relay
        # Set when this factory sits behind TLS: counts accepts and TLS versions.
        self.tls_stats = tls_stats
        # Every open connection, so a shutdown can wait for them to finish closing.
        self.open_connections: set[FrontConnection] = set()
        self.site = site
        self.clock = clock
        self.derp_enabled = derp_enabled
        self.tcp_keepalive = tcp_keepalive
        self.tcp_user_timeout = tcp_user_timeout

    def buildProtocol(self, addr):
        p = FrontConnection(self)
        p.factory = self
        return p

    def tune(self, transport) -> None:
        """Socket options derper sets; NODELAY matters: without it latency jumps to ms."""
        below = tcp_transport(transport)
        if below is None:
            return
        sock = below.socket
        if sock.family == socket.AF_UNIX:
            # A worker's internal mesh socket (derpbox.workers): no TCP options to set.
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Go's meaning: 0 picks the 15 s default, a negative value turns keepalive off.
        keepalive = self.tcp_keepalive or GO_DEFAULT_KEEPALIVE
        if keepalive > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(keepalive)))
        if self.tcp_user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.tcp_user_timeout * 1000))


def _ignore(data: bytes) -> None:
    """The input of a connection that was refused and is closing."""
