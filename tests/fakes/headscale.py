"""A fake Headscale ``POST /verify`` admission endpoint (spec 5(c)), plus a black hole.

Contract modelled (Headscale's VerifyHandler as the spec describes it):

* ``/verify`` needs no authentication. A method other than POST gets 405
  ``method not allowed``.
* The body is capped at 4 KiB; more gives 413 ``request body too large``.
* The body is decoded (Go ``json.Unmarshal``, so field names match
  case-insensitively, unknown fields are ignored, trailing data is an error)
  into ``DERPAdmitClientRequest``. ``NodePublic`` must be a ``nodekey:`` key and
  ``Source`` an IP address or empty; anything undecodable gives 400
  ``Bad Request: invalid JSON``.
* ``Allow`` is true iff NodePublic is one of the nodes; Source is ignored. The
  reply is 200, ``Content-Type: application/json``, ``{"Allow":true}\\n`` or
  ``{"Allow":false}\\n``.

Errors are written the way Go's ``http.Error`` writes them (text/plain, nosniff,
message plus newline). Other paths get 404 ``404 page not found``.

Test hooks: ``delay`` seconds before answering; ``force_status`` (the reply
keeps the normal body unless ``force_body`` is set); ``force_body`` raw bytes;
``hang`` (accept and never answer); ``partial_body`` (answer 200 with
these bytes, then stall without finishing); ``redirects`` maps a path to
``(status, location)``; ``requests`` records method, path, headers and body;
``connections`` counts accepted connections; ``drop_next`` aborts the connection of
that many next requests instead of answering (as a server that closed an idle
kept connection just as the client reused it).
``start(port=..., tls=...)`` rebinds a known port or serves HTTPS.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

BODY_LIMIT = 4 * 1024
_NODEKEY = re.compile(r"nodekey:[0-9a-fA-F]{64}\Z")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, list[str]]  # lower-case name -> values
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class _BadRequest(Exception):
    pass


def _go_http_error(request, message: str, code: int) -> bytes:
    request.setResponseCode(code)
    request.setHeader("Content-Type", "text/plain; charset=utf-8")
    request.setHeader("X-Content-Type-Options", "nosniff")
    return (message + "\n").encode()


def _decode_admit_request(body: bytes) -> str:
    """The NodePublic of a DERPAdmitClientRequest, decoded as Go would ("" if absent)."""

    def fold(pairs):
        # Go matches field names case-insensitively; the last duplicate wins.
        return {k.lower(): v for k, v in pairs}

    def no_constants(name):
        raise _BadRequest(name)

    try:
        value = json.loads(body.decode("utf-8", "replace"), object_pairs_hook=fold, parse_constant=no_constants)
    except ValueError as e:
        raise _BadRequest(str(e)) from None
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise _BadRequest("not an object")
    node = value.get("nodepublic")
    if node is not None and (not isinstance(node, str) or not _NODEKEY.match(node)):
        raise _BadRequest("bad NodePublic")
    source = value.get("source")
    if source is not None:
        if not isinstance(source, str):
            raise _BadRequest("bad Source")
        if source:
            try:
                ipaddress.ip_address(source)
            except ValueError:
                raise _BadRequest("bad Source") from None
    return (node or "").lower()


class _Verify(Resource):
    isLeaf = True

    def __init__(self, fake: FakeHeadscale):
        super().__init__()
        self.fake = fake

    def render(self, request):
        fake = self.fake
        body = request.content.read()
        fake.requests.append(
            RecordedRequest(
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                headers={
                    name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                body=body,
            )
        )
        if fake.drop_next:
            fake.drop_next -= 1
            request.transport.abortConnection()
            return NOT_DONE_YET
        path = request.path.decode("latin-1")
        if path in fake.redirects:
            status, location = fake.redirects[path]
            request.setResponseCode(status)
            request.setHeader("Location", location)
            return b""
        if fake.hang or fake.partial_body is not None:
            fake._held.append(request)
            request.notifyFinish().addBoth(lambda _: fake._held.remove(request) if request in fake._held else None)
            if fake.partial_body is not None:
                request.setHeader("Content-Type", "application/json")
                request.write(fake.partial_body)
            return NOT_DONE_YET
        reply = self._reply(request, path, body)
        if fake.delay:
            call = fake.reactor.callLater(fake.delay, self._finish, request, reply)
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return NOT_DONE_YET
        return reply

    @staticmethod
    def _finish(request, reply: bytes) -> None:
        request.write(reply)
        request.finish()

    def _reply(self, request, path: str, body: bytes) -> bytes:
        fake = self.fake
        if path != "/verify":
            reply = _go_http_error(request, "404 page not found", 404)
        elif request.method != b"POST":
            reply = _go_http_error(request, "method not allowed", 405)
        elif len(body) > BODY_LIMIT:
            reply = _go_http_error(request, "request body too large", 413)
        else:
            try:
                node = _decode_admit_request(body)
            except _BadRequest:
                reply = _go_http_error(request, "Bad Request: invalid JSON", 400)
            else:
                request.setHeader("Content-Type", "application/json")
                allow = node in fake.nodes
                reply = b'{"Allow":true}\n' if allow else b'{"Allow":false}\n'
        if fake.force_status is not None:
            request.setResponseCode(fake.force_status)
        if fake.force_body is not None:
            reply = fake.force_body
        return reply


class FakeHeadscale:
    """Headscale's /verify on 127.0.0.1 (ephemeral port); ``nodes`` are ``nodekey:<hex>`` strings."""

    def __init__(self, nodes=(), *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.nodes: set[str] = {n.lower() for n in nodes}
        self.delay = 0.0
        self.force_status: int | None = None
        self.force_body: bytes | None = None
        self.hang = False
        self.partial_body: bytes | None = None
        self.redirects: dict[str, tuple[int, str]] = {}
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self.drop_next = 0
        self._held: list = []
        self._port = None
        self.scheme = "http"

    def start(self, port: int = 0, tls=None) -> FakeHeadscale:
        """Listen on 127.0.0.1:``port``; with ``tls`` (a Twisted context factory) serve HTTPS."""
        site = Site(_Verify(self))
        build = site.buildProtocol

        def counting(addr):
            self.connections += 1
            return build(addr)

        site.buildProtocol = counting
        if tls is None:
            self._port = self.reactor.listenTCP(port, site, interface="127.0.0.1")
        else:
            self._port = self.reactor.listenSSL(port, site, tls, interface="127.0.0.1")
        self.scheme = "http" if tls is None else "https"
        return self

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/verify"

    def stop(self) -> defer.Deferred:
        for request in list(self._held):
            request.transport.abortConnection()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


class _Silent(protocol.Protocol):
    def connectionMade(self):
        self.factory.accepted.append(self)

    def connectionLost(self, reason=None):
        if self in self.factory.accepted:
            self.factory.accepted.remove(self)


class BlackHole(protocol.Factory):
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""

    protocol = _Silent

    def __init__(self, *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.accepted: list[_Silent] = []
        self._port = None

    def start(self) -> BlackHole:
        self._port = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}/verify"

    def stop(self) -> defer.Deferred:
        for conn in list(self.accepted):
            conn.transport.abortConnection()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
