"""KeepAlive frames for every connection from one timer.

Each connection sends a KeepAlive every 60 s plus a jitter it picks once (spec 1.7). A
timer per connection (Twisted's DelayedCall) costs about 0.4 KiB of every idle
connection; here a ring of one-second slots holds the connections due in each second,
and one timer, running while anyone is on the ring, walks it. A connection costs two
dict entries, and its period is whole seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable

TICK = 1.0
# Go's derper: every 60 s + a jitter in [0, 5 s) fixed per connection. In whole ticks, and
# never sooner than 60 s: the first is due 60-65 s after the start, then every 61-65 s.
MIN_TICKS = 61
MAX_TICKS = 65
SLOTS = MAX_TICKS + 1


def keepalive_ticks() -> int:
    """A connection's period, picked once."""
    return random.randint(MIN_TICKS, MAX_TICKS)


class KeepAliveWheel:
    """Calls ``on_due`` with the items due in a tick, and puts them back a period later."""

    def __init__(self, clock, on_due: Callable[[list], None]):
        self._clock = clock
        self._on_due = on_due
        # Slot i holds {item: period in ticks} due at a tick t with t % SLOTS == i.
        self._slots: list[dict] = [{} for _ in range(SLOTS)]
        self._slot_of: dict = {}
        # Ticks done since _origin; the timer is None while the ring is empty.
        self._origin = 0.0
        self._done = 0
        self._call = None

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, item, ticks: int) -> None:
        """``item`` is due every ``ticks`` ticks, the first time ``ticks - 1`` to ``ticks`` from now."""
        if not 0 < ticks < SLOTS:
            raise ValueError(f"keepalive period of {ticks} ticks is outside 1-{SLOTS - 1}")
        self.remove(item)
        if self._call is None:
            self._origin = self._clock.seconds()
            self._done = 0
            self._schedule()
        self._put(item, ticks)

    def remove(self, item) -> None:
        slot = self._slot_of.pop(item, None)
        if slot is not None:
            del self._slots[slot][item]
            if not self._slot_of:
                self.stop()

    def stop(self) -> None:
        """Forget every item and stop the timer."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._slot_of.clear()
        for slot in self._slots:
            slot.clear()

    def _put(self, item, ticks: int) -> None:
        slot = (self._done + ticks) % SLOTS
        self._slots[slot][item] = ticks
        self._slot_of[item] = slot

    def _schedule(self) -> None:
        delay = self._origin + (self._done + 1) * TICK - self._clock.seconds()
        self._call = self._clock.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._call = None
        # A busy reactor may run the timer late: every tick that passed is done now.
        passed = int((self._clock.seconds() - self._origin) / TICK)
        due: list = []
        while self._done < passed:
            self._done += 1
            index = self._done % SLOTS
            slot = self._slots[index]
            if slot:
                self._slots[index] = {}
                for item, ticks in slot.items():
                    due.append(item)
                    self._put(item, ticks)
        if self._slot_of:
            self._schedule()
        if due:
            self._on_due(due)
