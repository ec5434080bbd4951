"""-verify-tailscale-api-*: admit the node keys of a tailnet on Tailscale's hosted control plane,
without a tailscaled on the relay (tailscale/tailscale#16699, open: Tailscale offers no
verify-client-url of its own).

The device list of the tailnet is fetched every -verify-tailscale-api-interval and kept as
a set of node keys; a client is admitted when its node key belongs to an authorized device
of the list. When the API fails, the last good list stays in force (logged once per outage,
``derpbox_tailscale_api_stale`` = 1, and ``derpbox healthcheck`` warns). Fail-open applies
only while no list was ever fetched: after that, a broken API never admits strangers.

Facts relied on, and where they come from:

* Base URL ``https://api.tailscale.com/api/v2/``; the access token goes as HTTP Basic user
  with an empty password, or as ``Authorization: Bearer``; error bodies are
  ``{"message": "..."}``; no pagination, all results at once (tailscale/tailscale
  publicapi/readme.md and api.md).
* ``GET /api/v2/tailnet/{tailnet}/devices``, ``{tailnet}`` "-" for the token's own tailnet;
  the answer is ``{"devices": [...]}``; each device has ``nodeKey`` ("nodekey:<64 hex>"),
  ``authorized`` and ``isExternal`` (shared in from another tailnet) in the default field
  set; ``fields=default`` or ``all`` chooses the set (api.md "Fetch a list of tailnet
  devices"; client/tailscale/devices.go sends ``fields=default``).
* OAuth clients: the client-credentials grant of OAuth 2.0 (RFC 6749 4.4) at
  ``POST /api/v2/oauth/token``; access tokens live one hour and should be renewed shortly
  before they expire; ``devices:core`` (or its read-only ``devices:core:read``) is the
  scope for the device list (tailscale.com/kb/1215/oauth-clients; the endpoint as
  cmd/k8s-operator and many clients call it). The form fields ``client_id``,
  ``client_secret``, ``grant_type=client_credentials`` and the answer's ``access_token`` and
  ``expires_in`` are RFC 6749's (4.4.2, 5.1); its errors are ``{"error": ...}`` (5.2).
* Not documented by Tailscale: an ETag on the device list (only ``/acl`` documents one, for
  ``If-Match``), and any rate limit (tailscale/tailscale#14328 asks, open). So: an ETag, if
  one ever comes, is sent back as ``If-None-Match`` and a 304 keeps the list; otherwise a
  SHA-256 of the body tells an unchanged list, which is then not parsed or rebuilt. A 429
  is handled as RFC 6585 / RFC 9110 describe it: no new request before ``Retry-After``
  (seconds or an HTTP date).

Decisions: devices not ``authorized`` are refused (they are in nobody's netmap until an
admin approves them, so a local tailscaled would not know them either); shared-in
(external) devices are admitted, as they are peers in the tailnet's netmaps. Key expiry is
not looked at: an expired node gets a new node key when it logs in again.

With -workers, every worker fetches the list itself: N workers make N requests per
interval (at the 1 min default, 4 workers make 4 a minute).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from ..counters import counter, gauge
from ._http import BytesBody, Deadline, describe_failure, read_limited, seconds_text
from .decision import Verdict
from .verify_url import USER_AGENT

log = Logger(namespace="derpbox.admission.tailscale_api")

CHECK = "tailscale_api"
DEFAULT_URL = "https://api.tailscale.com"
DEFAULT_TAILNET = "-"
DEFAULT_INTERVAL = 60.0  # derpbox.config refuses less than 10 s
TOKEN_PATH = "/api/v2/oauth/token"
REQUEST_TIMEOUT = 20.0
# A device is well under 2 KiB in the default field set: room for tens of thousands.
DEVICES_BODY_LIMIT = 64 << 20
SMALL_BODY_LIMIT = 64 << 10  # token answers and error bodies
# First retry after a failure; doubled each time, up to the interval.
RETRY_MIN = 5.0
# A Retry-After beyond this is not believed: the list would go stale for as long.
RETRY_AFTER_MAX = 3600.0
# OAuth access tokens are renewed this long before they expire (Tailscale: "shortly before").
TOKEN_MARGIN = 300.0
_NODEKEY = re.compile(r"nodekey:([0-9a-fA-F]{64})\Z")

REASONS = ("credentials", "token", "unreachable", "timeout", "unauthorized", "forbidden", "rate_limited",
           "status", "bad_answer")
RESULTS = ("changed", "unchanged", "not_modified")


class TailscaleAPIError(ValueError):
    """The Tailscale API settings cannot work (e.g. an unreadable token file)."""


class TailscaleAPIStats:
    METRICS = (
        gauge("keys", "derpbox_tailscale_api_keys",
              "Node keys of authorized devices in the Tailscale API device list in force."),
        gauge("stale", "derpbox_tailscale_api_stale",
              "1 while the last fetch of the device list failed, or none succeeded yet."),
        gauge("last_success", "derpbox_tailscale_api_last_success_unix_time",
              "When the device list was last fetched or confirmed unchanged (Unix time; 0: never)."),
        counter("fetches", "derpbox_tailscale_api_fetches",
                "Successful fetches of the device list, by result (changed, unchanged, not_modified).", ("result",)),
        counter("failures", "derpbox_tailscale_api_fetch_failures",
                "Failed fetches of the device list, by reason.", ("reason",)),
        counter("tokens", "derpbox_tailscale_api_oauth_tokens", "Access tokens obtained with the OAuth client."),
    )
    __slots__ = ("keys", "stale", "last_success", "fetches", "failures", "tokens")

    def __init__(self):
        self.keys = 0
        self.stale = 1
        self.last_success = 0.0
        self.fetches = {result: 0 for result in RESULTS}
        self.failures = {reason: 0 for reason in REASONS}
        self.tokens = 0


@dataclass(frozen=True)
class TailscaleAPIOptions:
    """What the settings say; exactly one of token, token_file and the OAuth pair is given."""

    tailnet: str = DEFAULT_TAILNET
    token: str = ""
    token_file: str = ""
    oauth_client_id: str = ""
    oauth_secret_file: str = ""
    interval: float = DEFAULT_INTERVAL
    fail_open: bool = False
    url: str = DEFAULT_URL


class FetchError(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


def read_secret(path: str, setting: str) -> str:
    """The first line of a secret file, or TailscaleAPIError naming the setting."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TailscaleAPIError(f"{setting} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text:
        raise TailscaleAPIError(f"{setting} {path}: the file is empty")
    return text


def retry_after_seconds(values: list[bytes] | None, now: float) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP date; None when absent or unreadable."""
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def api_message(body: bytes) -> str:
    """The error text of an API answer: {"message"} (API) or {"error", "error_description"} (OAuth)."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        parts = [value.get(name) for name in ("message", "error", "error_description")]
        text = ": ".join(p for p in parts if isinstance(p, str) and p)
        if text:
            return text[:200]
    return body.decode("utf-8", "replace").strip()[:200] or "no details"


def parse_devices(body: bytes) -> frozenset[bytes]:
    """The node keys (32 bytes each) of the authorized devices; FetchError if the list is unusable."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise FetchError("bad_answer", f"device list is not JSON ({e})") from None
    devices = value.get("devices") if isinstance(value, dict) else None
    if not isinstance(devices, list):
        raise FetchError("bad_answer", 'device list has no "devices" array')
    keys = set()
    for device in devices:
        if not isinstance(device, dict) or device.get("authorized") is not True:
            continue
        node_key = device.get("nodeKey")
        match = _NODEKEY.match(node_key) if isinstance(node_key, str) else None
        if match:
            keys.add(bytes.fromhex(match.group(1)))
    return frozenset(keys)


class _Http:
    """One request to the API with an overall deadline: (response, body) or FetchError."""

    def __init__(self, reactor, https_policy=None, timeout: float = REQUEST_TIMEOUT):
        self.reactor = reactor
        self.timeout = timeout
        policy = https_policy if https_policy is not None else BrowserLikePolicyForHTTPS()
        # A fresh connection each time: one request a minute gains nothing from keeping it.
        self.agent = Agent(reactor, contextFactory=policy, pool=HTTPConnectionPool(reactor, persistent=False))

    @defer.inlineCallbacks
    def request(self, method: bytes, url: str, headers: dict, body: bytes | None, limit: int):
        deadline = Deadline(self.reactor, self.timeout)
        try:
            try:
                producer = BytesBody(body) if body is not None else None
                response = yield deadline.wait(self.agent.request(method, url.encode("ascii"), Headers(headers),
                                                                  producer))
            except Exception:
                if deadline.expired:
                    raise FetchError("timeout", f"no answer within {seconds_text(self.timeout)}") from None
                raise FetchError("unreachable", describe_failure(Failure())) from None
            _, done = read_limited(response, limit)
            data, failure = yield deadline.wait(done)
        finally:
            deadline.done()
        if failure is not None:
            if deadline.expired:
                raise FetchError("timeout", f"answer not complete within {seconds_text(self.timeout)}")
            raise FetchError("unreachable", "answer broken off: " + describe_failure(failure))
        if len(data) >= limit:
            raise FetchError("bad_answer", f"answer larger than {limit} bytes")
        return response, data


class StaticToken:
    """An API access token (tskey-api-...), given or read from a file."""

    def __init__(self, value: str = "", path: str = ""):
        self.path = path
        self.value = value or read_secret(path, "-verify-tailscale-api-token-file")
        self.kind = "API access token" + (f" from {path}" if path else "")

    def token(self):
        return defer.succeed(self.value)

    def rejected(self) -> bool:
        """The API said 401: True if the file now holds another token (rotated), worth one retry."""
        if not self.path:
            return False
        try:
            # A few bytes, read once per 401 only: not worth a thread.
            value = read_secret(self.path, "-verify-tailscale-api-token-file")
        except TailscaleAPIError:
            return False
        changed, self.value = value != self.value, value
        return changed


class OAuthClient:
    """Access tokens from an OAuth client (client-credentials grant), renewed before they expire."""

    def __init__(self, http: _Http, clock, base_url: str, client_id: str, secret_file: str, stats: TailscaleAPIStats):
        self.http = http
        self.clock = clock
        self.url = base_url + TOKEN_PATH
        self.client_id = client_id
        self.secret_file = secret_file
        read_secret(secret_file, "-verify-tailscale-api-oauth-secret-file")  # unusable at start: a config error
        self.stats = stats
        self.kind = f"OAuth client {client_id}"
        self._token: str | None = None
        self._renew_at = 0.0

    @defer.inlineCallbacks
    def token(self):
        if self._token is not None and self.clock.seconds() < self._renew_at:
            return self._token
        try:
            # Read each time: a rotated secret is picked up without a restart (once an hour).
            secret = read_secret(self.secret_file, "-verify-tailscale-api-oauth-secret-file")
        except TailscaleAPIError as e:
            raise FetchError("credentials", str(e)) from None
        form = urlencode({"client_id": self.client_id, "client_secret": secret,
                          "grant_type": "client_credentials"}).encode()
        headers = {b"User-Agent": [USER_AGENT], b"Accept": [b"application/json"],
                   b"Content-Type": [b"application/x-www-form-urlencoded"]}
        try:
            response, body = yield self.http.request(b"POST", self.url, headers, form, SMALL_BODY_LIMIT)
        except FetchError as e:
            raise FetchError(e.reason, f"token endpoint: {e.detail}") from None
        if response.code == 429:
            raise FetchError("rate_limited", "token endpoint: HTTP 429",
                             retry_after_seconds(response.headers.getRawHeaders(b"retry-after"), self.clock.seconds()))
        if response.code != 200:
            raise FetchError("token", f"token endpoint answered HTTP {response.code}: {api_message(body)}")
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise TypeError
            token, lifetime = answer["access_token"], answer.get("expires_in", 3600)
            if not isinstance(token, str) or not token or not isinstance(lifetime, (int, float)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise FetchError("token", "token endpoint gave no usable access_token/expires_in") from None
        self.stats.tokens += 1
        self._token = token
        self._renew_at = self.clock.seconds() + max(0.0, lifetime - min(TOKEN_MARGIN, lifetime / 2))
        return token

    def rejected(self) -> bool:
        """The API said 401 to the current token (revoked, or expired early): get a new one once."""
        had = self._token is not None
        self._token = None
        return had


class TailscaleAPIKeys:
    """The tailnet's node keys, fetched periodically; ``check`` answers from memory."""

    def __init__(self, reactor, options: TailscaleAPIOptions, *, clock=None, https_policy=None, on_change=None,
                 timeout: float = REQUEST_TIMEOUT):
        self.clock = clock if clock is not None else reactor
        self.base = options.url.rstrip("/")
        self.fail_open = options.fail_open
        self.interval = options.interval
        self.on_change = on_change
        self.stats = TailscaleAPIStats()
        self.http = _Http(reactor, https_policy, timeout)
        if options.oauth_client_id:
            self.credentials = OAuthClient(self.http, self.clock, self.base, options.oauth_client_id,
                                           options.oauth_secret_file, self.stats)
        else:
            self.credentials = StaticToken(options.token, options.token_file)
        self.devices_url = (f"{self.base}/api/v2/tailnet/{quote(options.tailnet, safe='@.-_~')}/devices?"
                            + urlencode({"fields": "default"}))
        self.shown = f"Tailscale API {self.base} (tailnet {options.tailnet})"
        self.keys: frozenset[bytes] | None = None
        self._digest: bytes | None = None
        self._etag: bytes | None = None
        self._call = None
        self._running = False
        self._failures = 0  # in a row
        self._down_since: float | None = None
        self._down_reason: str | None = None
        self._first: list[defer.Deferred] | None = []  # probe() waiters until the first fetch ends

    # -- lifecycle -------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Fetch now, then every interval; fires when the first fetch has ended."""
        if self._running:
            return defer.succeed(None)
        self._running = True
        return self.refresh()

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # -- the check -------------------------------------------------------

    def check(self, node_key: bytes) -> Verdict:
        if self.keys is None:
            why = f"no device list from the {self.shown} yet"
            if self.fail_open:
                return Verdict(True, CHECK, why + "; fail-open admits", "fail_open")
            return Verdict(False, CHECK, why + "; fail-open is off", "error")
        stale = ""
        if self.stats.stale:
            stale = f" (list from {self.clock.seconds() - self.stats.last_success:.0f} s ago: the API is failing)"
        if node_key in self.keys:
            return Verdict(True, CHECK, f"node key of an authorized device in the tailnet{stale}", "allow")
        return Verdict(False, CHECK, f"node key not among the tailnet's authorized devices{stale}", "reject")

    # -- fetching --------------------------------------------------------

    @defer.inlineCallbacks
    def refresh(self):
        """Fetch the list once and schedule the next fetch; fires with the result or the FetchError."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        try:
            result = yield self._fetch()
        except FetchError as e:
            self._failed(e)
            result = e
        except Exception:
            log.failure("{api}: fetching the device list broke", api=self.shown)
            result = FetchError("bad_answer", "internal error")
            self._failed(result)
        else:
            self._succeeded(result)
        if self._running:
            self._call = self.clock.callLater(self._next_delay(result), self.refresh)
        waiters, self._first = self._first, None
        for waiter in waiters or ():
            waiter.callback(None)
        return result

    def _next_delay(self, result) -> float:
        if not isinstance(result, FetchError):
            return self.interval
        backoff = min(self.interval, RETRY_MIN * 2 ** min(self._failures - 1, 16))
        if result.retry_after is not None:
            return max(backoff, min(result.retry_after, RETRY_AFTER_MAX))
        return backoff

    @defer.inlineCallbacks
    def _fetch(self):
        token = yield self.credentials.token()
        response, body = yield self._get_devices(token)
        if response.code == 401 and self.credentials.rejected():
            token = yield self.credentials.token()
            response, body = yield self._get_devices(token)
        code = response.code
        if code == 304 and self._etag is not None:
            return "not_modified"
        if code != 200:
            detail = f"HTTP {code}: {api_message(body)}"
            if code == 429:
                retry = retry_after_seconds(response.headers.getRawHeaders(b"retry-after"), self.clock.seconds())
                raise FetchError("rate_limited", detail, retry)
            reason = {401: "unauthorized", 403: "forbidden"}.get(code, "status")
            raise FetchError(reason, detail)
        etags = response.headers.getRawHeaders(b"etag")
        digest = hashlib.sha256(body).digest()
        if digest == self._digest:
            self._etag = etags[0] if etags else None
            return "unchanged"
        keys = parse_devices(body)
        changed = keys != self.keys
        self.keys, self._digest, self._etag = keys, digest, etags[0] if etags else None
        if changed and self.on_change is not None:
            self.on_change()
        return "changed"

    def _get_devices(self, token: str):
        headers = {b"User-Agent": [USER_AGENT], b"Accept": [b"application/json"],
                   b"Authorization": [b"Bearer " + token.encode("latin-1", "replace")]}
        if self._etag is not None:
            headers[b"If-None-Match"] = [self._etag]
        return self.http.request(b"GET", self.devices_url, headers, None, DEVICES_BODY_LIMIT)

    def _succeeded(self, result: str) -> None:
        now = self.clock.seconds()
        stats = self.stats
        stats.fetches[result] += 1
        stats.keys = len(self.keys)
        stats.stale = 0
        stats.last_success = now
        if self._down_since is not None:
            log.info("{api} answers again after {seconds:.0f} s ({failures} failed fetches); {count} node keys "
                     "in force", api=self.shown, seconds=now - self._down_since, failures=self._failures,
                     count=len(self.keys))
        elif result == "changed":
            log.info("{api}: {count} node keys of authorized devices in force", api=self.shown, count=len(self.keys))
        self._failures = 0
        self._down_since = self._down_reason = None

    def _failed(self, error: FetchError) -> None:
        """Count every failure; log when an outage begins and when its kind changes, not every retry."""
        now = self.clock.seconds()
        self.stats.failures[error.reason] += 1
        self.stats.stale = 1
        self._failures += 1
        if self._down_since is None:
            self._down_since = now
        elif error.reason == self._down_reason:
            return
        self._down_reason = error.reason
        if self.keys is not None:
            consequence = (f"keeping the last list ({len(self.keys)} node keys, from "
                           f"{now - self.stats.last_success:.0f} s ago) until it answers")
        elif self.fail_open:
            consequence = "no list yet and fail-open is ON: clients are ADMITTED without verification until it answers"
        else:
            consequence = "no list yet: every client is REJECTED until it answers"
        log.warn("{api}: cannot fetch the device list ({detail}); {consequence}", api=self.shown,
                 detail=error.detail, consequence=consequence, reason=error.reason)

    # -- start-up probe --------------------------------------------------

    @defer.inlineCallbacks
    def probe(self):
        """(healthy, line) once the first fetch has ended."""
        if self._first is not None:
            waiter = defer.Deferred()
            self._first.append(waiter)
            yield waiter
        fail_open = (
            "fail-open is ON until a first list arrives" if self.fail_open else "fail-open is off"
        )
        where = f"{self.shown} with the {self.credentials.kind}"
        if self.keys is None:
            return False, f"{where}: no device list yet; {fail_open}: clients are " + (
                "ADMITTED" if self.fail_open else "REJECTED") + " until one arrives"
        return not self.stats.stale, (
            f"{where}: {len(self.keys)} node keys of authorized devices, refreshed every "
            f"{seconds_text(self.interval)}; the last good list is kept while the API fails ({fail_open})"
        )
