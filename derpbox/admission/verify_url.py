"""-verify-client-url: ask an admission controller over HTTP(S) (spec 5(b), 5(c)).

Mirrors derper's use of Go's default http.Client:

* ``POST <url>`` with the compact JSON ``{"NodePublic":"nodekey:<hex>","Source":"<ip>"}``
  and no Content-Type; 5 s for the whole exchange, redirects included.
* Redirects as Go follows them: 301/302/303 become a GET without body, 307/308
  repeat the POST with its body; a 3xx without Location is the final answer;
  the tenth redirect in a row is an error.
* The answer must be exactly 200; its body is read up to 4 KiB and its first JSON
  value decoded as ``{"Allow": bool}`` (field name case-insensitive, extra
  fields ignored, anything after the first value ignored, as json.Decoder does).
* fail-open admits only when the round trip failed before a response arrived
  (refused, DNS, TLS, timeout before headers, a broken redirect). A non-200
  status, a bad body or a body that stalls past the deadline always reject.

Several URLs (one per tailnet) are asked together; see UrlChecks.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseNeverReceived
from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed
from twisted.web.http_headers import Headers

from derpbox import __version__

from ._http import BytesBody, Deadline, describe_failure, read_limited, seconds_text
from .decision import Verdict

log = Logger(namespace="derpbox.admission.url")

DEFAULT_TIMEOUT = 5.0  # derper: context.WithTimeout(ctx, 5*time.Second)
BODY_LIMIT = 4 << 10  # derper: io.LimitReader(res.Body, 4<<10)
MAX_REQUESTS = 10  # Go's default CheckRedirect: "stopped after 10 redirects"
# Idle connections kept per admission server (Go's http.DefaultClient keeps 2 per host).
KEPT_CONNECTIONS = 4
# A kept connection the server closed while idle fails the next request before any answer.
_NOT_ANSWERED = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)
PROBE_KEY = "nodekey:" + "0" * 64
USER_AGENT = f"derpbox/{__version__}".encode()
_JSON_SPACE = " \t\r\n"


def display_url(url: str) -> str:
    """The URL for logs, without any user:password part."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def go_source(ip: str) -> str:
    """Source as Go's netip.Addr marshals it: canonical text, IPv4-mapped unwrapped, "" if unparsable."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None and addr.scope_id is None:
        addr = addr.ipv4_mapped
    return str(addr)


def request_body(node_key: str, source: str) -> bytes:
    """DERPAdmitClientRequest, byte for byte as Go's json.Marshal writes it."""
    text = json.dumps({"NodePublic": node_key, "Source": source}, separators=(",", ":"))
    # Go escapes these for HTML safety; only a zone name could contain them.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so names can be matched like Go does."""


def _no_constants(name):
    raise ValueError(f"invalid JSON literal {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_no_constants)


def _first_value(buf: bytes):
    """(value, None) for the first whole JSON value in ``buf``, or (None, error text)."""
    text = buf.decode("utf-8", "replace").lstrip(_JSON_SPACE)
    if not text:
        return None, "empty body"
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError as e:
        return None, f"invalid JSON ({e})"
    return value, None


def _value_complete(buf: bytes) -> bool:
    # Objects, arrays and strings end unambiguously; bare literals need EOF.
    value, err = _first_value(buf)
    return err is None and isinstance(value, (_Pairs, list, str))


def decode_admit_response(buf: bytes) -> tuple[bool | None, str]:
    """DERPAdmitClientResponse from a body: (allow, "") or (None, why it does not decode)."""
    value, err = _first_value(buf)
    if err is not None:
        return None, err
    if value is None:
        return False, ""  # JSON null leaves the zero value, Allow false
    if not isinstance(value, _Pairs):
        return None, f"JSON {type(value).__name__} where an object was expected"
    allow = False
    for name, field in value:
        if name.lower() != "allow":
            continue
        if field is None:
            continue  # null leaves the field alone
        if not isinstance(field, bool):
            return None, f"Allow is {json.dumps(field)[:40]}, not a bool"
        allow = field
    return allow, ""


class _Answer:
    """kind: allow, deny, failed (no response: fail-open applies), status (non-200), bad_body."""

    __slots__ = ("kind", "status", "detail")

    def __init__(self, kind: str, status: int = 0, detail: str = ""):
        self.kind = kind
        self.status = status
        self.detail = detail


def _redirect_method(method: bytes, code: int) -> tuple[bytes, bool] | None:
    """Go's redirectBehavior: (next method, resend body) or None when not a redirect."""
    if code in (301, 302, 303):
        return (method if method in (b"GET", b"HEAD") else b"GET"), False
    if code in (307, 308):
        return method, True
    return None


_URL_SAFE = "/%:@!$&'()*+,;=-._~?#[]"


def _wire(url: str) -> tuple[bytes, bytes | None]:
    """The request URL as ASCII bytes, and the Basic credentials Go derives from user:password@ in it."""
    parts = urlsplit(url)
    auth = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        token = f"{unquote(user)}:{unquote(password)}".encode()
        auth = b"Basic " + base64.b64encode(token)
    host = parts.hostname or ""
    if not host.isascii():
        try:
            netloc = netloc.lower().replace(host, host.encode("idna").decode("ascii"))
        except UnicodeError:
            pass  # then the request fails before a response, like Go's Do() error
    path = quote(parts.path, safe=_URL_SAFE)
    query = quote(parts.query, safe=_URL_SAFE)
    return urlunsplit((parts.scheme, netloc, path or "/", query, "")).encode("ascii", "replace"), auth


def _referer(previous: str, new: str) -> str | None:
    """Go sets Referer to the previous URL on redirects, except https -> http, without user info."""
    prev = urlsplit(previous)
    if prev.scheme == "https" and urlsplit(new).scheme == "http":
        return None
    return display_url(previous)


def _discard(response) -> None:
    """Drop a body unread (its connection is then closed, not kept)."""
    read_limited(response, 0)


class VerifyURL:
    """One admission URL."""

    def __init__(self, reactor, url: str, fail_open: bool, *, timeout=DEFAULT_TIMEOUT, https_policy=None):
        self.reactor = reactor
        self.url = url
        self.shown = display_url(url)
        self.fail_open = fail_open
        self.timeout = timeout
        # Twisted's default policy verifies the certificate chain and host name.
        policy = https_policy if https_policy is not None else BrowserLikePolicyForHTTPS()
        # Connections are kept and reused, as Go's http.DefaultClient does: a check then
        # costs no connect and no name lookup (and Twisted leaves a little memory behind
        # with every connect by host name).
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = KEPT_CONNECTIONS
        self.agent = Agent(reactor, contextFactory=policy, pool=self.pool)
        self._bad_since: float | None = None
        self._bad_key: tuple | None = None

    @defer.inlineCallbacks
    def query(self, node_key: str, source: str):
        deadline = Deadline(self.reactor, self.timeout)
        try:
            return (yield self._exchange(node_key, source, deadline))
        finally:
            deadline.done()

    @defer.inlineCallbacks
    def _exchange(self, node_key: str, source: str, deadline: Deadline):
        payload = request_body(node_key, go_source(source))
        method, body, url, referer = b"POST", payload, self.url, None
        for sent in range(1, MAX_REQUESTS + 1):
            wire, auth = _wire(url)
            headers = Headers({b"User-Agent": [USER_AGENT]})
            if auth is not None:
                headers.addRawHeader(b"Authorization", auth)
            if referer:
                headers.addRawHeader(b"Referer", referer.encode("ascii", "replace"))
            try:
                response = yield self._request(method, wire, headers, body, deadline)
            except Exception:
                if deadline.expired:
                    return _Answer("failed", detail=f"no response within {seconds_text(self.timeout)}")
                return _Answer("failed", detail=describe_failure(Failure()))
            follow = _redirect_method(method, response.code)
            location = response.headers.getRawHeaders(b"location")
            if follow is None or not location or not location[0]:
                break  # not a redirect, or one without Location: Go returns it as the answer
            _discard(response)
            if sent == MAX_REQUESTS:
                return _Answer("failed", detail=f"stopped after {MAX_REQUESTS} redirects")
            try:
                target = urljoin(url, location[0].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return _Answer("failed", detail=f"bad redirect Location ({e})")
            method, include_body = follow
            body = payload if include_body else None
            referer = _referer(url, target)
            url = target

        if response.code != 200:
            _discard(response)
            return _Answer("status", response.code, f"HTTP {response.code} {response.phrase.decode('latin-1')}")
        _, done = read_limited(response, BODY_LIMIT, _value_complete, self.reactor)
        data, failure = yield deadline.wait(done)
        allow, problem = decode_admit_response(data)
        if allow is None:
            if failure is not None:
                if deadline.expired:
                    problem = f"body not complete within {seconds_text(self.timeout)}"
                else:
                    problem = "body broken off: " + describe_failure(failure)
            elif len(data) >= BODY_LIMIT:
                problem = f"no whole JSON value in the first {BODY_LIMIT} bytes"
            return _Answer("bad_body", 200, problem)
        return _Answer("allow" if allow else "deny", 200)

    @defer.inlineCallbacks
    def _request(self, method: bytes, wire: bytes, headers: Headers, body: bytes | None, deadline: Deadline):
        """One request; sent again when it failed before any answer on a kept connection the
        server had closed (Go's transport does the same: the check is a query, safe to repeat).
        Each kept connection can be stale at most once, so the tries are bounded by them."""
        for attempt in range(KEPT_CONNECTIONS + 1):
            try:
                producer = BytesBody(body) if body is not None else None
                return (yield deadline.wait(self.agent.request(method, wire, headers, producer)))
            except _NOT_ANSWERED:
                if deadline.expired or attempt == KEPT_CONNECTIONS:
                    raise

    def close(self) -> defer.Deferred:
        """Close the kept connections (the server stops)."""
        return self.pool.closeCachedConnections()

    def verdict(self, answer: _Answer) -> Verdict:
        kind = answer.kind
        if kind == "allow":
            return Verdict(True, "url", f"admission URL {self.shown} allows", "allow")
        if kind == "deny":
            return Verdict(False, "url", f"admission URL {self.shown} denies (Allow:false)", "reject")
        if kind == "failed":
            down = f"admission URL {self.shown} unreachable ({answer.detail})"
            if self.fail_open:
                return Verdict(True, "url", down + "; fail-open admits", "fail_open")
            return Verdict(False, "url", down + "; fail-open is off", "error")
        if kind == "status":
            return Verdict(False, "url", f"admission URL {self.shown} answered {answer.detail}", "error")
        return Verdict(False, "url", f"admission URL {self.shown} gave a bad answer: {answer.detail}", "error")

    @defer.inlineCallbacks
    def check(self, node_key: str, source: str):
        answer = yield self.query(node_key, source)
        self._note(answer)
        return self.verdict(answer)

    def _note(self, answer: _Answer) -> None:
        """Log when this URL starts and stops failing (once per episode, not per client)."""
        now = self.reactor.seconds()
        if answer.kind in ("allow", "deny"):
            if self._bad_since is not None:
                log.info(
                    "admission URL {url} answers properly again after {seconds:.0f} s",
                    url=self.shown,
                    seconds=now - self._bad_since,
                )
            self._bad_since = self._bad_key = None
            return
        key = (answer.kind, answer.status)
        if key == self._bad_key:
            return
        if self._bad_since is None:
            self._bad_since = now
        self._bad_key = key
        if answer.kind == "failed":
            consequence = (
                "fail-open is ON: clients are ADMITTED without verification while it is down"
                if self.fail_open
                else "fail-open is off: clients are rejected while it is down"
            )
            log.warn("admission URL {url} is unreachable ({detail}); {consequence}", url=self.shown,
                     detail=answer.detail, consequence=consequence)
        else:
            log.error("admission URL {url} is failing ({detail}); clients are rejected while this lasts",
                      url=self.shown, detail=answer.detail)

    @defer.inlineCallbacks
    def probe(self):
        """One start-up request for the zero key: (healthy, log line). fail-open ON never counts as healthy."""
        answer = yield self.query(PROBE_KEY, "")
        fail_open = "ON" if self.fail_open else "off"
        if answer.kind == "failed":
            self._bad_since, self._bad_key = self.reactor.seconds(), ("failed", 0)
            then = f"clients will be {'ADMITTED' if self.fail_open else 'REJECTED'} while it is down"
            return False, f"admission URL {self.shown}: unreachable ({answer.detail}); fail-open is {fail_open}: {then}"
        if answer.kind in ("status", "bad_body"):
            self._bad_since, self._bad_key = self.reactor.seconds(), (answer.kind, answer.status)
            return False, (
                f"admission URL {self.shown}: reachable but answered badly ({answer.detail}); clients will be "
                "REJECTED while this lasts (fail-open does not apply to bad answers)"
            )
        then = (
            "fail-open is ON: clients will be ADMITTED without verification if it goes down"
            if self.fail_open
            else "fail-open is off: clients will be REJECTED if it goes down"
        )
        if answer.kind == "allow":
            return False, (
                f"admission URL {self.shown}: reachable, but it ALLOWED the all-zero probe key: it may admit "
                f"everyone; {then}"
            )
        return not self.fail_open, (
            f"admission URL {self.shown}: reachable (Allow:false for a probe key, as expected); {then}"
        )


class UrlChecks:
    """All admission URLs, one per tailnet, asked concurrently.

    A client is admitted if ANY URL admits it: each URL stands for a tailnet, and
    derper's rule per URL includes fail-open. So an explicit Allow from any URL
    admits at once (the others finish in the background, for their episode
    logging only). Otherwise, once all have answered, a fail-open from an
    unreachable URL admits: that tailnet's members must not be locked out because
    another tailnet's verifier said no. Otherwise the client is rejected.
    """

    def __init__(self, urls: list[VerifyURL]):
        self.urls = urls

    def check(self, node_key: str, source: str) -> defer.Deferred:
        if len(self.urls) == 1:
            return self.urls[0].check(node_key, source)
        result: defer.Deferred = defer.Deferred()
        pending = [url.check(node_key, source) for url in self.urls]
        verdicts: list[Verdict | None] = [None] * len(pending)
        remaining = [len(pending)]

        def arrived(verdict, index):
            verdicts[index] = verdict
            remaining[0] -= 1
            if result.called:
                return
            if verdict.outcome == "allow":
                result.callback(verdict)
            elif remaining[0] == 0:
                result.callback(_any_fail_open_admits([v for v in verdicts if v is not None]))

        def broke(failure, index):
            # Not expected (check catches its own errors); count it as an error verdict.
            verdict = Verdict(False, "url", f"admission URL {self.urls[index].shown}: internal error "
                              f"({failure.getErrorMessage()})", "error")
            arrived(verdict, index)

        for index, d in enumerate(pending):
            d.addCallbacks(arrived, broke, callbackArgs=(index,), errbackArgs=(index,))
        return result


def _any_fail_open_admits(verdicts: list[Verdict]) -> Verdict:
    """The rest of the any-URL rule once no URL admitted: a fail-open from any URL admits,
    else the client is rejected (as an error if some URL could not be asked)."""
    for v in verdicts:
        if v.outcome == "fail_open":
            return v
    outcome = "reject" if all(v.outcome == "reject" for v in verdicts) else "error"
    return Verdict(False, "url", "; ".join(v.reason for v in verdicts), outcome)
