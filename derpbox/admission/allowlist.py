"""A static allowlist of node keys, hot-reloaded (ecosystem 6.1 DERP_VERIFY_ALLOWLIST_FILE).

The file is a JSON array of ``"nodekey:<64 hex>"`` strings: the ``nodes.json``
format of hellodword/tailscale-derp-client-verifier. It is read once at start
(a bad file is a start-up error), then watched: a poll every second compares
inode, size and mtime, and ``reload()`` re-reads at once when called (SIGHUP does
not: it reloads only the TLS certificates). A broken or missing replacement never
empties the list: the previous keys stay in force and the problem is logged once.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from .decision import Verdict

log = Logger(namespace="derpbox.admission.allowlist")

POLL_INTERVAL = 1.0
_NODEKEY = re.compile(r"nodekey:[0-9a-fA-F]{64}\Z")


class AllowlistError(ValueError):
    """The allowlist file cannot be used; the message names the file and the problem."""


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def parse_allowlist(data: bytes, path: str) -> frozenset[str]:
    """The node keys in ``data`` (lower-cased), or AllowlistError saying what is wrong."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise AllowlistError(f"allowlist {path}: not UTF-8 text ({e})") from None
    except ValueError as e:
        raise AllowlistError(f"allowlist {path}: invalid JSON ({e})") from None
    if not isinstance(value, list):
        raise AllowlistError(
            f'allowlist {path}: expected a JSON array of "nodekey:<64 hex digits>" strings, '
            f"found a JSON {_json_type(value)}"
        )
    keys = set()
    for index, entry in enumerate(value):
        if not isinstance(entry, str) or not _NODEKEY.match(entry):
            shown = json.dumps(entry)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise AllowlistError(
                f'allowlist {path}: entry {index} is {shown}, expected "nodekey:" followed by 64 hex digits'
            )
        keys.add(entry.lower())
    return frozenset(keys)


def _json_type(value) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _read(path: str) -> tuple[tuple, bytes]:
    """(identity, contents), re-reading if the file changed while it was read."""
    for _ in range(3):
        before = _identity(os.stat(path))
        with open(path, "rb") as f:
            data = f.read()
        after = _identity(os.stat(path))
        if before == after:
            return after, data
    return after, data


class Allowlist:
    def __init__(self, reactor, path: str, *, interval: float = POLL_INTERVAL, on_change=None, stats=None):
        self.reactor = reactor
        self.path = path
        self.interval = interval
        self.on_change = on_change  # called after a successful reload (the cache drops old answers)
        self.stats = stats
        try:
            identity, data = _read(path)
        except OSError as e:
            raise AllowlistError(f"allowlist {path}: cannot read it ({e.strerror or e})") from None
        self.keys = parse_allowlist(data, path)
        self._identity = identity
        self._problem: tuple | None = None  # (identity or None, text) of the problem last logged
        self._loop: task.LoopingCall | None = None
        self._count_entries()
        log.info("allowlist {path}: {count} node keys loaded", path=path, count=len(self.keys))

    def _count_entries(self) -> None:
        if self.stats is not None:
            self.stats.allowlist_entries = len(self.keys)

    def check(self, node_key: str) -> Verdict:
        if node_key in self.keys:
            return Verdict(True, "allowlist", f"node key listed in allowlist {self.path}", "allow")
        return Verdict(False, "allowlist", f"node key not in allowlist {self.path}", "reject")

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self._poll)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("allowlist watcher stopped", f)
            )

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def reload(self) -> defer.Deferred:
        """Re-read the file now, changed or not. Fires with True if the new list is in force."""
        return self._poll(force=True)

    def _poll(self, force: bool = False) -> defer.Deferred:
        # stat and read in a thread: the file may sit on a slow or hung network mount.
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._look, force)
        d.addCallback(self._apply)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure) -> bool:
        log.failure("allowlist {path}: reload failed", failure, path=self.path)
        return False

    def _look(self, force: bool):
        """In a thread: ("same",) / ("missing", why) / ("changed", identity, data)."""
        try:
            if not force and _identity(os.stat(self.path)) == self._identity:
                return ("same",)
            identity, data = _read(self.path)
        except OSError as e:
            return ("missing", e.strerror or str(e))
        return ("changed", identity, data)

    def _apply(self, seen) -> bool:
        if seen[0] == "same":
            self._problem = None  # back to the version in force: a new problem is news again
            return False
        if seen[0] == "missing":
            self._report(None, f"cannot read it ({seen[1]})")
            return False
        _, identity, data = seen
        try:
            keys = parse_allowlist(data, self.path)
        except AllowlistError as e:
            self._report(identity, str(e).removeprefix(f"allowlist {self.path}: "))
            return False
        old = len(self.keys)
        self.keys, self._identity, self._problem = keys, identity, None
        self._count_entries()
        if self.stats is not None:
            self.stats.allowlist_reloads += 1
        log.info(
            "allowlist {path} reloaded: {count} node keys (was {old})", path=self.path, count=len(keys), old=old
        )
        if self.on_change is not None:
            self.on_change()
        return True

    def _report(self, identity, problem: str) -> None:
        """Log a problem once per version of the file, not once per poll."""
        if self._problem == (identity, problem):
            return
        self._problem = (identity, problem)
        if self.stats is not None:
            self.stats.allowlist_reload_errors += 1
        log.error(
            "allowlist {path} not reloaded: {problem}; keeping the previous {count} node keys",
            path=self.path,
            problem=problem,
            count=len(self.keys),
        )
