"""Running checks concurrently in daemon threads, with a deadline for all of them."""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Callable

from .results import FAIL, SKIP, CheckFailed, Result, describe_error

# A check: its name, and the function that runs it.
Check = tuple[str, Callable[[], Result]]


def skipped(name: str, why: str) -> Check:
    """A check that is not run, and says why."""
    return name, partial(Result, name, SKIP, why)


def run_checks(checks: list[Check], deadline: float) -> list[Result]:
    """Run each ``(name, fn)`` in a daemon thread; collect in order; unfinished ones FAIL."""
    results: dict[int, Result] = {}
    threads = []
    for i, (name, fn) in enumerate(checks):
        t = threading.Thread(target=_run_one, args=(results, i, name, fn), daemon=True, name=f"check-{name}")
        t.start()
        threads.append(t)
    end = time.monotonic() + deadline
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return [results.get(i) or Result(name, FAIL, f"no result within {deadline:g} s")
            for i, (name, _) in enumerate(checks)]


def _run_one(results: dict[int, Result], i: int, name: str, fn: Callable[[], Result]) -> None:
    try:
        results[i] = fn()
    except CheckFailed as e:
        results[i] = Result(name, e.status, str(e), e.diagnosis, e.data)
    except Exception as e:  # noqa: BLE001 - any error is a failed check, reported
        results[i] = Result(name, FAIL, describe_error(e))
