"""Keeping the heap quiet under many long-lived connections.

Python's cyclic GC walks every tracked object in a full (generation 2) collection.
With thousands of idle connections that walk stalls the reactor for tens of
milliseconds, which shows up as relay latency and drops. Connections are freed by
reference counting (Twisted and derpbox break their cycles on close), so
long-lived objects are moved out of the collector's sight with ``gc.freeze()``
every few seconds, right after a collection of the young generations, so fresh cyclic
garbage is freed rather than frozen (a closed TLS connection can leave one: the failure
that ended it holds a traceback whose frames refer back to it); a rare full collection
catches anything frozen anyway. glibc's ``malloc_trim`` then hands freed pages back to
the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

FREEZE_INTERVAL = 2.0
FULL_COLLECT_INTERVAL = 3600.0
TRIM_INTERVAL = 60.0


def _malloc_trim():
    """glibc's malloc_trim, or None on other C libraries (e.g. musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def freeze_young() -> None:
    """Free the young generations' cyclic garbage, then freeze what is left."""
    gc.collect(1)
    gc.freeze()


def full_collect() -> None:
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    log.debug("full GC: {found} unreachable objects in {ms:.1f} ms", found=found,
              ms=(time.perf_counter() - started) * 1000)


class HeapService(Service):
    def __init__(self):
        trim = _malloc_trim()
        self._loops = [(LoopingCall(freeze_young), FREEZE_INTERVAL),
                       (LoopingCall(full_collect), FULL_COLLECT_INTERVAL)]
        if trim is not None:
            self._loops.append((LoopingCall(trim, 0), TRIM_INTERVAL))

    def startService(self):
        super().startService()
        for loop, interval in self._loops:
            # Not at once: a full collection at start-up would only delay it.
            loop.start(interval, now=False)

    def stopService(self):
        super().stopService()
        for loop, _ in self._loops:
            if loop.running:
                loop.stop()
        gc.unfreeze()
