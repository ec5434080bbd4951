"""Logging: readable text or one JSON object per line, and throttling of noise.

Scanners and misconfigured clients can trigger the same log line on every
connection; ``LogThrottle`` keeps one line per key and interval and carries the
count of suppressed ones on the next line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, TextIO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

from .counters import counter

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
# Keys remembered per throttle; beyond this the oldest are forgotten.
MAX_KEYS = 4096


class LogThrottle:
    """Log at most one line per *interval* seconds per key, counting the ones dropped."""

    def __init__(self, logger: Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, level: LogLevel, key: str, format: str, **kwargs: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if last is None and len(self._last) >= MAX_KEYS:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._suppressed.pop(oldest, None)
        self._last.pop(key, None)
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            format += " ({suppressed} similar lines suppressed)"
        self._log.emit(level, format, suppressed=suppressed, **kwargs)

    def warn(self, key: str, format: str, **kwargs: object) -> None:
        self.emit(LogLevel.warn, key, format, **kwargs)

    def info(self, key: str, format: str, **kwargs: object) -> None:
        self.emit(LogLevel.info, key, format, **kwargs)


def _json_line(event: dict) -> str:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + f".{int(event.get('log_time', 0) * 1000) % 1000:03d}Z",
        "level": event["log_level"].name if event.get("log_level") else "info",
        "logger": event.get("log_namespace", ""),
        "msg": formatEvent(event),
    }
    if "worker" in event:
        record["worker"] = event["worker"]
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_observer(stream: TextIO) -> FileLogObserver:
    """One JSON object per line: time, level, logger, msg (and error)."""
    return FileLogObserver(stream, _json_line)


_FACTORY_NOISE = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


def _quiet_twisted(event) -> PredicateResult:
    """Twisted announces every port through the legacy log ("X starting on N") and
    every client factory (one per admission request); derpbox logs what matters
    itself, so those lines are debug noise unless errors."""
    legacy = event.get("log_namespace") == "log_legacy" and not event.get("isError")
    if legacy or event.get("log_format") in _FACTORY_NOISE:
        event["log_level"] = LogLevel.debug
    return PredicateResult.maybe


def _tag_worker(index: int):
    """Every line of a worker process says which worker wrote it (text: [worker1#info])."""
    system = f"worker{index}"

    def tag(event) -> PredicateResult:
        event["log_system"] = system
        event["worker"] = index
        return PredicateResult.maybe

    return tag


class AcceptRefusals:
    """Connections closed unread because the process is at its open-file limit.

    Twisted's accept loop handles EMFILE itself (it frees a reserved descriptor and closes
    each waiting connection) and logs three lines per refused connection. Its events are
    the only place these refusals show, so they are counted here, and folded into one
    warning a minute with the count.
    """

    METRICS = (counter("refused", "derpbox_accept_refusals_fd_limit",
                       "Connections closed unread because the open-file limit was reached."),)
    REFUSED = ("EMFILE recovery: Closed socket from {address}", "Could not accept new connection ({acceptError})")
    NOISE = ("EMFILE encountered; releasing reserved file descriptor.", "Re-reserving EMFILE recovery file descriptor.")

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refused = 0
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._since = 0

    def __call__(self, event) -> PredicateResult:
        fmt = event.get("log_format")
        if fmt in self.NOISE:
            return PredicateResult.no
        if fmt not in self.REFUSED:
            return PredicateResult.maybe
        self.refused += 1
        self._since += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return PredicateResult.no
        self._last = now
        event["log_format"] = ("refusing new connections: the open-file limit is reached ({refused_since} since the "
                               "last such line); raise it (LimitNOFILE, ulimit -n) or see what holds the files")
        event["refused_since"], self._since = self._since, 0
        event["log_level"] = LogLevel.warn
        return PredicateResult.maybe


ACCEPT_REFUSALS = AcceptRefusals()


def start_logging(level: str, fmt: str, stream: TextIO = sys.stderr, worker: int | None = None) -> None:
    observer = json_observer(stream) if fmt == "json" else textFileLogObserver(stream)
    predicates = [ACCEPT_REFUSALS, _quiet_twisted, LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])]
    if worker is not None:
        predicates.insert(0, _tag_worker(worker))
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, predicates)], redirectStandardIO=False)
