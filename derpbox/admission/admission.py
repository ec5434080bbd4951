"""The admission gate the relay consults after ClientInfo (spec 1.4 step 5, section 5).

Checks run in derper's order, tailscaled first and then the URL(s), with the
Tailscale API device list (derpbox's own) after tailscaled and the static allowlist last; every enabled check must admit, and the first rejection
ends the run. Mesh peers never get here: the relay trusts them before asking.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from . import tailscaled as _tailscaled
from . import verify_url as _verify_url
from .allowlist import Allowlist
from .cache import DecisionCache
from .decision import AdmissionStats, Decision, Verdict
from .ratelimit import PerKeyLimiter
from .tailscale_api import TailscaleAPIKeys, TailscaleAPIOptions
from .tailscaled import TailnetsCheck, TailscaledCheck, socket_paths
from .verify_url import UrlChecks, VerifyURL, display_url

log = Logger(namespace="derpbox.admission")


# Clients being asked about at once; derper has no bound (one goroutine per handshake).
MAX_CONCURRENT_CHECKS = 64


class AdmissionConfigError(ValueError):
    """A verification setting cannot work (e.g. an admission URL that is not http(s))."""


class Admission:
    def __init__(
        self,
        *,
        reactor,
        verify_clients: bool,
        socket_path: str,
        urls: tuple[str, ...],
        fail_open: bool,
        allowlist_file: str = "",
        tailscale_api: TailscaleAPIOptions | None = None,
        cache_ttl: float = 0.0,
        cache_dir: str | None = None,
        stats: AdmissionStats | None = None,
        # Below: for tests and special setups; the defaults are derper's.
        tailscaled_timeout: float = _tailscaled.DEFAULT_TIMEOUT,
        tailscaled_sockets: tuple[str, ...] = _tailscaled.DEFAULT_SOCKETS,
        url_timeout: float = _verify_url.DEFAULT_TIMEOUT,
        https_policy=None,
        allowlist_interval: float = 1.0,
        max_concurrent: int = MAX_CONCURRENT_CHECKS,
    ):
        self.reactor = reactor
        self.stats = stats if stats is not None else AdmissionStats()
        # -socket: one path (derper's), none (the default search), or one per tailnet.
        paths = socket_paths(socket_path) or ("",)
        self.tailscaled_checks = (
            [TailscaledCheck(reactor, path, candidates=tailscaled_sockets, timeout=tailscaled_timeout)
             for path in paths]
            if verify_clients
            else []
        )
        self.tailscaled = (
            self.tailscaled_checks[0] if len(self.tailscaled_checks) == 1 else TailnetsCheck(self.tailscaled_checks)
        ) if self.tailscaled_checks else None
        urls = tuple(u.strip() for u in urls if u and u.strip())
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # derper would accept it and fail (or fail open!) on every client.
                raise AdmissionConfigError(f"admission URL {display_url(url)!r} is not an http:// or https:// URL")
        self.url_checks = (
            UrlChecks([VerifyURL(reactor, u, fail_open, timeout=url_timeout, https_policy=https_policy) for u in urls])
            if urls
            else None
        )
        self.fail_open = fail_open
        # cache_dir: shared with the node's other workers (derpbox.workers).
        self.cache = DecisionCache(reactor, cache_ttl, directory=cache_dir) if cache_ttl > 0 else None
        # Raises AllowlistError (a ValueError naming the file) if the file is unusable at start.
        self.allowlist = (
            Allowlist(
                reactor,
                allowlist_file,
                interval=allowlist_interval,
                on_change=self._allowlist_changed,
                stats=self.stats,
            )
            if allowlist_file
            else None
        )
        # Raises TailscaleAPIError (a ValueError naming the setting) if its credentials are unreadable.
        self.tailscale_api = (
            TailscaleAPIKeys(reactor, tailscale_api, https_policy=https_policy, on_change=self._allowlist_changed)
            if tailscale_api is not None
            else None
        )
        if self.tailscale_api is not None:
            self.stats.tailscale_api = self.tailscale_api.stats
        self.enabled = bool(self.tailscaled or self.tailscale_api or self.url_checks or self.allowlist)
        self._slots = defer.DeferredSemaphore(max_concurrent)
        self._waiting: dict[bytes, list[defer.Deferred]] = {}
        self._rejection_log = PerKeyLimiter(reactor)
        self._fail_open_log = PerKeyLimiter(reactor)
        self._internal_log = PerKeyLimiter(reactor)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if self.allowlist is not None:
            self.allowlist.start()
        if self.tailscale_api is not None:
            self.tailscale_api.start()

    def stop(self) -> None:
        if self.allowlist is not None:
            self.allowlist.stop()
        if self.tailscale_api is not None:
            self.tailscale_api.stop()
        if self.url_checks is not None:
            for url in self.url_checks.urls:
                url.close()

    def reload(self) -> defer.Deferred:
        """Re-read the allowlist now, changed or not; fires True if a new list is in force.

        Nothing in the server calls it: the allowlist's own poll picks up a changed
        file within a second, and SIGHUP reloads only the TLS certificates. It is for
        callers that need a change in force at once (the tests).
        """
        if self.allowlist is None:
            return defer.succeed(False)
        return self.allowlist.reload()

    def _allowlist_changed(self) -> None:
        # Cached answers may rest on keys that were just removed (allowlist or Tailscale API list).
        if self.cache is not None:
            self.cache.clear()

    # -- the check -------------------------------------------------------

    def check(self, node_key: bytes, source_ip: str) -> defer.Deferred:
        """Decide on one client; fires with a Decision and never errbacks.

        At most ``max_concurrent`` clients are being asked about at once (the rest wait
        their turn, within their handshake deadline), and simultaneous checks of one key
        share one run: a flood of handshakes cannot fan out into as many backend requests.
        """
        stage = ["none"]
        try:
            decision = self._immediate(node_key, source_ip)
        except Exception:
            return defer.fail().addErrback(self._internal_error, node_key, source_ip, stage)
        if decision is not None:
            return defer.succeed(decision)
        mine = defer.Deferred()
        waiters = self._waiting.get(node_key)
        if waiters is not None:
            self.stats.shared_checks += 1
            waiters.append(mine)
            return mine
        self._waiting[node_key] = [mine]
        run = self._slots.run(self._check, node_key, source_ip, stage)
        run.addErrback(self._internal_error, node_key, source_ip, stage)
        run.addCallback(self._answer, node_key)
        return mine

    def _immediate(self, node_key: bytes, source_ip: str) -> Decision | None:
        """The decision when no backend needs asking (verification off, or cached)."""
        if len(node_key) != 32:
            raise ValueError(f"node key must be 32 bytes, got {len(node_key)}")
        key_text = "nodekey:" + node_key.hex()
        if not self.enabled:
            verdict = Verdict(True, "none", "no client verification configured", "allow")
            self.stats.count(verdict)
            return self._conclude(verdict, key_text, source_ip)
        if self.cache is not None:
            cached = self.cache.get(node_key)
            if cached is not None:
                self.stats.cache_hits += 1
                return self._conclude(cached, key_text, source_ip, cached=True)
            self.stats.cache_misses += 1
        return None

    def _answer(self, decision: Decision, node_key: bytes) -> None:
        first, *others = self._waiting.pop(node_key)
        for _ in others:
            # Each waiter was a check of its own: admitted + rejected still counts every call.
            if decision.allow:
                self.stats.admitted += 1
            else:
                self.stats.rejected += 1
        for waiter in (first, *others):
            waiter.callback(decision)

    @defer.inlineCallbacks
    def _check(self, node_key: bytes, source_ip: str, stage: list):
        key_text = "nodekey:" + node_key.hex()
        verdicts: list[Verdict] = []
        if self.tailscaled is not None:
            stage[0] = "tailscaled"
            verdicts.append((yield self.tailscaled.check(node_key)))
        if self.tailscale_api is not None and (not verdicts or verdicts[-1].allow):
            stage[0] = "tailscale_api"
            verdicts.append(self.tailscale_api.check(node_key))
        if self.url_checks is not None and (not verdicts or verdicts[-1].allow):
            stage[0] = "url"
            verdicts.append((yield self.url_checks.check(key_text, source_ip)))
        if self.allowlist is not None and (not verdicts or verdicts[-1].allow):
            stage[0] = "allowlist"
            verdicts.append(self.allowlist.check(key_text))
        for verdict in verdicts:
            self.stats.count(verdict)

        final = _all_must_admit(verdicts)
        if self.cache is not None:
            self.cache.put(node_key, final)
        return self._conclude(final, key_text, source_ip)

    def _conclude(self, verdict: Verdict, key_text: str, source_ip: str, cached: bool = False) -> Decision:
        if verdict.allow:
            self.stats.admitted += 1
        else:
            self.stats.rejected += 1
        reason = verdict.reason + " (cached)" if cached else verdict.reason
        if not verdict.allow and verdict.outcome == "reject":
            # Backend failures ("error") are logged once per outage by the backend
            # itself, not once per client.
            self._log_rejection(key_text, source_ip, verdict.check, reason)
        elif verdict.outcome == "fail_open":
            suppressed = self._fail_open_log.allow(key_text)
            if suppressed is not None:
                log.warn(
                    "admission controller unreachable; allowing client {key} from {ip}: {reason}{more}",
                    key=key_text,
                    ip=source_ip,
                    reason=reason,
                    more=_suppressed_text(suppressed),
                )
        return Decision(verdict.allow, verdict.check, reason)

    def _log_rejection(self, key_text: str, source_ip: str, check: str, reason: str) -> None:
        suppressed = self._rejection_log.allow(key_text)
        if suppressed is None:
            self.stats.rejection_logs_suppressed += 1
            return
        self.stats.rejection_logs += 1
        log.info(
            "client {key} from {ip} rejected by {check} check: {reason}{more}",
            key=key_text,
            ip=source_ip,
            check=check,
            reason=reason,
            more=_suppressed_text(suppressed),
        )

    def _internal_error(self, failure, node_key, source_ip, stage) -> Decision:
        check = stage[0]
        self.stats.internal_errors += 1
        self.stats.decisions[(check, "error")] += 1
        self.stats.rejected += 1
        if self._internal_log.allow((check, failure.type)) is not None:
            log.failure("admission: internal error in the {check} check; rejecting the client", failure, check=check)
        key_text = "nodekey:" + node_key.hex() if isinstance(node_key, bytes) else repr(node_key)
        reason = f"internal error in the {check} check ({failure.getErrorMessage()})"
        self._log_rejection(key_text, source_ip, check, reason)
        return Decision(False, check, reason)

    # -- start-up probe --------------------------------------------------

    @defer.inlineCallbacks
    def probe(self):
        """Ask every configured backend once; return (and log) one line each."""
        lines: list[tuple[bool, str]] = []  # (healthy, line)
        if not self.enabled:
            lines.append((
                True,
                "client verification: no check enabled: every client is admitted "
                "(see -verify-clients, -verify-tailscale-api-*, -verify-client-url, -verify-allowlist-file)",
            ))
        probes = []
        probes.extend(check.probe() for check in self.tailscaled_checks)
        if self.tailscale_api is not None:
            probes.append(self.tailscale_api.probe())
        if self.url_checks is not None:
            probes.extend(url.probe() for url in self.url_checks.urls)
        results = yield defer.DeferredList(probes, consumeErrors=True)
        for ok, value in results:
            lines.append(value if ok else (False, f"admission probe failed: {value.getErrorMessage()}"))
        if self.allowlist is not None:
            path, count = self.allowlist.path, len(self.allowlist.keys)
            lines.append((True, f"allowlist {path}: {count} node keys, watched for changes"))
        if self.cache is not None:
            lines.append((
                True,
                f"admission decisions are cached for {self.cache.ttl:g} s per node key"
                + (", shared by the node's workers" if self.cache.directory else "")
                + " (fail-open admits and backend errors are not cached)",
            ))
        for healthy, line in lines:
            if healthy:
                log.info("{line}", line=line)
            else:
                log.warn("{line}", line=line)
        return [line for _, line in lines]


def _all_must_admit(verdicts: list[Verdict]) -> Verdict:
    """Every enabled check must admit: the run stopped at the first rejection, which is the
    result; else an admit by the last check (fail-open if any check failed open)."""
    last = verdicts[-1]
    if not last.allow:
        return last
    if len(verdicts) == 1:
        return last
    outcome = "fail_open" if any(v.outcome == "fail_open" for v in verdicts) else "allow"
    return Verdict(True, last.check, "; ".join(v.reason for v in verdicts), outcome)


def _suppressed_text(count: int) -> str:
    if not count:
        return ""
    return f" ({count} more for this key in the last minute not logged)"
