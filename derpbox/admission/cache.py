"""A bounded, time-limited cache of admission decisions, keyed by node key."""

from __future__ import annotations

from collections import OrderedDict

from .decision import Verdict

MAX_ENTRIES = 65536


class DecisionCache:
    """Definitive verdicts for ``ttl`` seconds; the oldest entry goes when full.

    Keyed by node key alone: a verifier that decides on Source as well would be
    asked again only after the TTL.
    """

    def __init__(self, clock, ttl: float, max_entries: int = MAX_ENTRIES):
        self.clock = clock  # anything with seconds(): the reactor, or a task.Clock in tests
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, Verdict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, verdict = entry
        if self.clock.seconds() >= expires:
            del self._entries[key]
            return None
        return verdict

    def put(self, key: bytes, verdict: Verdict) -> None:
        if not verdict.cacheable:
            return  # fail-open and errors: ask again, the backend may be back
        self._entries.pop(key, None)
        self._entries[key] = (self.clock.seconds() + self.ttl, verdict)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
