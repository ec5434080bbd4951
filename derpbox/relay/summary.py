"""One info line a minute: what the relay did since the last one.

An operator tailing the log sees the relay working (or not) without a metrics stack:
connections, packets and drops by reason. A relay with no connections and nothing to
report stays quiet.
"""

from __future__ import annotations

from twisted.logger import Logger

from .stats import RelayStats

INTERVAL = 60.0

log = Logger(namespace="derpbox.relay")

_COUNTED = ("accepts", "packets_received", "packets_sent", "packets_forwarded_in", "packets_forwarded_out")


class TrafficSummary:
    def __init__(self, stats: RelayStats, clock, interval: float = INTERVAL):
        self.stats = stats
        self.clock = clock
        self.interval = interval
        self._last = self._snapshot()
        self._last_at = clock.seconds()

    def _snapshot(self) -> tuple[dict, dict]:
        stats = self.stats
        return {name: getattr(stats, name) for name in _COUNTED}, dict(stats.dropped_packets)

    def line(self) -> str | None:
        """The summary since the previous call, or None when there is nothing to say."""
        counts, drops = self._snapshot()
        before, drops_before = self._last
        now = self.clock.seconds()
        elapsed, self._last_at = now - self._last_at, now
        self._last = counts, drops
        delta = {name: counts[name] - before[name] for name in _COUNTED}
        dropped: dict[str, int] = {}
        for (reason, _kind), n in drops.items():
            if n - drops_before[(reason, _kind)]:
                dropped[reason] = dropped.get(reason, 0) + n - drops_before[(reason, _kind)]
        current = self.stats.current_connections
        if not current and not any(delta.values()) and not dropped:
            return None
        drop_text = (f"dropped {sum(dropped.values())} ("
                     + ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items())) + ")"
                     if dropped else "none dropped")
        return (f"last {elapsed:.0f} s: {current} connections ({delta['accepts']} new), "
                f"{delta['packets_received']} packets received, {delta['packets_sent']} sent, "
                f"{delta['packets_forwarded_out']} forwarded out, {delta['packets_forwarded_in']} in; {drop_text}")

    def report(self) -> None:
        text = self.line()
        if text is not None:
            log.info("{summary}", summary=text)
