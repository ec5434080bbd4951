"""One client connection as the relay sees it: handshake, frame dispatch, queues.

The transport adapter feeds stream bytes in with ``feed`` and provides ``conn``
(write/abort/close). The peer is the transport's push producer, so a slow reader
pauses only its own writes: packets for it wait in two bounded queues (disco and
other) that drop their oldest entry when full (spec 1.7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from ..netaddr import host_port
from ..protocol.frames import (
    CLIENT_FRAME_BOUNDS,
    HEADER_LEN,
    KEY_LEN,
    FrameError,
    FrameReader,
    FrameType,
    PeerGoneReason,
    peer_gone_frame,
    pong_frame,
)
from ..protocol.handshake import HANDSHAKE_TIMEOUT, HandshakeError, read_client_info
from .keepalive import keepalive_ticks

if TYPE_CHECKING:
    from .relay import Relay

log = Logger()

RECV_HEADER_LEN = HEADER_LEN + KEY_LEN
NOT_HERE_RATE = 1.0
NOT_HERE_BURST = 3.0

_SEND = FrameType.SEND_PACKET
_PING = FrameType.PING
_NOTE_PREFERRED = FrameType.NOTE_PREFERRED
_FORWARD = FrameType.FORWARD_PACKET
_WATCH = FrameType.WATCH_CONNS
_CLOSE_PEER = FrameType.CLOSE_PEER

HANDSHAKE, ADMITTING, ACTIVE, CLOSED = "handshake", "admitting", "active", "closed"
# What a client may send while its admission is pending before it is cut off.
MAX_HELD = 1 << 20
# DERP frames handled for one connection per reactor pass. A 256 KiB read of real packets
# is about 200 frames; a flood of tiny frames waits for the next pass, after everyone else.
FRAMES_PER_PASS = 512
# The largest ClientInfo accepted: a real one is a few hundred bytes (derper allows 256 KiB,
# which would let a client that never finishes its handshake hold that much).
HANDSHAKE_CLIENT_INFO_MAX = 16 << 10


class Conn(Protocol):
    """What a transport adapter gives a peer."""

    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


@implementer(IPushProducer)
class Peer:
    __slots__ = (
        "relay",
        "conn",
        "remote",
        "key",
        "info",
        "state",
        "is_mesh",
        "is_worker",
        "not_ideal",
        "preferred",
        "connected_at",
        "bytes_in",
        "bytes_out",
        "dirty",
        "paused",
        "disco_q",
        "data_q",
        "queued_at",
        "ctrl",
        "pong",
        "heard_from",
        "mesh_updates",
        "bucket",
        "_waiting",
        "_prepaid",
        "link_held",
        "_handshake_buf",
        "_held",
        "_reader",
        "_not_here_tokens",
        "_not_here_at",
        "_timer",
        "_write_timer",
        "_go_on_timer",
    )

    def __init__(self, relay: Relay, conn: Conn, remote: tuple[str, int], *, not_ideal: bool = False):
        self.relay = relay
        self.conn = conn
        self.remote = remote
        self.key = b""
        self.info = None
        self.state = HANDSHAKE
        self.is_mesh = False
        # A link from another worker of this node (derpbox.workers), which is a mesh peer too.
        self.is_worker = False
        self.not_ideal = not_ideal
        self.preferred = False
        self.connected_at = 0.0
        # DERP bytes (frames, TLS and WebSocket framing excluded), for the disconnect line.
        self.bytes_in = 0
        self.bytes_out = 0
        self.dirty = False
        self.paused = False
        # Lists, not deques: an empty deque costs ~600 bytes per idle connection
        # and queues never exceed a few dozen entries.
        self.disco_q = []
        self.data_q = []
        # When the packet queues last went from empty to not (derp_average_queue_duration_ms).
        self.queued_at = 0.0
        self.ctrl = []
        self.pong = None
        # Keys this connection received packets from (None until the first): the relay
        # tells it PeerGone when one leaves the region, and forgets it when it closes.
        self.heard_from = None
        # PeerPresent/PeerGone frames queued for this watcher since its last write.
        self.mesh_updates = 0
        # The receive rate limit's bucket (derpbox.relay.receive_limit), None when unlimited.
        self.bucket = None
        # Reading paused by this peer (its pass budget spent, or the rate limit), with frames
        # left in the reader; _prepaid: how many of them were charged to the bucket already.
        self._waiting = False
        self._prepaid = 0
        # Reading paused because a mesh link this connection forwards to is full (hold).
        self.link_held = False
        self._handshake_buf = b""
        self._held = b""
        self._reader = None
        self._not_here_tokens = NOT_HERE_BURST
        self._not_here_at = 0.0
        self._timer = None
        self._write_timer = None
        self._go_on_timer = None

    def __repr__(self):
        key = self.key.hex()[:8] if self.key else "?"
        return f"<Peer {key} {self.remote[0]}:{self.remote[1]} {self.state}>"

    def describe(self) -> str:
        """For log lines: the key's first hex digits and the client's address."""
        return f"client {self.key.hex()[:8] if self.key else '?'} from {host_port(self.remote[0], self.remote[1])}"

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Send ServerKey and arm the handshake deadline (spec 1.4)."""
        self.conn.write(self.relay.handshake.server_key_frame)
        self._timer = self.relay.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._timer = None
        pending = " (admission check pending)" if self.state == ADMITTING else ""
        self.fail(f"handshake not completed within {HANDSHAKE_TIMEOUT:g} s{pending}")

    def fail(self, reason: str) -> None:
        """Close this connection for a protocol violation; logged once."""
        if self.state == CLOSED:
            return
        if self.state != ACTIVE:
            self.relay.stats.handshake_failures += 1
        else:
            self.relay.stats.protocol_errors += 1
        # Identical reasons (a scanner repeating itself) are folded into one line a minute.
        # A string, not the peer: a log buffer must not keep the closed connection alive.
        self.relay.noise.info(reason, "closing {peer}: {reason}", peer=self.describe(), reason=reason)
        self.conn.abort()
        self.connection_lost(reason)

    def close(self) -> None:
        """Close after writing what is queued (used by ClosePeer and shutdown)."""
        if self.state == CLOSED:
            return
        self._flush()
        self.conn.close()
        self.connection_lost("closed by the server")

    def connection_lost(self, reason: str = "closed by the client") -> None:
        if self.state == CLOSED:
            return
        was_active = self.state == ACTIVE
        self.state = CLOSED
        self._cancel_timers()
        self._held = b""
        if was_active:
            # Strings, not the peer: a log buffer must not keep a closed connection alive.
            log.debug("{who} disconnected after {duration:.1f} s, {bytes_in} bytes in, {bytes_out} out: {reason}",
                      who=self.describe(), duration=self.relay.clock.seconds() - self.connected_at,
                      bytes_in=self.bytes_in, bytes_out=self.bytes_out, reason=reason)
            self.relay.keepalives.remove(self)
            self.relay.unregister(self)
            self.relay.flush()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._write_timer, self._go_on_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._write_timer = self._go_on_timer = None

    # -- input -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.state == HANDSHAKE:
            data = self._feed_handshake(data)
            if not data:
                return
        elif self.state != ACTIVE:
            if self.state == ADMITTING:
                self._hold(data)
            return
        if self._waiting or self.link_held:
            # Reading is paused, but a TLS layer may still hand over what it already decrypted.
            self._reader.hold(data)
            return
        self._read(data)

    def _read(self, data: bytes) -> None:
        reader = self._reader
        try:
            frames = reader.feed(data, FRAMES_PER_PASS)
        except FrameError as e:
            self.fail(str(e))
            return
        relay = self.relay
        relay.note_activity(self)
        if self.bucket is not None:
            frames = self._within_rate(frames)
        self._dispatch(frames)
        relay.flush()
        if reader.more and not self._waiting and not self.link_held and self.state == ACTIVE:
            # More frames than one pass handles: the rest after everyone else's turn.
            self._wait(0.0)

    def _dispatch(self, frames) -> None:
        relay = self.relay
        send_packet = relay.send_packet
        for frame in frames:
            ftype, payload = frame
            if ftype == _SEND:
                send_packet(self, payload)
            elif ftype == _FORWARD and self.is_mesh:
                relay.forward_in(self, payload)
            elif ftype == _PING:
                self._on_ping(payload)
            elif ftype == _NOTE_PREFERRED:
                self._on_note_preferred(payload[0] != 0)
            elif ftype == _FORWARD or ftype == _WATCH or ftype == _CLOSE_PEER:
                if not self.is_mesh:
                    self.fail(f"{FrameType(ftype).name} requires the mesh key: insufficient permissions")
                    break
                relay.mesh_frame(self, ftype, payload)
            if self.state == CLOSED:
                break
            if self.link_held:
                # Go's sender blocks in the mesh write: the rest waits, unread, for release().
                rest = frames[next(i for i, f in enumerate(frames) if f is frame) + 1:]
                self._reader.unread(rest)
                if self.bucket is not None:
                    self._prepaid += len(rest)
                break

    def _within_rate(self, frames):
        """The frames the receive rate limit lets through now. At the first frame that
        overdraws the bucket, that frame and the rest go back to the reader and reading
        pauses until the debt is paid, as derper waits before reading a frame's body."""
        bucket = self.bucket
        now = self.relay.clock.seconds()
        first = self._prepaid
        self._prepaid = max(0, first - len(frames))
        for i in range(first, len(frames)):
            wait = bucket.take(len(frames[i][1]), now)
            if wait:
                self._reader.unread(frames[i:])
                self._prepaid = 1
                self.relay.rate_limits.waited += 1
                self._wait(wait)
                return frames[:i]
        return frames

    def set_bucket(self, bucket) -> None:
        """A new receive rate limit (or none): a new, full bucket, owed nothing."""
        self.bucket = bucket
        self._prepaid = 0

    def _wait(self, delay: float) -> None:
        self._waiting = True
        self.conn.pause_reading()
        self._go_on_timer = self.relay.clock.callLater(delay, self._go_on)

    def _go_on(self) -> None:
        self._go_on_timer = None
        self._waiting = False
        if not self.link_held:
            self._go_on_reading()

    def _go_on_reading(self) -> None:
        """Handle what the reader kept, then read the socket again unless paused anew."""
        self._read(b"")
        if not self._waiting and not self.link_held and self.state == ACTIVE:
            self.conn.resume_reading()

    def hold(self) -> None:
        """A mesh link this connection forwards to is full: read nothing more until
        ``release`` (derper's sender blocks on the mesh write, so its socket backs up to
        the client, instead of reading on and dropping at the link)."""
        if not self.link_held and self.state == ACTIVE:
            self.link_held = True
            self.relay.stats.mesh_forward_holds += 1
            self.conn.pause_reading()

    def release(self) -> None:
        """The mesh link drained: go on with what was held back, then read again."""
        if not self.link_held:
            return
        self.link_held = False
        if not self._waiting and self.state == ACTIVE:
            self._go_on_reading()

    def _feed_handshake(self, data: bytes) -> bytes:
        if self._handshake_buf:
            # Collected in place: a ClientInfo trickled in tiny pieces costs no copying per piece.
            self._handshake_buf += data
            buf = self._handshake_buf
        else:
            buf = data
        try:
            got = read_client_info(buf, HANDSHAKE_CLIENT_INFO_MAX)
            if got is None:
                if buf is data:
                    self._handshake_buf = bytearray(data)
                return b""
            payload, used = got
            info, box = self.relay.handshake.open_client_info(payload)
        except HandshakeError as e:
            self.fail(str(e))
            return b""
        self._handshake_buf = b""
        self.key = info.key
        self.info = info
        self.is_mesh = self.relay.is_mesh_key(info.mesh_key)
        self.is_worker = self.relay.is_worker_key(info.mesh_key)
        rest = bytes(buf[used:])
        # A valid mesh key admits and skips every check (spec 1.4, step 5).
        pending = self.relay.admission_check(self.key, self.remote[0], info.mesh_key)
        if pending is None:
            self._activate(box)
            return rest
        self.state = ADMITTING
        self._held = bytes(rest)
        # The client may send packets before ServerInfo; they wait, unread, for the decision.
        self.conn.pause_reading()
        pending.addCallback(self._admitted, box)
        return b""

    def _admitted(self, decision, box) -> None:
        if self.state != ADMITTING:
            return
        if not decision.allow:
            # Closed after ServerKey and before ServerInfo, as derper; the admission
            # layer logs why (rate-limited per key), so no line per connection here.
            self.relay.stats.admission_rejections += 1
            self.state = CLOSED
            self._cancel_timers()
            self.conn.abort()
            return
        held, self._held = self._held, b""
        self._activate(box)
        self.conn.resume_reading()
        if held:
            self.feed(held)

    def _activate(self, box) -> None:
        self._timer.cancel()
        self._timer = None
        self._reader = FrameReader(CLIENT_FRAME_BOUNDS)
        self.state = ACTIVE
        self.connected_at = self.relay.clock.seconds()
        self.relay.register(self)
        limits = self.relay.rate_limits
        if limits is not None and not self.is_mesh:
            self.set_bucket(limits.new_bucket(self.connected_at))
        log.debug("{who} connected{kind}", who=self.describe(),
                  kind=" (another worker)" if self.is_worker else " (mesh peer)" if self.is_mesh else "")
        self.conn.write(self.relay.handshake.server_info_frame(box))
        # Registering queued PeerPresent for mesh watchers; send it now.
        self.relay.flush()
        self.relay.keepalives.add(self, keepalive_ticks())

    def _hold(self, data: bytes) -> None:
        # Reading is paused, but a TLS layer may still hand over what it already decrypted.
        self._held += data
        if len(self._held) > MAX_HELD:
            self.fail(f"sent over {MAX_HELD} bytes while its admission was pending")

    def _on_ping(self, payload) -> None:
        self.relay.stats.got_ping += 1
        # One pending pong at most; more pings while one waits are ignored (spec 1.5).
        if self.pong is None:
            self.pong = bytes(payload[:8])
            self.mark_dirty()

    def _on_note_preferred(self, preferred: bool) -> None:
        if preferred == self.preferred:
            return
        self.preferred = preferred
        stats = self.relay.stats
        stats.current_home_connections += 1 if preferred else -1
        if self.relay.clock.seconds() - self.connected_at > 5.0:
            if preferred:
                stats.home_moves_in += 1
            else:
                stats.home_moves_out += 1

    def not_here_allowed(self) -> bool:
        """Token bucket for PeerGone(NotHere): 1 per second, burst 3 (spec 1.6)."""
        now = self.relay.clock.seconds()
        tokens = min(NOT_HERE_BURST, self._not_here_tokens + (now - self._not_here_at) * NOT_HERE_RATE)
        self._not_here_at = now
        if tokens < 1.0:
            self._not_here_tokens = tokens
            return False
        self._not_here_tokens = tokens - 1.0
        return True

    # -- output ----------------------------------------------------------

    def enqueue_packet(self, frame: bytes, disco: bool) -> None:
        """Queue a RecvPacket frame, dropping the oldest queued one when full."""
        q = self.disco_q if disco else self.data_q
        if not self.data_q and not self.disco_q:
            self.queued_at = self.relay.clock.seconds()
        elif len(q) >= self.relay.queue_depth:
            if not self.paused:
                # One read can carry more packets for us than a queue holds; a
                # writable transport takes them now rather than dropping any.
                self._flush()
                self.queued_at = self.relay.clock.seconds()
            else:
                old = q.pop(0)
                self.relay.stats.drop("queue_head", disco, len(old) - RECV_HEADER_LEN)
        q.append(frame)
        if not self.dirty:
            self.dirty = True
            self.relay.needs_flush(self)

    def note_heard_from(self, key: bytes) -> None:
        if self.heard_from is None:
            self.heard_from = set()
        self.heard_from.add(key)

    def forget_heard_from(self, key: bytes) -> None:
        if self.heard_from is not None:
            self.heard_from.discard(key)

    def send_control(self, frame: bytes) -> None:
        """Queue a frame that is never dropped (PeerGone, PeerPresent, KeepAlive)."""
        self.ctrl.append(frame)
        self.mark_dirty()

    def send_mesh_update(self, frame: bytes) -> None:
        """A PeerPresent or PeerGone for a mesh watcher, counted into derper's batch histograms."""
        self.mesh_updates += 1
        self.send_control(frame)

    def send_peer_gone(self, key: bytes, reason: PeerGoneReason) -> None:
        stats = self.relay.stats
        if reason == PeerGoneReason.NOT_HERE:
            stats.peer_gone_not_here_frames += 1
        else:
            stats.peer_gone_disconnected_frames += 1
        self.send_control(peer_gone_frame(key, reason))

    def mark_dirty(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.relay.needs_flush(self)

    def _flush(self) -> None:
        """Write everything queued in one write, so TLS seals one record per batch."""
        parts = self.ctrl
        if parts:
            self.ctrl = []
            if self.mesh_updates:
                stats = self.relay.stats
                stats.mesh_update_batch_size.observe(self.mesh_updates)
                stats.mesh_update_loop_count.observe(1)
                self.mesh_updates = 0
        else:
            parts = []
        if self.pong is not None:
            parts.append(pong_frame(self.pong))
            self.pong = None
            self.relay.stats.sent_pong += 1
        npackets = len(self.disco_q) + len(self.data_q)
        if npackets:
            ctrl_len = sum(map(len, parts))
            parts.extend(self.disco_q)
            parts.extend(self.data_q)
            self.disco_q.clear()
            self.data_q.clear()
            data = b"".join(parts)
            stats = self.relay.stats
            stats.packets_sent += npackets
            stats.bytes_sent += len(data) - ctrl_len - npackets * RECV_HEADER_LEN
            # The oldest packet's wait stands for the batch's.
            stats.note_queue_time(self.relay.clock.seconds() - self.queued_at, npackets)
        elif parts:
            data = b"".join(parts)
            stats = self.relay.stats
        else:
            return
        stats.buffered_write_frames.observe_int(len(parts))
        self.bytes_out += len(data)
        self.conn.write(data)

    def flush_if_writable(self) -> None:
        self.dirty = False
        if not self.paused and self.state != CLOSED:
            self._flush()

    def drop_queued(self) -> None:
        """Count what a closing connection leaves unsent (spec 1.7)."""
        stats = self.relay.stats
        for q, disco in ((self.disco_q, True), (self.data_q, False)):
            for frame in q:
                stats.drop("gone_disconnected", disco, len(frame) - RECV_HEADER_LEN)
            q.clear()

    # -- IPushProducer: the transport tells us when its buffer is full ----

    def pauseProducing(self) -> None:
        self.paused = True
        timeout = self.relay.write_timeout_for(self)
        if timeout and self._write_timer is None and self.state != CLOSED:
            self._write_timer = self.relay.clock.callLater(timeout, self._write_timed_out)

    def resumeProducing(self) -> None:
        self.paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.state != CLOSED:
            self._flush()

    def stopProducing(self) -> None:
        self.paused = True

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.relay.stats.sclient_write_timeouts += 1
        self.fail(f"write blocked for {self.relay.write_timeout_for(self):g} s")
