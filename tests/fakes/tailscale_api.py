"""A fake of the Tailscale API's device list and OAuth token endpoint, on 127.0.0.1.

Contract modelled (the sources are named in derpbox/admission/tailscale_api.py):

* ``GET /api/v2/tailnet/{tailnet}/devices[?fields=default|all]``: ``{tailnet}`` is "-" or
  the fake's organization name (another gives 403 ``user tailnet does not match``, the
  message tailscale/tailscale#3032 quotes). The answer is ``{"devices": [...]}`` with the
  documented default fields; ``fields=all`` (or a list holding ``all``) adds
  ``enabledRoutes``, ``advertisedRoutes`` and ``clientConnectivity``. Other methods get 405.
* Authentication: an API access token as the HTTP Basic user (empty password) or as a
  Bearer token. None, an unknown, expired or revoked one gives 401; an OAuth token without
  a devices scope (``devices:core``, ``devices:core:read``, ``all``, ``all:read``) gives 403.
  Errors are JSON ``{"message": "..."}``.
* ``POST /api/v2/oauth/token``: an ``application/x-www-form-urlencoded`` body with
  ``grant_type=client_credentials`` and the client's credentials as ``client_id`` and
  ``client_secret`` form fields or as HTTP Basic (RFC 6749 2.3.1). It answers
  ``{"access_token", "token_type": "Bearer", "expires_in", "scope"}``; errors are RFC 6749
  5.2's ``{"error": ...}``: 400 ``unsupported_grant_type`` / ``invalid_request``, 401
  ``invalid_client``.
* Rate limiting (not documented by Tailscale, modelled on RFC 6585): while
  ``rate_limited`` holds a number of seconds, every request gets 429 with that
  ``Retry-After`` and ``{"message": "rate limited"}``.
* ETags (not documented for this endpoint): off unless ``etags`` is set; then the list
  carries a strong ETag and a matching ``If-None-Match`` gets 304 without a body.

Test hooks: ``devices`` (dicts; ``add_device`` makes a realistic one), ``api_tokens``,
``clients`` (id -> (secret, scopes)), ``token_lifetime``, ``revoke_tokens()``,
``force_status`` (answers every request with it and a message), ``requests`` (recorded).
Token expiry runs on ``clock`` (default the reactor), so tests can age tokens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Site

DEVICE_SCOPES = {"devices:core", "devices:core:read", "all", "all:read"}
_DEVICES_PATH = re.compile(r"/api/v2/tailnet/([^/]+)/devices\Z")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def _json(request, code: int, value) -> bytes:
    request.setResponseCode(code)
    request.setHeader("Content-Type", "application/json; charset=utf-8")
    return json.dumps(value).encode()


class _Api(Resource):
    isLeaf = True

    def __init__(self, fake: FakeTailscaleAPI):
        super().__init__()
        self.fake = fake

    def render(self, request):
        fake = self.fake
        body = request.content.read()
        path = request.path.decode("latin-1")
        fake.requests.append(RecordedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            query={k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()} if request.method == b"GET"
            else {},
            headers={name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                     for name, values in request.requestHeaders.getAllRawHeaders()},
            body=body,
        ))
        if fake.rate_limited is not None:
            request.setHeader("Retry-After", str(fake.rate_limited))
            return _json(request, 429, {"message": "rate limited"})
        if fake.force_status is not None:
            return _json(request, fake.force_status, {"message": "forced failure"})
        if path == "/api/v2/oauth/token":
            return self._token(request, body)
        match = _DEVICES_PATH.match(path)
        if match:
            return self._devices(request, match.group(1))
        return _json(request, 404, {"message": "not found"})

    def _token(self, request, body: bytes) -> bytes:
        fake = self.fake
        if request.method != b"POST":
            return _json(request, 405, {"message": "method not allowed"})
        form = parse_qs(body.decode("latin-1"))
        client_id = (form.get("client_id") or [""])[0]
        secret = (form.get("client_secret") or [""])[0]
        auth = request.getHeader("authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return _json(request, 401, {"error": "invalid_client"})
        if (form.get("grant_type") or [""])[0] != "client_credentials":
            return _json(request, 400, {"error": "unsupported_grant_type"})
        if not client_id:
            return _json(request, 400, {"error": "invalid_request"})
        known = fake.clients.get(client_id)
        if known is None or known[0] != secret:
            return _json(request, 401, {"error": "invalid_client"})
        fake.issued += 1
        token = f"tskey-oauthtoken-{fake.issued}"
        fake.oauth_tokens[token] = (fake.clock.seconds() + fake.token_lifetime, set(known[1]))
        return _json(request, 200, {"access_token": token, "token_type": "Bearer",
                                    "expires_in": fake.token_lifetime, "scope": " ".join(sorted(known[1]))})

    def _caller_scopes(self, request) -> set[str] | None:
        """The scopes of the request's token, or None when it is not a valid token."""
        fake = self.fake
        auth = request.getHeader("authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value).decode().partition(":")[0]
            except ValueError:
                return None
        elif scheme.lower() != "bearer":
            return None
        if value in fake.api_tokens:
            return {"all"}
        entry = fake.oauth_tokens.get(value)
        if entry is None or fake.clock.seconds() >= entry[0]:
            return None
        return entry[1]

    def _devices(self, request, tailnet: str) -> bytes:
        fake = self.fake
        if request.method != b"GET":
            return _json(request, 405, {"message": "method not allowed"})
        scopes = self._caller_scopes(request)
        if scopes is None:
            return _json(request, 401, {"message": "API token invalid"})
        if not scopes & DEVICE_SCOPES:
            return _json(request, 403, {"message": "calling actor does not have enough permissions to perform "
                                                   "this function"})
        if tailnet not in ("-", fake.organization):
            return _json(request, 403, {"message": "user tailnet does not match"})
        fields = ",".join(v.decode() for v in request.args.get(b"fields", []))
        devices = [dict(d) for d in fake.devices]
        if "all" not in fields.split(","):
            for device in devices:
                for name in ("enabledRoutes", "advertisedRoutes", "clientConnectivity"):
                    device.pop(name, None)
        reply = json.dumps({"devices": devices}).encode()
        if fake.etags:
            etag = '"' + hashlib.sha256(reply).hexdigest() + '"'
            request.setHeader("ETag", etag)
            if request.getHeader("if-none-match") == etag:
                request.setResponseCode(304)
                return b""
        request.setHeader("Content-Type", "application/json; charset=utf-8")
        return reply


class FakeTailscaleAPI:
    def __init__(self, *, reactor=None, clock=None, organization: str = "example.com"):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.organization = organization
        self.devices: list[dict] = []
        self.api_tokens: set[str] = set()
        self.clients: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.oauth_tokens: dict[str, tuple[float, set[str]]] = {}
        self.token_lifetime = 3600
        self.issued = 0
        self.etags = False
        self.rate_limited: int | None = None
        self.force_status: int | None = None
        self.requests: list[RecordedRequest] = []
        self._port = None

    def add_device(self, node_key: str, *, authorized: bool = True, external: bool = False) -> dict:
        """A device as the default field set shows it; ``node_key`` is "nodekey:<hex>"."""
        n = len(self.devices) + 1
        device = {
            "addresses": [f"100.64.0.{n}", f"fd7a:115c:a1e0::{n:x}"],
            "id": str(60828930103888200 + n), "nodeId": f"n{n:04d}CNTRL", "user": "amelie@example.com",
            "name": f"host{n}.tail1234.ts.net", "hostname": f"host{n}", "clientVersion": "1.90.0",
            "updateAvailable": False, "os": "linux", "created": "2026-01-01T00:00:00Z",
            "lastSeen": "2026-11-29T12:00:00Z", "keyExpiryDisabled": False, "expires": "2027-05-30T00:00:00Z",
            "authorized": authorized, "isExternal": external,
            "machineKey": "" if external else "mkey:" + "ab" * 32, "nodeKey": node_key,
            "blocksIncomingConnections": False, "tags": [], "tailnetLockKey": "nlpub:" + "cd" * 32,
            "tailnetLockError": "", "enabledRoutes": [], "advertisedRoutes": [],
            "clientConnectivity": {"endpoints": [], "derp": "", "mappingVariesByDestIP": False, "latency": {},
                                   "clientSupports": {}},
        }
        self.devices.append(device)
        return device

    def revoke_tokens(self) -> None:
        self.oauth_tokens.clear()

    def requests_to(self, path_end: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(path_end)]

    def start(self) -> FakeTailscaleAPI:
        self._port = self.reactor.listenTCP(0, Site(_Api(self)), interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def stop(self) -> defer.Deferred:
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
