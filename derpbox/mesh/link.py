"""One outbound DERP connection to a mesh peer: the asynchronous DERP client on Twisted.

It speaks the client side through the sans-IO codecs (``protocol.client_handshake``,
``protocol.frames``): the server's own node key as the client key, the mesh key in
ClientInfo, WatchConns right after the handshake, fast start when the peer's TLS 1.3
chain carries the meta-certificate. It reports what the peer announces to its
``MeshPeer`` and carries ForwardPacket frames the other way, coalesced per reactor
pass. While the peer does not read, the connections whose packets wait for it are not
read either, as Go's sender blocks on its mesh write (``Peer.hold``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..protocol.client_handshake import ClientHandshake
from ..protocol.frames import (
    KEY_LEN,
    SERVER_FRAME_BOUNDS,
    WATCH_CONNS_FRAME,
    FrameError,
    FrameReader,
    FrameType,
    pack_header,
    parse_peer_gone,
    parse_peer_present,
    pong_frame,
)
from ..protocol.handshake import HANDSHAKE_TIMEOUT, HandshakeError
from ..sendnow import write_now
from ..tls.client import TLSIdentityError
from ..tls.metacert import meta_certificate_key

if TYPE_CHECKING:
    from .peers import MeshPeer

log = Logger()

USER_AGENT = "derpbox-mesh"
# A ForwardPacket write the peer does not take within this long closes the link (as Go's mesh client).
FORWARD_STALL_TIMEOUT = 5.0
# What may wait for a paused peer before packets are dropped (queue_tail). Senders are held
# at the first packet that waits, so only what their last reads carried comes on top.
MAX_PENDING_BYTES = 4 << 20
# The server sends a keepalive every 60-65 s; silence for longer means the link is dead.
READ_IDLE_TIMEOUT = 150.0

_FORWARD = FrameType.FORWARD_PACKET
_FORWARD_OVERHEAD = 2 * KEY_LEN


@implementer(IHandshakeListener, IPushProducer)
class MeshLink(Protocol):
    def __init__(self, peer: MeshPeer, tls):
        self.peer = peer
        self.tls = tls
        self.handshake: ClientHandshake | None = None
        self.ready = False
        self.frames_seen = 0
        self.dirty = False
        self.paused = False
        self._reader = FrameReader(SERVER_FRAME_BOUNDS)
        self._out: list[bytes] = []
        self._pending = 0
        # Connections held (not read) until the peer takes our writes again.
        self._held_senders: list = []
        self._timer = None
        self._stall_timer = None
        self._closing = False

    # -- connecting -------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer.link_connected(self)
        self.transport.registerProducer(self, True)
        self._timer = self.peer.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if self.tls is None:
            self._start(meta_key=None)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done; check who answered, then speak DERP."""
        conn = self.transport.getHandle()
        try:
            self.tls.check_identity(conn)
        except TLSIdentityError as e:
            self.fail(str(e))
            return
        meta_key = None
        # The Go client trusts the meta-certificate only on TLS 1.3 (spec 8.3).
        if conn.get_protocol_version_name() == "TLSv1.3":
            meta_key = meta_certificate_key([c.to_cryptography() for c in conn.get_peer_cert_chain() or ()])
        if meta_key == self.peer.own_key:
            self.peer.self_connected()
            self._close()
            return
        self._start(meta_key)

    def _start(self, meta_key: bytes | None) -> None:
        info = {"version": 2, "meshKey": self.peer.mesh_key.hex(), "CanAckPings": True}
        self.handshake = ClientHandshake(self.peer.private_key, info, self.peer.host_header,
                                         user_agent=USER_AGENT, meta_key=meta_key)
        self.transport.write(self.handshake.start())

    def _handshake_timeout(self) -> None:
        self._timer = None
        self.fail(f"no DERP handshake within {HANDSHAKE_TIMEOUT:g} s")

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self.ready:
            data = self._handshake_received(data)
            if not self.ready:
                return
        else:
            self._arm_idle_timer()
        try:
            frames = self._reader.feed(data) if data else ()
        except FrameError as e:
            self.fail(f"bad frame from the peer: {e}")
            return
        for ftype, payload in frames:
            self._frame(ftype, payload)
            if self._closing:
                return
        self.peer.relay.flush()

    def _handshake_received(self, data: bytes) -> bytes:
        hs = self.handshake
        if hs is None:
            # Bytes before our request: nothing a DERP server sends.
            self.fail("the peer spoke before the DERP upgrade request")
            return b""
        try:
            out = hs.feed(data)
        except HandshakeError as e:
            self.fail(f"DERP handshake failed: {e}")
            return b""
        if hs.server_key is not None and hs.server_key == self.peer.own_key:
            self.peer.self_connected()
            self._close()
            return b""
        if out:
            self.transport.write(out)
        if not hs.ready:
            return b""
        self.ready = True
        self.transport.write(WATCH_CONNS_FRAME)
        self.peer.link_ready(self, hs.server_key)
        early, hs.frames = hs.frames, []
        for ftype, payload in early:
            self._frame(ftype, payload)
        self._arm_idle_timer()
        return b""

    def _frame(self, ftype: int, payload) -> None:
        self.frames_seen += 1
        if ftype == FrameType.PEER_PRESENT:
            key, _, _, flags = parse_peer_present(payload)
            self.peer.present(key, flags)
        elif ftype == FrameType.PEER_GONE:
            key, reason = parse_peer_gone(payload)
            self.peer.gone(key, reason)
        elif ftype == FrameType.PING:
            self.transport.write(pong_frame(bytes(payload[:8])))
        elif ftype == FrameType.RESTARTING:
            log.info("mesh({peer}): the peer is restarting", peer=self.peer.name)

    def _arm_idle_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(READ_IDLE_TIMEOUT)
        else:
            self._timer = self.peer.clock.callLater(READ_IDLE_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._timer = None
        self.fail(f"nothing from the peer for {READ_IDLE_TIMEOUT:g} s")

    # -- output: ForwardPacket ---------------------------------------------

    def forward(self, src: bytes, dst: bytes, packet, disco: bool, sender=None) -> None:
        """Queue a ForwardPacket frame; written at the relay's next flush. ``sender``, the
        connection it came from, is held while the peer does not take our writes."""
        size = len(packet)
        if self.paused:
            if sender is not None and not sender.link_held:
                sender.hold()
                self._held_senders.append(sender)
            if self._pending > MAX_PENDING_BYTES:
                self.peer.relay.stats.drop("queue_tail", disco, size)
                return
        self._out.append(b"".join((pack_header(_FORWARD, _FORWARD_OVERHEAD + size), src, dst, packet)))
        self._pending += size
        if not self.dirty:
            self.dirty = True
            self.peer.relay.needs_flush(self)

    def flush_if_writable(self) -> None:
        self.dirty = False
        if not self.paused:
            self._write_out()

    def _write_out(self) -> None:
        if self._out and not self._closing:
            data = b"".join(self._out)
            self._out.clear()
            self._pending = 0
            write_now(self.transport, data)

    # IPushProducer: Twisted tells us when the peer stops taking our writes.
    def pauseProducing(self) -> None:
        self.paused = True
        if self._stall_timer is None:
            self._stall_timer = self.peer.clock.callLater(FORWARD_STALL_TIMEOUT, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._write_out()
        self._release()

    def _release(self) -> None:
        held, self._held_senders = self._held_senders, []
        for sender in held:
            sender.release()

    def stopProducing(self) -> None:
        self.paused = True

    def _stalled(self) -> None:
        self._stall_timer = None
        self.fail(f"ForwardPacket writes stalled for {FORWARD_STALL_TIMEOUT:g} s")

    # -- closing ------------------------------------------------------------

    def fail(self, reason: str) -> None:
        if self._closing:
            return
        self.peer.link_failed(self, reason)
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        self._closing = True
        self._cancel_timers()
        self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def close(self) -> None:
        """Close on purpose (the peer was removed, or the server stops)."""
        if not self._closing:
            self._close()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._stall_timer = None

    def connectionLost(self, reason) -> None:
        self._cancel_timers()
        self._closing = True
        self._out.clear()
        self.peer.link_lost(self, reason)
        # Their packets for the peer's keys now go elsewhere or are dropped as write errors.
        self._release()
