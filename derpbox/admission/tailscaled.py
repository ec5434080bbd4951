"""-verify-clients: ask the local tailscaled whether a node key is in its netmap (spec 5(a)).

``-socket`` may list several sockets, one tailscaled per tailnet (tailscale/tailscale
#11810): a client is admitted when any of them knows its key.

One HTTP/1.1 request per check over tailscaled's unix socket, on a fresh
connection each time, so a tailscaled restart (which re-creates the socket) is
picked up without restarting derpbox. There is no fail-open: whatever keeps us
from a 200 answer rejects the client. Outages are logged once when they begin and
once when they end, not once per client.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ._http import Deadline, describe_failure, read_limited, seconds_text
from .decision import Verdict

log = Logger(namespace="derpbox.admission.tailscaled")

# The -socket default search: tailscaled's Linux default, its /run spelling, and
# the tailscale/tailscale container image's TS_SOCKET default (sidecar setups).
DEFAULT_SOCKETS = (
    "/var/run/tailscale/tailscaled.sock",
    "/run/tailscale/tailscaled.sock",
    "/tmp/tailscaled.sock",
)
# tailcfg.CurrentCapabilityVersion of Tailscale 1.90 (2025-10). LocalClient sends
# its own on every request; whois does not depend on it, but send a current one.
CAPABILITY_VERSION = 130
# derper relies on the handshake context alone; a hung tailscaled must not hold
# handshakes until the relay's 10 s handshake deadline, so give up after 5 s.
DEFAULT_TIMEOUT = 5.0
# tailscaled's LocalAPI insists on this Host (or none); the name is never resolved.
LOCALAPI_URL = b"http://local-tailscaled.sock/localapi/v0/whois?addr=nodekey%3A"
WHOIS_BODY_LIMIT = 1 << 20  # a WhoIsResponse is a few KiB; refuse absurd ones
ERROR_BODY_LIMIT = 512  # enough of an error body for a log line
PROBE_KEY = bytes(32)  # the zero key: never a real node, so a healthy tailscaled says 404


@implementer(IAgentEndpointFactory)
class _SocketEndpoint:
    def __init__(self, reactor, path: str, timeout: float):
        self.reactor = reactor
        self.path = path
        self.timeout = timeout

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self.reactor, self.path, timeout=max(1, int(self.timeout + 0.999)))


class _Answer:
    """What tailscaled said. kind: found, not_found, skew, status, unreachable, timeout."""

    __slots__ = ("kind", "status", "detail", "path")

    def __init__(self, kind: str, path: str, status: int = 0, detail: str = ""):
        self.kind = kind
        self.path = path
        self.status = status
        self.detail = detail


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text[:200]


class TailscaledCheck:
    """Whois lookups of node keys through tailscaled's LocalAPI."""

    def __init__(self, reactor, socket_path: str = "", *, candidates=DEFAULT_SOCKETS, timeout=DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.configured_path = socket_path
        self.candidates = tuple(candidates)
        self.timeout = timeout
        # Episode state, so an outage or a version skew is logged once, not per client.
        self._down_since: float | None = None
        self._down_rejects = 0
        self._bad_status_logged: int | None = None

    def socket_path(self) -> str | None:
        """-socket if set (only that); else the first default that exists, looked up afresh."""
        if self.configured_path:
            return self.configured_path
        for path in self.candidates:
            if os.path.exists(path):
                return path
        return None


    @defer.inlineCallbacks
    def query(self, node_key: bytes):
        path = self.socket_path()
        if path is None:
            return _Answer("unreachable", "any of " + ", ".join(self.candidates), detail="no socket file")
        # A non-persistent pool: every lookup dials the socket anew.
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        agent = Agent.usingEndpointFactory(self.reactor, _SocketEndpoint(self.reactor, path, self.timeout), pool=pool)
        headers = Headers({b"Tailscale-Cap": [str(CAPABILITY_VERSION).encode()]})
        deadline = Deadline(self.reactor, self.timeout)
        try:
            try:
                response = yield deadline.wait(agent.request(b"GET", LOCALAPI_URL + node_key.hex().encode(), headers))
            except Exception:
                if deadline.expired:
                    return _Answer("timeout", path, detail=f"no answer within {seconds_text(self.timeout)}")
                return _Answer("unreachable", path, detail=describe_failure(Failure()))
            limit = WHOIS_BODY_LIMIT if response.code == 200 else ERROR_BODY_LIMIT
            _, done = read_limited(response, limit)
            body, failure = yield deadline.wait(done)
        finally:
            deadline.done()
        if response.code == 200:
            if failure is not None:
                if deadline.expired:
                    return _Answer("timeout", path, 200, f"whois body not complete within {seconds_text(self.timeout)}")
                return _Answer("status", path, 200, "whois body broken off: " + describe_failure(failure))
            try:
                parsed = json.loads(body)
            except ValueError as e:
                return _Answer("status", path, 200, f"whois answer is not JSON ({e})")
            if parsed is not None and not isinstance(parsed, dict):
                return _Answer("status", path, 200, "whois answer is not a JSON object")
            return _Answer("found", path, 200)
        if response.code == 404:
            return _Answer("not_found", path, 404, _snippet(body))
        if response.code == 400:
            return _Answer("skew", path, 400, _snippet(body))
        return _Answer("status", path, response.code, _snippet(body))

    @defer.inlineCallbacks
    def check(self, node_key: bytes):
        answer = yield self.query(node_key)
        self._note(answer)
        kind = answer.kind
        if kind == "found":
            return Verdict(True, "tailscaled", "node key is in the tailnet (tailscaled whois 200)", "allow")
        if kind == "not_found":
            return Verdict(False, "tailscaled", "node key not in tailnet (tailscaled 404)", "reject")
        if kind == "skew":
            return Verdict(
                False, "tailscaled", f"tailscaled too old for node-key lookups (400 {answer.detail!r})", "error"
            )
        if kind == "status":
            return Verdict(False, "tailscaled", f"tailscaled answered {answer.status}: {answer.detail}", "error")
        return Verdict(
            False, "tailscaled", f"tailscaled unreachable at {answer.path} ({answer.detail}); no fail-open", "error"
        )

    def _note(self, answer: _Answer) -> None:
        """Log the start and end of outages and of version skew, once each."""
        now = self.reactor.seconds()
        if answer.kind in ("unreachable", "timeout"):
            if self._down_since is None:
                self._down_since = now
                self._down_rejects = 0
                log.warn(
                    "tailscaled at {path} is unreachable ({detail}): every client is rejected until it is back "
                    "(-verify-clients has no fail-open)",
                    path=answer.path,
                    detail=answer.detail,
                )
            self._down_rejects += 1
            return
        if self._down_since is not None:
            log.info(
                "tailscaled at {path} is reachable again after {seconds:.0f} s ({count} client checks were rejected "
                "meanwhile)",
                path=answer.path,
                seconds=now - self._down_since,
                count=self._down_rejects,
            )
            self._down_since = None
        if answer.kind in ("skew", "status"):
            if self._bad_status_logged != answer.status:
                self._bad_status_logged = answer.status
                if answer.kind == "skew":
                    log.error(
                        "tailscaled at {path} answered 400 {detail!r} to a node-key whois: tailscaled is too old "
                        "for -verify-clients or out of sync with this relay (version skew, tailscale#12617); "
                        "every client is rejected until it is upgraded",
                        path=answer.path,
                        detail=answer.detail,
                    )
                else:
                    log.error(
                        "tailscaled at {path} answered {status} to a node-key whois ({detail}); every client is "
                        "rejected while this lasts",
                        path=answer.path,
                        status=answer.status,
                        detail=answer.detail,
                    )
        else:
            self._bad_status_logged = None

    @defer.inlineCallbacks
    def probe(self):
        """One start-up lookup of the zero key: (healthy, log line); primes the episode state."""
        answer = yield self.query(PROBE_KEY)
        path = answer.path
        if answer.kind in ("unreachable", "timeout"):
            self._down_since = self.reactor.seconds()
            self._down_rejects = 0
            return False, (
                f"tailscaled LocalAPI at {path}: unreachable ({answer.detail}); -verify-clients has no fail-open: "
                "clients will be REJECTED while it is down"
            )
        if answer.kind in ("found", "not_found"):
            return True, (
                f"tailscaled LocalAPI at {path}: reachable, node-key lookups work; -verify-clients has no fail-open: "
                "clients will be REJECTED whenever it is down"
            )
        self._bad_status_logged = answer.status
        if answer.kind == "skew":
            return False, (
                f"tailscaled LocalAPI at {path}: reachable but too old for node-key lookups (400 {answer.detail!r}, "
                "version skew): ALL clients will be REJECTED until tailscaled is upgraded"
            )
        return False, (
            f"tailscaled LocalAPI at {path}: reachable but answered {answer.status} ({answer.detail}): "
            "clients will be REJECTED while this lasts"
        )


def socket_paths(text: str) -> tuple[str, ...]:
    """-socket's comma-separated paths; empty for the default search."""
    return tuple(path.strip() for path in text.split(",") if path.strip())


class TailnetsCheck:
    """Several tailscaleds, one per tailnet, asked at once. Any one admitting admits;
    all answering "not found" rejects; otherwise (none admits, one could not answer)
    the client is rejected as an error, which is not cached: the tailnet that could not
    answer may know the key."""

    def __init__(self, checks: list[TailscaledCheck]):
        self.checks = checks

    @defer.inlineCallbacks
    def check(self, node_key: bytes):
        verdicts = yield defer.gatherResults([check.check(node_key) for check in self.checks], consumeErrors=True)
        paths = [check.configured_path for check in self.checks]
        for path, verdict in zip(paths, verdicts):
            if verdict.allow:
                return Verdict(True, "tailscaled", f"{verdict.reason} at {path}", "allow")
        failed = [f"{path}: {verdict.reason}" for path, verdict in zip(paths, verdicts) if verdict.outcome != "reject"]
        if failed:
            return Verdict(False, "tailscaled", "node key in none of the tailnets that answered; "
                           + "; ".join(failed), "error")
        return Verdict(False, "tailscaled", f"node key not in any of the {len(paths)} tailnets (tailscaled 404 "
                       "from each)", "reject")
