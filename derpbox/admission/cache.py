"""A bounded, time-limited cache of admission decisions, keyed by node key.

A node's workers (derpbox.workers) share theirs through a directory only they can
read, one small file a key, so a client that reconnects to another worker finds its
decision there: admission behaves the same whichever worker it lands on.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

from twisted.logger import Logger

from ..logs import LogThrottle
from .decision import Verdict

MAX_ENTRIES = 65536

log = Logger(namespace="derpbox.admission")


class DecisionCache:
    """Definitive verdicts for ``ttl`` seconds; the oldest entry goes when full.

    Keyed by node key alone: a verifier that decides on Source as well would be
    asked again only after the TTL.
    """

    def __init__(self, clock, ttl: float, max_entries: int = MAX_ENTRIES, directory: str | None = None):
        self.clock = clock  # anything with seconds(): the reactor, or a task.Clock in tests
        self.ttl = ttl
        self.max_entries = max_entries
        self.directory = directory
        self._entries: OrderedDict[bytes, tuple[float, Verdict]] = OrderedDict()
        self._next_sweep = clock.seconds() + ttl
        self._noise = LogThrottle(log, clock=clock.seconds)
        if directory is not None:
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Verdict | None:
        now = self.clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            expires, verdict = entry
            if now < expires:
                return verdict
            del self._entries[key]
        if self.directory is None:
            return None
        return self._read(key, now)

    def put(self, key: bytes, verdict: Verdict) -> None:
        if not verdict.cacheable:
            return  # fail-open and errors: ask again, the backend may be back
        now = self.clock.seconds()
        self._remember(key, now + self.ttl, verdict)
        if self.directory is not None:
            self._write(key, now + self.ttl, verdict)
            if now >= self._next_sweep:
                self._sweep(now)

    def clear(self) -> None:
        self._entries.clear()
        if self.directory is not None:
            for entry in self._files():
                _unlink(entry.path)

    def _remember(self, key: bytes, expires: float, verdict: Verdict) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (expires, verdict)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    # -- the shared directory ----------------------------------------------

    def _read(self, key: bytes, now: float) -> Verdict | None:
        try:
            with open(os.path.join(self.directory, key.hex()), "rb") as f:
                data = json.loads(f.read())
            expires = float(data["expires"])
            verdict = Verdict(bool(data["allow"]), str(data["check"]), str(data["reason"]), str(data["outcome"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._noise.warn("read", "admission cache: cannot read the entry of {node} ({error}); asking again",
                             node=key.hex()[:16], error=e)
            return None
        if now >= expires or not verdict.cacheable:
            return None
        self._remember(key, expires, verdict)
        return verdict

    def _write(self, key: bytes, expires: float, verdict: Verdict) -> None:
        path = os.path.join(self.directory, key.hex())
        temporary = f"{path}.{os.getpid()}.tmp"
        record = {"expires": expires, "allow": verdict.allow, "check": verdict.check,
                  "reason": verdict.reason, "outcome": verdict.outcome}
        try:
            with open(temporary, "w") as f:
                json.dump(record, f)
            os.replace(temporary, path)  # a reader sees the old entry or the new one, never half
        except OSError as e:
            _unlink(temporary)
            self._noise.warn("write", "admission cache: cannot share a decision in {dir} ({error})",
                             dir=self.directory, error=e)

    def _sweep(self, now: float) -> None:
        """At most once a TTL: drop expired files (by write time), then the oldest beyond the bound."""
        self._next_sweep = now + self.ttl
        live = []
        for entry in self._files():
            try:
                written = entry.stat().st_mtime
            except OSError:
                continue
            if written + self.ttl <= now:
                _unlink(entry.path)
            else:
                live.append((written, entry.path))
        if len(live) > self.max_entries:
            live.sort()
            for _, path in live[: len(live) - self.max_entries]:
                _unlink(path)

    def _files(self):
        try:
            with os.scandir(self.directory) as entries:
                return [entry for entry in entries if entry.is_file()]
        except OSError:
            return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
