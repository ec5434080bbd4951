"""A fake tailscaled LocalAPI on a real unix socket (spec 5(a)).

Contract modelled (tailscaled's LocalAPI handler, as the spec describes it):

* Every request first passes the LocalAPI guard: a non-empty ``Referer`` or
  ``Origin`` header, or a Host other than ``local-tailscaled.sock`` or empty,
  gets 403 ``invalid localapi request``. (Go's HTTP/1.1 server itself answers
  400 when the Host header is missing altogether.)
* ``/localapi/v0/whois`` (the handler does not check the method) reads ``addr``:
  missing -> 400 ``missing 'addr' parameter``; ``nodekey:`` plus 64 hex digits
  known to the tailnet -> 200 with a WhoIsResponse-shaped JSON body; unknown key
  -> 404 ``no match for IP:port``; a malformed nodekey -> 400 ``invalid nodekey
  in 'addr' parameter``; anything else malformed -> 400 ``invalid 'addr'
  parameter``. An IP:port is valid but never matches here (no peers by address).
* Other paths -> 404 ``404 page not found``; ``/`` -> ``tailscaled``.

Errors are written the way Go's ``http.Error`` writes them: text/plain, nosniff,
message plus a newline.

Test hooks: ``mode`` "normal", "old" (answers every nodekey the way a
tailscaled that predates nodekey lookups does: 400 ``invalid 'addr'
parameter``) or "hang" (accepts and never answers); ``requests`` records every
request; ``stop()`` removes the socket file and ``start()`` binds it again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

LOCALAPI_HOST = "local-tailscaled.sock"
# What the fake claims to be; real tailscaled sends both on every guarded reply.
FAKE_VERSION = "1.90.0-fake"
FAKE_CAP = "130"

_NODEKEY = re.compile(r"nodekey:[0-9a-fA-F]{64}\Z")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str  # raw query string, still escaped
    args: dict[str, list[str]]
    headers: dict[str, list[str]]  # lower-case name -> values

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def _go_http_error(request, message: str, code: int) -> bytes:
    request.setResponseCode(code)
    request.setHeader("Content-Type", "text/plain; charset=utf-8")
    request.setHeader("X-Content-Type-Options", "nosniff")
    return (message + "\n").encode()


def _valid_ip_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _LocalAPI(Resource):
    isLeaf = True

    def __init__(self, fake: FakeTailscaled):
        super().__init__()
        self.fake = fake

    def render(self, request):
        fake = self.fake
        raw_path = request.uri.split(b"?", 1)
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        fake.requests.append(
            RecordedRequest(
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                query=raw_path[1].decode("latin-1") if len(raw_path) > 1 else "",
                args={k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
                headers=headers,
            )
        )
        hosts = headers.get("host")
        if hosts is None and request.clientproto == b"HTTP/1.1":
            return _go_http_error(request, "missing required Host header", 400)
        host = hosts[0] if hosts else ""
        referer = (headers.get("referer") or [""])[0]
        origin = (headers.get("origin") or [""])[0]
        if referer or origin or host not in ("", LOCALAPI_HOST):
            return _go_http_error(request, "invalid localapi request", 403)
        request.setHeader("Tailscale-Version", FAKE_VERSION)
        request.setHeader("Tailscale-Cap", FAKE_CAP)
        request.setHeader("X-Frame-Options", "DENY")
        request.setHeader("X-Content-Type-Options", "nosniff")

        if fake.mode == "hang":
            fake._hold(request)
            return NOT_DONE_YET
        path = request.path
        if path == b"/":
            return b"tailscaled\n"
        if path != b"/localapi/v0/whois":
            return _go_http_error(request, "404 page not found", 404)
        return self._whois(request)

    def _whois(self, request):
        fake = self.fake
        addr = (request.args.get(b"addr") or [b""])[0].decode("utf-8", "replace")
        if not addr:
            return _go_http_error(request, "missing 'addr' parameter", 400)
        if addr.startswith("nodekey:"):
            if fake.mode == "old":
                # Before nodekey lookups existed, addr had to be an IP:port.
                return _go_http_error(request, "invalid 'addr' parameter", 400)
            if not _NODEKEY.match(addr):
                return _go_http_error(request, "invalid nodekey in 'addr' parameter", 400)
            key = addr.lower()
            if key not in fake.nodes:
                return _go_http_error(request, "no match for IP:port", 404)
            request.setHeader("Content-Type", "application/json")
            return json.dumps(fake.whois_body(key), indent="\t").encode()
        if not _valid_ip_port(addr):
            return _go_http_error(request, "invalid 'addr' parameter", 400)
        return _go_http_error(request, "no match for IP:port", 404)


class FakeTailscaled:
    """tailscaled's LocalAPI on ``path``; ``nodes`` are the ``nodekey:<hex>`` strings in its netmap."""

    def __init__(self, path: str, nodes=(), *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.path = path
        self.nodes: set[str] = {n.lower() for n in nodes}
        self.mode = "normal"
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self._port = None
        self._held: list = []

    def whois_body(self, key: str) -> dict:
        index = sorted(self.nodes).index(key) + 1
        return {
            "Node": {
                "ID": index,
                "StableID": f"n{index}CNTRL",
                "Name": f"node{index}.tail0000.ts.net.",
                "User": 1,
                "Key": key,
                "KeyExpiry": "0001-01-01T00:00:00Z",
                "Machine": "mkey:" + "0" * 64,
                "DiscoKey": "discokey:" + "0" * 64,
                "Addresses": [f"100.64.0.{index}/32"],
                "AllowedIPs": [f"100.64.0.{index}/32"],
                "Hostinfo": {},
                "Created": "2025-01-01T00:00:00Z",
            },
            "UserProfile": {"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Alice"},
            "CapMap": {},
        }

    def start(self) -> FakeTailscaled:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket file from an earlier run
        site = Site(_LocalAPI(self))
        build = site.buildProtocol

        def counting(addr):
            self.connections += 1
            return build(addr)

        site.buildProtocol = counting
        self._port = self.reactor.listenUNIX(self.path, site)
        return self

    def _hold(self, request) -> None:
        self._held.append(request)
        request.notifyFinish().addBoth(lambda _: self._held.remove(request) if request in self._held else None)

    @property
    def held(self) -> int:
        """Requests accepted in "hang" mode and still unanswered."""
        return len(self._held)

    def stop(self) -> defer.Deferred:
        """Stop listening, drop held requests, and delete the socket file."""
        for request in list(self._held):
            request.transport.abortConnection()
        port, self._port = self._port, None
        d = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

        def unlink(_):
            if os.path.exists(self.path):
                os.unlink(self.path)

        return d.addCallback(unlink)
