"""What the kernel knows about each DERP connection: derper's ``derp_tcp_rtt`` histogram
(every connection sampled every 10 s) and the rows of ``/debug/traffic``.

Both read ``TCP_INFO`` once per connection, a system call each: the walk over the
connections runs in slices of ``SLICE`` with the reactor serving everyone else in
between, so ten thousand connections never stall it for the whole walk.
"""

from __future__ import annotations

import json
import socket
import time

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..counters import counter
from ..relay.peer import ACTIVE
from ..tcpinfo import read_tcp_info
from .connection import tcp_transport

log = Logger(namespace="derpbox.tcpstats")

SAMPLE_INTERVAL = 10.0  # derper samples each connection every 10 s
SLICE = 256
# derper's bucket labels, literally; an RTT lands in the first bound it does not exceed.
RTT_BOUNDS_MS = ((10, "10ms"), (20, "20ms"), (50, "50ms"), (100, "100ms"), (150, "150ms"), (250, "250ms"),
                 (500, "500ms"))
RTT_LABELS = tuple(label for _, label in RTT_BOUNDS_MS) + ("inf", "non-tcp", "error")
DISABLE_ENV = "TS_DERP_DISABLE_RTT_STATS"


def rtt_label(rtt_us: int) -> str:
    ms = rtt_us / 1000
    for bound, label in RTT_BOUNDS_MS:
        if ms <= bound:
            return label
    return "inf"


def peer_socket(peer) -> socket.socket | None:
    """The TCP socket under a peer's stream; None for another worker's unix-socket link."""
    tcp = tcp_transport(getattr(peer.conn, "transport", None))
    sock = tcp.socket if tcp is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


class RTTStats:
    METRICS = (
        counter("tcp_rtt", "derp_tcp_rtt", "Connections sampled every 10 s, by smoothed TCP round-trip time "
                "(non-tcp: not a TCP connection; error: TCP_INFO unreadable).", ("le",)),
    )
    __slots__ = ("tcp_rtt",)

    def __init__(self) -> None:
        self.tcp_rtt = dict.fromkeys(RTT_LABELS, 0)

    def sample(self, peer) -> None:
        sock = peer_socket(peer)
        if sock is None:
            self.tcp_rtt["non-tcp"] += 1
            return
        try:
            info = read_tcp_info(sock)
        except (OSError, ValueError):
            self.tcp_rtt["error"] += 1
            return
        self.tcp_rtt[rtt_label(info.rtt_us)] += 1


def in_slices(items, each, size: int = SLICE):
    """Call ``each`` on every item, ``size`` per reactor pass; fires when all are done."""

    def work():
        for i, item in enumerate(items):
            each(item)
            if i % size == size - 1:
                yield None

    return task.cooperate(work()).whenDone()


class RTTSampler:
    """Samples every connection of the relay, like derper's per-connection loop; the service
    calls ``sample_all`` every SAMPLE_INTERVAL (its timer waits for a walk to end)."""

    def __init__(self, relay, stats: RTTStats):
        self.relay = relay
        self.stats = stats

    def sample_all(self):
        peers = [p for p in self.relay.peers() if p.state == ACTIVE]
        return in_slices(peers, self._sample_one)

    def _sample_one(self, peer) -> None:
        if peer.state == ACTIVE:
            self.stats.sample(peer)


def traffic_row(peer, now: float | None = None) -> dict:
    """One connection for /debug/traffic: who, and what the kernel says about its path."""
    row = {
        "Time": round(time.time() if now is None else now, 3),
        "Key": "nodekey:" + peer.key.hex()[:16],
        "Addr": f"{peer.remote[0]}:{peer.remote[1]}",
        "Mesh": peer.is_mesh,
        "UniqueSenders": len(peer.heard_from or ()),
        "DERPBytesIn": peer.bytes_in,
        "DERPBytesOut": peer.bytes_out,
    }
    sock = peer_socket(peer)
    if sock is None:
        row["TCP"] = None
        return row
    try:
        info = read_tcp_info(sock)
    except (OSError, ValueError) as e:
        row["TCP"] = {"Error": str(e)}
        return row
    row["TCP"] = {
        "RTTMs": info.rtt_us / 1000,
        "RTTVarMs": info.rttvar_us / 1000,
        "Cwnd": info.snd_cwnd,
        "Retrans": info.total_retrans,
        "Sent": info.bytes_acked,
        "Recv": info.bytes_received,
    }
    return row


TRAFFIC_INTERVAL = 2.0  # derper's /debug/traffic writes every 2 s
# A watcher that stops reading is dropped after this long, so it cannot grow our buffers.
STALLED_WATCHER = 30.0


@implementer(IPushProducer)
class TrafficStream:
    """``/debug/traffic``: one JSON line per connection every TRAFFIC_INTERVAL (NDJSON, as
    derper), or one round with ``?once=1``. Written under the request's flow control."""

    def __init__(self, request, relay, clock, *, once: bool, on_done):
        self.request = request
        self.relay = relay
        self.clock = clock
        self.once = once
        self._on_done = on_done
        self._call = None
        self._paused_at: float | None = None
        self._done = False
        request.notifyFinish().addBoth(self._finished)
        request.registerProducer(self, True)

    def start(self) -> None:
        self._round()

    def _round(self) -> None:
        self._call = None
        if self._done:
            return
        if self._paused_at is not None:
            if self.clock.seconds() - self._paused_at > STALLED_WATCHER:
                self.request.loseConnection()
                return
            self._call = self.clock.callLater(TRAFFIC_INTERVAL, self._round)
            return
        now = time.time()
        peers = [p for p in self.relay.peers() if p.state == ACTIVE]
        in_slices(peers, lambda peer: self._write(peer, now)).addCallback(self._round_done)

    def _write(self, peer, now: float) -> None:
        if not self._done and peer.state == ACTIVE:
            self.request.write(json.dumps(traffic_row(peer, now), separators=(",", ":")).encode() + b"\n")

    def _round_done(self, _) -> None:
        if self._done:
            return
        if self.once:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self._call = self.clock.callLater(TRAFFIC_INTERVAL, self._round)

    def _finished(self, _) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._on_done()

    # IPushProducer: the request's transport says when its buffer is full.
    def pauseProducing(self) -> None:
        if self._paused_at is None:
            self._paused_at = self.clock.seconds()

    def resumeProducing(self) -> None:
        self._paused_at = None

    def stopProducing(self) -> None:
        self._done = True
