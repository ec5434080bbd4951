"""At most one log line per key per interval, counting the ones held back."""

from __future__ import annotations

from collections import OrderedDict

INTERVAL = 60.0
MAX_KEYS = 65536


class PerKeyLimiter:
    def __init__(self, clock, interval: float = INTERVAL, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        # key -> [time of the last line, lines suppressed since]
        self._seen: OrderedDict[object, list] = OrderedDict()

    def allow(self, key) -> int | None:
        """None if a line for ``key`` is due later; else how many were suppressed before this one."""
        now = self.clock.seconds()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        suppressed = entry[1] if entry is not None else 0
        self._seen.pop(key, None)
        self._seen[key] = [now, 0]
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return suppressed
