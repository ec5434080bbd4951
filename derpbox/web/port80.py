"""Plain-HTTP listener run beside the TLS listener (spec 2.3).

It answers captive-portal checks and ACME http-01 challenges and sends
everything else to HTTPS, so DERP is never served in clear text.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.web import http, server
from twisted.web.resource import Resource

from derpbox.web.debug import debug_allowed
from derpbox.web.endpoints import Generate204Resource, QuietSite, http_error, reply

__all__ = ["ChallengeResponder", "build_port80_site"]

ChallengeResponder = Callable[[str], bytes | None]
"""ACME http-01 hook: maps a challenge token to its key authorization, or None."""

_ACME_PREFIX = b"/.well-known/acme-challenge/"
_NOT_FOUND = "404 page not found"  # Go's http.NotFound text


class _Port80Resource(Resource):
    isLeaf = True

    def __init__(
        self,
        generate_204: Resource,
        challenge_responder: ChallengeResponder | None,
        main_resource: Resource | None = None,
        environ=None,
        https_port: Callable[[], int] = lambda: 443,
    ) -> None:
        super().__init__()
        self._generate_204 = generate_204
        self._challenge_responder = challenge_responder
        self._main = main_resource
        self._environ = environ
        self._https_port = https_port

    def render(self, request: server.Request) -> bytes:
        if request.path == b"/generate_204":
            return self._generate_204.render(request)
        if request.path.startswith(_ACME_PREFIX):
            return self._acme_challenge(request)
        if request.uri.startswith(b"/debug"):
            if self._main is None:
                return http_error(request, http.NOT_FOUND, _NOT_FOUND)
            # As derper: the main mux serves it, so the same debug access check applies.
            return self._main.render(request)
        if request.method not in (b"GET", b"HEAD"):
            return http_error(request, http.BAD_REQUEST, "Use HTTPS")
        hosts = request.requestHeaders.getRawHeaders(b"Host")
        if not hosts or not hosts[0]:
            return http_error(request, http.BAD_REQUEST, "missing Host header")
        if (
            self._main is not None
            and request.method == b"GET"
            and request.path == b"/"
            and debug_allowed(request, os.environ if self._environ is None else self._environ)
        ):
            request.redirect(self._https_origin(hosts[0]) + b"/debug/")
            return reply(request, b"")
        request.redirect(self._https_origin(hosts[0]) + request.uri)
        return reply(request, b"")

    def _https_origin(self, host: bytes) -> bytes:
        """The Host's name with the port clients reach DERP on (derper keeps port 80's own
        port from the Host, which sends a browser to https://name:80)."""
        name = host[: host.index(b"]") + 1] if host.startswith(b"[") and b"]" in host else host.rsplit(b":", 1)[0]
        port = self._https_port()
        return b"https://" + name + (b"" if port == 443 else b":%d" % port)

    def _acme_challenge(self, request: server.Request) -> bytes:
        token = request.path[len(_ACME_PREFIX) :].decode("latin-1")
        answer = self._challenge_responder(token) if self._challenge_responder else None
        if answer is None:
            return http_error(request, http.NOT_FOUND, _NOT_FOUND)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return reply(request, answer)


def build_port80_site(
    *,
    generate_204_resource: Resource | None = None,
    challenge_responder: ChallengeResponder | None = None,
    main_resource: Resource | None = None,
    environ=None,
    https_port: Callable[[], int] = lambda: 443,
) -> QuietSite:
    """Build the Site for the plain-HTTP port-80 listener.

    `generate_204_resource` lets the caller share the main site's handler; a
    new Generate204Resource is used when omitted. `challenge_responder` is the
    ACME http-01 hook: called with the token from
    `/.well-known/acme-challenge/<token>`, it returns the key authorization to
    serve, or None for an unknown token (404). Without it every challenge
    path gets 404.
    """
    if generate_204_resource is None:
        generate_204_resource = Generate204Resource()
    return QuietSite(_Port80Resource(generate_204_resource, challenge_responder, main_resource, environ,
                                     https_port))
