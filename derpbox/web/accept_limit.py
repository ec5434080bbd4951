"""derper's ``-accept-connection-limit`` and ``-accept-connection-burst`` on the TLS listener.

A token bucket, as Go's ``rate.Limiter.Allow``, is asked once per accepted connection;
a connection over the limit is closed at once (no TLS handshake, no buffers) and
counted in ``tls_listener_rejected_connections``.
"""

from __future__ import annotations

import math

from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger(namespace="derpbox.accept")

# One folded line at most this often while connections are being refused.
LOG_INTERVAL = 60.0


class AcceptBucket:
    """Go's ``rate.NewLimiter(limit, burst).Allow()``: starts full; an infinite limit
    allows everything; a zero burst with a finite limit allows nothing."""

    __slots__ = ("limit", "burst", "tokens", "at")

    def __init__(self, limit: float, burst: int, now: float):
        self.limit = limit
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def allow(self, now: float) -> bool:
        if self.limit == math.inf:
            return True
        tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.limit)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class AcceptLimitedFactory(Factory):
    """Wraps the listener's factory. Returning no protocol makes Twisted's port close the
    socket right after accept, before anything is read or allocated for it."""

    def __init__(self, wrapped: Factory, bucket: AcceptBucket, stats, clock):
        self.wrapped = wrapped
        self.bucket = bucket
        self.stats = stats
        self.clock = clock
        self._refused_since_log = 0
        self._logged_at: float | None = None

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        now = self.clock.seconds()
        if self.bucket.allow(now):
            return self.wrapped.buildProtocol(addr)
        self.stats.rejected_connections += 1
        self._refused_since_log += 1
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            log.warn("accept limit reached: closed {n} new connection(s) at once{since} "
                     "(-accept-connection-limit {limit:g}/s, -accept-connection-burst {burst})",
                     n=self._refused_since_log,
                     since="" if self._logged_at is None else f" in the last {now - self._logged_at:.0f} s",
                     limit=self.bucket.limit, burst=self.bucket.burst)
            self._logged_at = now
            self._refused_since_log = 0
        return None
