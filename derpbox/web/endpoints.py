"""HTTP endpoints of the main DERP listener (spec 2.2), as a twisted.web Site.

The DERP connection protocol answers a `/derp` upgrade on the first request of a
connection itself; every other request, on that connection or later keep-alive
ones, is served by the Site built here.
"""

from __future__ import annotations

import re
from html import escape
from http import HTTPStatus

from twisted.internet import defer
from twisted.web import http, server
from twisted.web.resource import Resource

from ..bootstrap_dns import BootstrapDNS
from ..netaddr import remote_address

__all__ = [
    "BROWSER_HEADERS",
    "Generate204Resource",
    "QuietSite",
    "add_browser_headers",
    "build_main_site",
    "http_error",
    "reply",
]

BROWSER_HEADERS = {
    b"Strict-Transport-Security": b"max-age=63072000; includeSubDomains",
    b"Content-Security-Policy": (
        b"default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
        b"base-uri 'self'; block-all-mixed-content; object-src 'none'"
    ),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
}

_NO_CACHE = b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
# Go's idle/read timeout on derper's HTTP servers.
_IDLE_TIMEOUT = 30


def add_browser_headers(request: server.Request) -> None:
    for name, value in BROWSER_HEADERS.items():
        request.setHeader(name, value)


def reply(request: server.Request, body: bytes) -> bytes:
    """Return `body` for render(), with its length declared also for HEAD.

    Twisted logs a warning for every HEAD render that returns a body, so HEAD
    gets the GET Content-Length and an empty body instead.
    """
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


def reply_later(request: server.Request, body: defer.Deferred) -> int:
    """For render(): answer with what ``body`` fires with (bytes), or 500 with its error."""
    # A client that left before the answer gets none (Twisted raises on finishing it).
    gone: list = []
    request.notifyFinish().addErrback(gone.append)

    def done(data: bytes) -> None:
        if not gone and not request.finished:
            request.write(reply(request, data))
            request.finish()

    def failed(failure) -> None:
        if not gone and not request.finished:
            request.write(http_error(request, 500, failure.getErrorMessage()))
            request.finish()

    body.addCallbacks(done, failed)
    return server.NOT_DONE_YET


def http_error(request: server.Request, code: int, message: str) -> bytes:
    """Plain-text error shaped like Go's http.Error, which clients may match on."""
    return reply(request, error_body(request, code, message))


def error_body(request: server.Request, code: int, message: str) -> bytes:
    """http_error's status, headers and body, for a body that is sent later (reply_later)."""
    # The reason phrase too: Twisted knows no 426 and would send "Unknown Status".
    request.setResponseCode(code, HTTPStatus(code).phrase.encode())
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return message.encode() + b"\n"


class _Request(server.Request):
    # Go sends no Content-Type for an empty body; Twisted would claim text/html.
    defaultContentType = None

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # Scanners fingerprint "Server: TwistedWeb/x"; derper sends none.
            self.responseHeaders.removeHeader(b"Server")
            # A 204 must not carry Content-Length (RFC 9110 8.6).
            if self.code == http.NO_CONTENT:
                self.responseHeaders.removeHeader(b"Content-Length")
        super().write(data)


# A whole request, head and body, must arrive within this: Twisted's own timeout is an
# idle timer that every byte resets, so a request trickled a byte at a time held its
# connection (and a file descriptor) forever.
REQUEST_DEADLINE = 30.0
# After a refusal the connection closes: a TLS close waits for the client's close_notify,
# which a misbehaving client never sends, so it is cut off this long after the reply.
CLOSE_GRACE = 2.0
_NO_BODY = b"no endpoint takes a request body\n"
_BODY_REFUSED = (b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_NO_BODY), _NO_BODY))


class BoundedHTTPChannel(http.HTTPChannel):
    """HTTP/1.1 for derpbox's endpoints: none takes a request body (a 10 GiB
    Content-Length would otherwise be spooled to disk), and each request has a deadline."""

    _deadline = None
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        # After the 413 the rest of the request (a body trickled on) is not parsed.
        if not self._refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes):
        if self._deadline is None:
            self._deadline = self.callLater(REQUEST_DEADLINE, self._too_slow)
        return super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if self.length or request.requestHeaders.hasHeader(b"transfer-encoding"):
            self._refused = True
            self.transport.write(_BODY_REFUSED)
            self.transport.loseConnection()
            self._stop_deadline()
            self._deadline = self.callLater(CLOSE_GRACE, self._too_slow)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def connectionLost(self, reason) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.transport.abortConnection()


class QuietSite(server.Site):
    """Site without access logging, Server header or HTTP/2, with bounded requests."""

    protocol = BoundedHTTPChannel
    requestFactory = _Request

    def __init__(self, resource: Resource, reactor=None) -> None:
        super().__init__(resource, timeout=_IDLE_TIMEOUT, reactor=reactor)

    def log(self, request: server.Request) -> None:
        # A relay is probed constantly; one log line per request is noise.
        pass

    def acceptableProtocols(self) -> list[bytes]:
        # DERP upgrades need HTTP/1.1; never negotiate h2 through ALPN.
        return [b"http/1.1"]


class _Leaf(Resource):
    # Handlers take any method and any sub-path, like Go http.Handlers.
    isLeaf = True


class _DerpResource(_Leaf):
    """`/derp` requests the DERP protocol did not take over."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self._enabled = enabled

    def render(self, request: server.Request) -> bytes:
        if not self._enabled:
            return http_error(request, http.NOT_FOUND, "derp server disabled")
        return http_error(request, 426, "DERP requires connection upgrade")


class _ProbeResource(_Leaf):
    """`/derp/probe` and `/derp/latency-check`, timed by clients."""

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return http_error(request, http.NOT_ALLOWED, "bogus probe method")
        # Browser clients probe with fetch() from another origin.
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return reply(request, b"")


class Generate204Resource(_Leaf):
    """`/generate_204`: captive-portal check, shared with the port-80 site."""

    def render(self, request: server.Request) -> bytes:
        challenge = request.requestHeaders.getRawHeaders(b"X-Tailscale-Challenge")
        # Go's Header.Get reads the first value.
        if challenge and _CHALLENGE.fullmatch(challenge[0]):
            request.setHeader(b"X-Tailscale-Response", b"response " + challenge[0])
        request.setHeader(b"Cache-Control", _NO_CACHE)
        request.setResponseCode(http.NO_CONTENT)
        return b""


class _RobotsResource(_Leaf):
    def render(self, request: server.Request) -> bytes:
        add_browser_headers(request)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return reply(request, b"User-agent: *\nDisallow: /\n")


class _BootstrapDNSResource(_Leaf):
    """`/bootstrap-dns`, answered by a derpbox.bootstrap_dns.BootstrapDNS (empty without one)."""

    def __init__(self, bootstrap_dns: BootstrapDNS | None) -> None:
        super().__init__()
        self._bootstrap_dns = bootstrap_dns

    def render(self, request: server.Request) -> bytes:
        add_browser_headers(request)
        request.setHeader(b"Content-Type", b"application/json")
        # Clients ask once, from anywhere: derper closes rather than keep the connection.
        request.setHeader(b"Connection", b"close")
        # The header alone does not make Twisted close; derper does close.
        request.channel.persistent = False
        if self._bootstrap_dns is None:
            return reply(request, b"")
        # Go's URL.Query().Get("q"): the first value; bytes kept distinct through the decode.
        q = request.args.get(b"q", [b""])[0].decode("utf-8", "surrogateescape")
        return reply(request, self._bootstrap_dns.respond(q, remote_address(request.channel.transport)[0]))


class _HomeResource(_Leaf):
    """`/` and every unmatched path, as with Go's ServeMux."""

    def __init__(self, *, home: str, derp_enabled: bool, hostname: str) -> None:
        super().__init__()
        self._redirect = home.encode() if home.startswith(("http://", "https://")) else None
        self._page = b"" if home == "blank" else _home_page(derp_enabled, hostname)

    def render(self, request: server.Request) -> bytes:
        add_browser_headers(request)
        if self._redirect is not None:
            request.redirect(self._redirect)
            return reply(request, b"")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return reply(request, self._page)


def _home_page(derp_enabled: bool, hostname: str) -> bytes:
    parts = [
        "<html><body>\n<h1>DERP</h1>\n",
        '<p>This is a <a href="https://tailscale.com/">Tailscale</a> DERP server.</p>\n',
        "<p>Tailscale nodes that cannot reach each other directly relay their "
        "end-to-end encrypted traffic through it, and use its STUN service to "
        "learn their public addresses.</p>\n",
        '<p>See <a href="https://tailscale.com/kb/1232/derp-servers">DERP servers</a> '
        'and <a href="https://pkg.go.dev/tailscale.com/derp">the DERP protocol</a>.</p>\n',
    ]
    if not derp_enabled:
        parts.append("<p>Status: DERP relaying is <b>disabled</b> on this server.</p>\n")
    # derper shows an abuse contact only on Tailscale's own fleet.
    if hostname.startswith("derp") and hostname.endswith(".tailscale.com"):
        parts.append(
            "<p>Report abuse of "
            + escape(hostname)
            + ' to <a href="mailto:security@tailscale.com">security@tailscale.com</a>.</p>\n'
        )
    parts.append("</body></html>\n")
    return "".join(parts).encode()


class _MainMux(_Leaf):
    """Exact-path routes with a fallback, like derper's mux."""

    def __init__(self, routes: dict[bytes, Resource], fallback: Resource, debug: Resource | None = None) -> None:
        super().__init__()
        self._routes = routes
        self._fallback = fallback
        self._debug = debug

    def render(self, request: server.Request) -> bytes:
        # A CONNECT target ("host:port") is no path; derper refuses it without -ace.
        if request.method == b"CONNECT":
            return http_error(request, http.FORBIDDEN, "CONNECT not enabled")
        path = request.path
        if self._debug is not None and (path == b"/debug" or path.startswith(b"/debug/")):
            # The debug subtree, behind its own access check (derpbox.web.debug).
            return self._debug.render(request)
        return self._routes.get(request.path, self._fallback).render(request)


def build_main_site(
    *,
    derp_enabled: bool,
    home: str,
    hostname: str,
    debug: Resource | None = None,
    extra: dict[str, Resource] | None = None,
    bootstrap_dns: BootstrapDNS | None = None,
) -> QuietSite:
    """Build the Site for the main listener.

    `home` is "" (default page), "blank" (empty page) or an http(s) URL to
    redirect `/` to; anything else raises ValueError, as derper refuses it.
    `debug` (a derpbox.web.debug.DebugResource) serves `/debug` and everything
    under `/debug/`; without it those paths fall through to the home page.
    `extra` maps further exact paths to resources (e.g. the DERP map JSON).
    `bootstrap_dns` answers `/bootstrap-dns`; without it the body is empty.
    """
    if home not in ("", "blank") and not home.startswith(("http://", "https://")):
        raise ValueError(f"invalid home value {home!r}: want '', 'blank' or an http(s) URL")
    probe = _ProbeResource()
    routes: dict[bytes, Resource] = {
        b"/derp": _DerpResource(derp_enabled),
        b"/derp/probe": probe,
        b"/derp/latency-check": probe,
        b"/generate_204": Generate204Resource(),
        b"/robots.txt": _RobotsResource(),
        b"/bootstrap-dns": _BootstrapDNSResource(bootstrap_dns),
    }
    for path, resource in (extra or {}).items():
        routes[path.encode()] = resource
    home_resource = _HomeResource(home=home, derp_enabled=derp_enabled, hostname=hostname)
    return QuietSite(_MainMux(routes, home_resource, debug))
