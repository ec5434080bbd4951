"""`/debug/` pages and derper's debug access rule (spec 2.4).

Access is allowed for a GET whose `?debugkey=` equals the trimmed content of the
file named by TS_DEBUG_KEY_PATH, or, when the request has no X-Forwarded-For
header, for a remote address that is loopback, a Tailscale address, exactly
TS_ALLOW_DEBUG_IP, or inside a TS_DEBUG_TRUSTED_CIDRS network. The environment
is read per request, so a changed key file applies at once.

Behind a PROXY-protocol proxy (a connection from -trusted-proxies, with or without
a header) the address half of the rule is never applied: the proxy usually sits on
loopback, and the address it names is only its word, so neither the proxy's own
address nor the client address from its header grants access (even a loopback or
Tailscale one). The debug key still works; better, use the -metrics-addr listener.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
from html import escape

from twisted.internet.address import UNIXAddress
from twisted.web import http, server
from twisted.web.resource import Resource

from ..metrics import CONTENT_TYPE, Metrics, render, vars_of
from ..netaddr import in_networks, ip_version, parse_ip, remote_address
from ..workers.view import WORKER_SCOPE
from .endpoints import BROWSER_HEADERS, error_body, http_error, reply, reply_later
from .proxied import came_via_proxy
from .tcp_stats import TrafficStream

__all__ = ["DEBUG_CSP", "DebugResource", "debug_allowed", "ip_debug_allowed", "request_remote_ip"]

DEBUG_CSP = BROWSER_HEADERS[b"Content-Security-Policy"] + b"; style-src 'self' 'unsafe-inline'"
# /debug/traffic streams at once; each costs a TCP_INFO read per connection every 2 s.
MAX_TRAFFIC_WATCHERS = 4

_TAILSCALE_V4 = ipaddress.ip_network("100.64.0.0/10")
_CHROMEOS_V4 = ipaddress.ip_network("100.115.92.0/23")
_TAILSCALE_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def request_remote_ip(request: server.Request) -> str:
    """The client IP of a twisted.web request, from the one place that decides it."""
    return remote_address(request.channel.transport)[0]


def ip_debug_allowed(ip_text: str, environ=os.environ) -> bool:
    """The address half of the rule (the caller checks X-Forwarded-For)."""
    ip = parse_ip(ip_text)
    if ip is None:
        return False
    if ip.is_loopback:
        return True
    if ip.version == 4 and ip in _TAILSCALE_V4 and ip not in _CHROMEOS_V4:
        return True
    if ip.version == 6 and ip in _TAILSCALE_V6:
        return True
    # As derper, the one address exactly as written: a mapped IPv6 form matches no IPv4 client.
    allow = environ.get("TS_ALLOW_DEBUG_IP", "").strip()
    if ip_version(allow) and ipaddress.ip_address(allow) == ip:
        return True
    for cidr in environ.get("TS_DEBUG_TRUSTED_CIDRS", "").split(","):
        cidr = cidr.strip()
        if not cidr:
            continue
        try:
            if ip in ipaddress.ip_network(cidr, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


def _debug_key(environ) -> bytes | None:
    path = environ.get("TS_DEBUG_KEY_PATH", "")
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError:
        return None
    return key or None


def debug_allowed(request: server.Request, environ=os.environ) -> bool:
    key = _debug_key(environ)
    if key is not None and request.method == b"GET":
        offered = request.args.get(b"debugkey", [b""])[0]
        if offered and hmac.compare_digest(offered, key):
            return True
    if request.requestHeaders.hasHeader(b"X-Forwarded-For"):
        return False
    if isinstance(request.channel.transport.getPeer(), UNIXAddress):
        # A worker's internal socket (derpbox.workers): its directory is the server user's alone.
        return True
    if came_via_proxy(request.channel.transport):
        return False
    return ip_debug_allowed(request_remote_ip(request), environ)


def _debug_headers(request: server.Request) -> None:
    for name, value in BROWSER_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Security-Policy", DEBUG_CSP)


class DebugResource(Resource):
    """Everything under `/debug/` (the main mux hands over any such path)."""

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        *,
        hostname: str = "",
        mesh_key_configured: bool = False,
        environ=os.environ,
        consistency=None,
        mesh_status=None,
        node_view=None,
        clock,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        # The reactor, for /debug/traffic's periodic rounds.
        self.clock = clock
        self._traffic_watchers = 0
        # /debug/check: the service's invariants (relay and mesh), the relay's alone by default.
        self.consistency = consistency or metrics.relay.check_consistency
        self.hostname = hostname
        self.mesh_key_configured = mesh_key_configured
        self.environ = environ
        # Each outbound mesh link's state (derpbox.mesh.peers), for /debug/mesh.
        self.mesh_status = mesh_status or list
        # In a worker (derpbox.workers.view): the node's figures, gathered from every worker.
        self.node_view = node_view

    def render(self, request: server.Request) -> bytes:
        if not debug_allowed(request, self.environ):
            return http_error(request, http.FORBIDDEN, "debug access denied")
        path = request.path
        if path == b"/debug":
            # Go's ServeMux redirects a subtree root without its slash.
            request.setResponseCode(http.MOVED_PERMANENTLY)
            request.setHeader(b"Location", b"/debug/")
            return reply(request, b"")
        _debug_headers(request)
        handler = {
            b"/debug/": self._index,
            b"/debug/varz": self._varz,
            b"/debug/vars": self._vars,
            b"/debug/check": self._check,
            b"/debug/mesh": self._mesh,
            b"/debug/traffic": self._traffic,
        }.get(path)
        if handler is None:
            return http_error(request, http.NOT_FOUND, "404 page not found")
        return handler(request)

    def _index(self, request: server.Request) -> bytes:
        m = self.metrics
        rows = [
            ("Uptime", f"{int(m.uptime())}s"),
            ("Version", m.vars()["derp_version"]),
            ("Machine", socket.gethostname()),
            ("TLS hostname", self.hostname),
            ("Mesh key", str(self.mesh_key_configured).lower()),
        ]
        links = [
            ("vars", "expvar-style JSON"),
            ("varz", "Prometheus metrics"),
            ("check", "consistency check"),
            ("mesh", "mesh peers (JSON)"),
            ("traffic", "per connection: RTT, congestion window, bytes (NDJSON every 2 s; ?once=1 for one round)"),
        ]
        body = ["<html><head><title>derpbox debug</title></head><body>\n<h1>derpbox debug</h1>\n<table>\n"]
        body += [f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>\n" for k, v in rows]
        body.append("</table>\n<ul>\n")
        body += [f'<li><a href="/debug/{name}">/debug/{name}</a> {escape(what)}</li>\n' for name, what in links]
        body.append("</ul>\n</body></html>\n")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return reply(request, "".join(body).encode())

    def _varz(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        if _whole_node(request, self.node_view):
            return reply_later(request, self.node_view.families(self.metrics).addCallback(render))
        return reply(request, self.metrics.exposition())

    def _vars(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        if _whole_node(request, self.node_view):
            return reply_later(request, self.node_view.families(self.metrics).addCallback(_json_vars))
        return reply(request, json.dumps(self.metrics.vars(), indent=1).encode() + b"\n")

    def _mesh(self, request: server.Request) -> bytes:
        peers = self.mesh_status()
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return reply(request, json.dumps({"peers": peers}, indent=1).encode() + b"\n")

    def _traffic(self, request: server.Request):
        once = request.args.get(b"once") == [b"1"]
        if not once and self._traffic_watchers >= MAX_TRAFFIC_WATCHERS:
            return http_error(request, http.SERVICE_UNAVAILABLE,
                              f"{MAX_TRAFFIC_WATCHERS} /debug/traffic streams already; try ?once=1")
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        self._traffic_watchers += 1
        TrafficStream(request, self.metrics.relay, self.clock, once=once, on_done=self._traffic_done).start()
        return server.NOT_DONE_YET

    def _traffic_done(self) -> None:
        self._traffic_watchers -= 1

    def _check(self, request: server.Request) -> bytes:
        if _whole_node(request, self.node_view):
            return reply_later(request, self.node_view.problems(self.consistency()).addCallback(
                lambda problems: _check_body(request, problems)))
        return reply(request, _check_body(request, self.consistency()))


def _whole_node(request: server.Request, node_view) -> bool:
    """Answer for the whole node (a worker asking another worker wants that worker alone)."""
    return node_view is not None and request.args.get(b"scope") != [WORKER_SCOPE]


def _json_vars(families) -> bytes:
    return json.dumps(vars_of(families), indent=1).encode() + b"\n"


def _check_body(request: server.Request, problems: list[str]) -> bytes:
    """/debug/check's status, headers and body (reply() or reply_later() sends it)."""
    if problems:
        return error_body(request, http.INTERNAL_SERVER_ERROR, "\n".join(problems))
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"derp.Server ConsistencyCheck okay"


class MetricsListenerResource(Resource):
    """The separate metrics listener: `/metrics` and `/healthz`, nothing else.

    Peers outside `allow` (ip_network objects) get 403 on every path.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, allow, healthy=lambda: True, node_view=None) -> None:
        super().__init__()
        self.metrics = metrics
        self.allow = list(allow)
        self.healthy = healthy
        self.node_view = node_view

    def allowed(self, ip_text: str) -> bool:
        return in_networks(parse_ip(ip_text), self.allow)

    def render(self, request: server.Request) -> bytes:
        if not self.allowed(request_remote_ip(request)):
            return http_error(request, http.FORBIDDEN, "metrics access denied")
        if request.path == b"/metrics":
            request.setHeader(b"Content-Type", CONTENT_TYPE)
            if self.node_view is not None:
                return reply_later(request, self.node_view.families(self.metrics).addCallback(render))
            return reply(request, self.metrics.exposition())
        if request.path == b"/healthz":
            if not self.healthy():
                return http_error(request, http.SERVICE_UNAVAILABLE, "not running")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return reply(request, b"ok\n")
        return http_error(request, http.NOT_FOUND, "404 page not found")
