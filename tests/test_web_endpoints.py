"""Main-listener and port-80 HTTP endpoints, over real loopback sockets."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource

from derpbox.metrics import Metrics
from derpbox.relay.relay import Relay
from derpbox.web.debug import DebugResource
from derpbox.web.endpoints import BROWSER_HEADERS, QuietSite, build_main_site
from derpbox.web.port80 import build_port80_site

from .support import exchange as raw_exchange

SECURITY_HEADERS = {name.decode().lower(): value.decode() for name, value in BROWSER_HEADERS.items()}
NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
CSP = (
    "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'self'; block-all-mixed-content; object-src 'none'"
)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


def request(method: str, target: str, headers: dict[str, str] | None = None,
            host: str | None = "derp.example.com", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(f, method: bytes) -> Response:
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = []
    while (line := f.readline()) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    resp = Response(status, headers, b"")
    if method != b"HEAD" and status not in (204, 304):
        resp.body = f.read(int(resp.get("content-length")))
    return resp


def _exchange_blocking(port: int, requests: list[bytes], check_close: bool) -> tuple[list[Response], bool]:
    """Send requests one after another on one connection.

    Returns the responses and, if asked, whether the server then closed the
    connection (that check waits up to half a second).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        f = sock.makefile("rb")
        responses = []
        for raw in requests:
            sock.sendall(raw)
            responses.append(_read_response(f, raw.split(b" ", 1)[0]))
        if not check_close:
            return responses, False
        sock.settimeout(0.5)
        try:
            return responses, f.read(1) == b""
        except TimeoutError:
            return responses, False


async def exchange(port: int, *requests: bytes) -> tuple[list[Response], bool]:
    # Blocking socket I/O runs in a thread so the reactor keeps serving.
    return await deferToThread(_exchange_blocking, port, list(requests), True)


async def fetch(port: int, raw: bytes) -> Response:
    responses, _ = await deferToThread(_exchange_blocking, port, [raw], False)
    return responses[0]


@pytest.fixture
def serve():
    ports = []

    def _serve(site) -> int:
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(listening)
        return listening.getHost().port

    yield _serve
    for listening in ports:
        pytest_twisted.blockon(listening.stopListening())


@pytest.fixture
def main_port(serve):
    return serve(build_main_site(derp_enabled=True, home="", hostname="derp.example.com"))


def assert_security_headers(resp: Response) -> None:
    assert resp.get("strict-transport-security") == "max-age=63072000; includeSubDomains"
    assert resp.get("content-security-policy") == CSP
    assert resp.get("x-frame-options") == "DENY"
    assert resp.get("x-content-type-options") == "nosniff"


def assert_no_browser_headers(resp: Response) -> None:
    for name in ("strict-transport-security", "content-security-policy", "x-frame-options"):
        assert resp.get(name) is None, name


def test_security_header_constants_match_spec():
    assert SECURITY_HEADERS == {
        "strict-transport-security": "max-age=63072000; includeSubDomains",
        "content-security-policy": CSP,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
    }


# /derp


@pytest.mark.parametrize("extra", [{}, {"Upgrade": "DERP", "Connection": "Upgrade"}])
@pytest_twisted.ensureDeferred
async def test_derp_without_takeover_is_426(main_port, extra):
    resp = await fetch(main_port, request("GET", "/derp", extra))
    assert resp.status == 426
    assert resp.body == b"DERP requires connection upgrade\n"
    assert resp.get("content-type") == "text/plain; charset=utf-8"
    assert resp.get("x-content-type-options") == "nosniff"
    assert resp.get("content-length") == str(len(resp.body))
    assert_no_browser_headers(resp)


@pytest_twisted.ensureDeferred
async def test_derp_disabled_is_404(serve):
    port = serve(build_main_site(derp_enabled=False, home="", hostname="h"))
    resp = await fetch(port, request("POST", "/derp", {"Content-Length": "0"}))
    assert resp.status == 404
    assert resp.body == b"derp server disabled\n"
    assert resp.get("content-type") == "text/plain; charset=utf-8"
    assert resp.get("x-content-type-options") == "nosniff"
    assert_no_browser_headers(resp)


# /derp/probe, /derp/latency-check


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("derp_enabled", [True, False])
@pytest_twisted.ensureDeferred
async def test_probe_ok(serve, path, method, derp_enabled):
    port = serve(build_main_site(derp_enabled=derp_enabled, home="", hostname="h"))
    resp = await fetch(port, request(method, path))
    assert resp.status == 200
    assert resp.body == b""
    assert resp.get("access-control-allow-origin") == "*"
    assert resp.get("content-length") == "0"
    assert resp.get("content-type") is None
    assert resp.get("x-content-type-options") is None
    assert_no_browser_headers(resp)


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
@pytest.mark.parametrize("method", ["POST", "OPTIONS", "PUT"])
@pytest_twisted.ensureDeferred
async def test_probe_bad_method(main_port, path, method):
    resp = await fetch(main_port, request(method, path, {"Content-Length": "0"}))
    assert resp.status == 405
    assert resp.body == b"bogus probe method\n"
    assert resp.get("content-type") == "text/plain; charset=utf-8"
    assert resp.get("access-control-allow-origin") is None


# /generate_204

CHALLENGE_64 = "ts_" + "a" * 55 + ".:-_19"
assert len(CHALLENGE_64) == 64


@pytest.mark.parametrize(
    ("challenge", "echoed"),
    [
        ("ts_192.0.2.1", True),
        ("ts_2001:db8::1", True),
        (CHALLENGE_64, True),
        (CHALLENGE_64 + "x", False),  # 65 chars
        ("ts_192.0.2.1/24", False),
        ("ts 192.0.2.1", False),
        ("ts_é", False),
        (None, False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_generate_204_challenge(main_port, challenge, echoed):
    headers = {} if challenge is None else {"X-Tailscale-Challenge": challenge}
    resp = await fetch(main_port, request("GET", "/generate_204", headers))
    assert resp.status == 204
    assert resp.get("cache-control") == NO_CACHE
    if echoed:
        assert resp.get("x-tailscale-response") == f"response {challenge}"
    else:
        assert resp.get("x-tailscale-response") is None
    assert resp.get("content-length") is None
    assert resp.get("content-type") is None
    assert_no_browser_headers(resp)


@pytest.mark.parametrize("method", ["POST", "HEAD", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_generate_204_any_method(main_port, method):
    resp = await fetch(main_port, request(method, "/generate_204",
                                          {"X-Tailscale-Challenge": "ts_10.0.0.1", "Content-Length": "0"}))
    assert resp.status == 204
    assert resp.get("x-tailscale-response") == "response ts_10.0.0.1"


# /robots.txt and /bootstrap-dns


@pytest_twisted.ensureDeferred
async def test_robots(main_port):
    resp = await fetch(main_port, request("GET", "/robots.txt"))
    assert resp.status == 200
    assert resp.body == b"User-agent: *\nDisallow: /\n"
    assert resp.get("content-length") == str(len(resp.body))
    assert_security_headers(resp)


@pytest_twisted.ensureDeferred
async def test_bootstrap_dns_closes_connection(main_port):
    (resp,), closed = await exchange(main_port, request("GET", "/bootstrap-dns"))
    assert resp.status == 200
    assert resp.body == b""
    assert resp.get("content-type") == "application/json"
    assert resp.get("content-length") == "0"
    assert resp.get("connection") == "close"
    assert_security_headers(resp)
    assert closed


# / and the fallback


@pytest.mark.parametrize("path", ["/", "/index.html", "/derp/", "/derpx", "/debug/", "/a/b?c=d"])
@pytest_twisted.ensureDeferred
async def test_home_default_page(main_port, path):
    resp = await fetch(main_port, request("GET", path))
    assert resp.status == 200
    assert resp.get("content-type") == "text/html; charset=utf-8"
    assert b"This is a " in resp.body and b"Tailscale</a> DERP server." in resp.body
    assert b"disabled" not in resp.body
    assert resp.get("content-length") == str(len(resp.body))
    assert_security_headers(resp)


@pytest_twisted.ensureDeferred
async def test_home_page_says_disabled(serve):
    port = serve(build_main_site(derp_enabled=False, home="", hostname="h"))
    resp = await fetch(port, request("GET", "/"))
    assert resp.status == 200
    assert b"<b>disabled</b>" in resp.body


@pytest_twisted.ensureDeferred
async def test_home_abuse_contact_only_on_tailscale_fleet(serve):
    ours = serve(build_main_site(derp_enabled=True, home="", hostname="derp.example.com"))
    theirs = serve(build_main_site(derp_enabled=True, home="", hostname="derp7.tailscale.com"))
    assert b"abuse" not in (await fetch(ours, request("GET", "/"))).body
    assert b"abuse" in (await fetch(theirs, request("GET", "/"))).body


@pytest_twisted.ensureDeferred
async def test_home_head_has_get_length(main_port):
    got = await fetch(main_port, request("GET", "/"))
    head = await fetch(main_port, request("HEAD", "/"))
    assert head.status == 200
    assert head.get("content-length") == str(len(got.body))


@pytest.mark.parametrize("path", ["/", "/nope"])
@pytest_twisted.ensureDeferred
async def test_home_blank(serve, path):
    port = serve(build_main_site(derp_enabled=True, home="blank", hostname="h"))
    resp = await fetch(port, request("GET", path))
    assert resp.status == 200
    assert resp.body == b""
    assert resp.get("content-type") == "text/html; charset=utf-8"
    assert resp.get("content-length") == "0"
    assert_security_headers(resp)


@pytest.mark.parametrize("home", ["https://example.com/derp-info", "http://example.net/"])
@pytest_twisted.ensureDeferred
async def test_home_redirect(serve, home):
    port = serve(build_main_site(derp_enabled=True, home=home, hostname="h"))
    resp = await fetch(port, request("GET", "/somewhere"))
    assert resp.status == 302
    assert resp.get("location") == home
    assert_security_headers(resp)


@pytest.mark.parametrize("home", ["blank2", "ftp://example.com/", "/local"])
def test_home_invalid_value_rejected(home):
    with pytest.raises(ValueError):
        build_main_site(derp_enabled=True, home=home, hostname="h")


# Whole-site properties


@pytest_twisted.ensureDeferred
async def test_connect_is_forbidden(main_port):
    resp = await fetch(main_port, request("CONNECT", "example.com:443", host="example.com:443"))
    assert resp.status == 403
    assert resp.body == b"CONNECT not enabled\n"
    assert resp.get("content-type") == "text/plain; charset=utf-8"


@pytest.mark.parametrize("path", ["/", "/derp", "/derp/probe", "/generate_204", "/robots.txt"])
@pytest_twisted.ensureDeferred
async def test_no_server_header_and_fresh_date(main_port, path):
    resp = await fetch(main_port, request("GET", path))
    assert resp.get("server") is None
    date = parsedate_to_datetime(resp.get("date"))
    assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 60


@pytest_twisted.ensureDeferred
async def test_keep_alive(main_port):
    responses, closed = await exchange(
        main_port,
        request("GET", "/derp/latency-check"),
        request("GET", "/generate_204", {"X-Tailscale-Challenge": "ts_1.2.3.4"}),
        request("HEAD", "/derp/probe"),
        request("GET", "/derp"),
        request("GET", "/robots.txt"),
    )
    assert [r.status for r in responses] == [200, 204, 200, 426, 200]
    assert responses[1].get("x-tailscale-response") == "response ts_1.2.3.4"
    assert responses[4].body == b"User-agent: *\nDisallow: /\n"
    assert not closed


@pytest_twisted.ensureDeferred
async def test_requests_are_not_logged(main_port):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        await fetch(main_port, request("GET", "/derp/probe", {"User-Agent": "probe-marker"}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "probe-marker" in repr(e)]


def test_only_http11_offered():
    site = build_main_site(derp_enabled=True, home="", hostname="h")
    assert site.acceptableProtocols() == [b"http/1.1"]
    assert build_port80_site().acceptableProtocols() == [b"http/1.1"]


# Port 80


@pytest.fixture
def port80(serve):
    answers = {"good-token": b"good-token.thumbprint"}
    return serve(build_port80_site(challenge_responder=answers.get))


@pytest_twisted.ensureDeferred
async def test_port80_generate_204(port80):
    resp = await fetch(port80, request("GET", "/generate_204", {"X-Tailscale-Challenge": "ts_192.0.2.7"}))
    assert resp.status == 204
    assert resp.get("x-tailscale-response") == "response ts_192.0.2.7"
    assert resp.get("cache-control") == NO_CACHE
    assert resp.get("server") is None


@pytest_twisted.ensureDeferred
async def test_port80_uses_given_generate_204_resource(serve):
    class Shared(Resource):
        def render(self, request):
            return b"shared"

    port = serve(build_port80_site(generate_204_resource=Shared()))
    resp = await fetch(port, request("GET", "/generate_204"))
    assert (resp.status, resp.body) == (200, b"shared")


@pytest_twisted.ensureDeferred
async def test_port80_acme_challenge(port80):
    resp = await fetch(port80, request("GET", "/.well-known/acme-challenge/good-token"))
    assert resp.status == 200
    assert resp.body == b"good-token.thumbprint"
    assert resp.get("content-type") == "text/plain; charset=utf-8"
    unknown = await fetch(port80, request("GET", "/.well-known/acme-challenge/other"))
    assert (unknown.status, unknown.body) == (404, b"404 page not found\n")


@pytest_twisted.ensureDeferred
async def test_port80_acme_without_responder(serve):
    port = serve(build_port80_site())
    resp = await fetch(port, request("GET", "/.well-known/acme-challenge/good-token"))
    assert (resp.status, resp.body) == (404, b"404 page not found\n")


@pytest.mark.parametrize("target", ["/debug/", "/debug/varz", "/debugx", "/debug?x=1"])
@pytest_twisted.ensureDeferred
async def test_port80_debug_not_found(port80, target):
    resp = await fetch(port80, request("GET", target))
    assert (resp.status, resp.body) == (404, b"404 page not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "OPTIONS", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_port80_other_methods_use_https(port80, method):
    resp = await fetch(port80, request(method, "/", {"Content-Length": "0"}))
    assert resp.status == 400
    assert resp.body == b"Use HTTPS\n"
    assert resp.get("content-type") == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("method", "host", "target", "location"),
    [
        ("GET", "Derp.Example.com:80", "/a/b%20c?x=1&y=%2F", "https://Derp.Example.com/a/b%20c?x=1&y=%2F"),
        ("HEAD", "192.0.2.1", "/", "https://192.0.2.1/"),
        ("GET", "[2001:db8::1]:80", "/derp", "https://[2001:db8::1]/derp"),
        ("GET", "[2001:db8::1]", "/", "https://[2001:db8::1]/"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_port80_redirects_to_https(port80, method, host, target, location):
    resp = await fetch(port80, request(method, target, host=host))
    assert resp.status == 302
    assert resp.get("location") == location
    assert resp.get("server") is None


@pytest.mark.parametrize(("host", "location"), [
    ("derp.example.com:80", "https://derp.example.com:8443/x"),
    ("derp.example.com", "https://derp.example.com:8443/x"),
    ("[2001:db8::1]:8080", "https://[2001:db8::1]:8443/x"),
])
@pytest_twisted.ensureDeferred
async def test_port80_redirects_to_the_port_clients_use(serve, host, location):
    """Not port 80's own number from the Host: the DERP port (-public-port, else -a's)."""
    port = serve(build_port80_site(https_port=lambda: 8443))
    resp = await fetch(port, request("GET", "/x", host=host))
    assert (resp.status, resp.get("location")) == (302, location)


@pytest_twisted.ensureDeferred
async def test_port80_missing_host(port80):
    resp = await fetch(port80, request("GET", "/", host=None, version="HTTP/1.0"))
    assert resp.status == 400
    assert resp.body == b"missing Host header\n"


# Debug subtree mounted (derpbox.web.debug), main site and port 80


@pytest.fixture
def debug_sites(serve):
    relay = Relay(PrivateKey.generate(), reactor)
    debug = DebugResource(Metrics(relay), hostname="derp.example.com", clock=Clock(), environ={})
    site = build_main_site(derp_enabled=True, home="", hostname="derp.example.com", debug=debug)
    return serve(site), serve(build_port80_site(main_resource=site.resource, environ={}))


@pytest.mark.parametrize("which", [0, 1])
@pytest_twisted.ensureDeferred
async def test_debug_mounted_with_acl(debug_sites, which):
    port = debug_sites[which]
    ok = await fetch(port, request("GET", "/debug/check"))
    assert (ok.status, ok.body) == (200, b"derp.Server ConsistencyCheck okay")
    denied = await fetch(port, request("GET", "/debug/check", {"X-Forwarded-For": "192.0.2.1"}))
    assert (denied.status, denied.body) == (403, b"debug access denied\n")
    missing = await fetch(port, request("GET", "/debug/missing"))
    assert missing.status == 404


@pytest_twisted.ensureDeferred
async def test_debug_mount_keeps_other_paths(debug_sites):
    main, p80 = debug_sites
    home = await fetch(main, request("GET", "/debugx"))
    assert home.status == 200 and b"DERP server" in home.body
    redirect = await fetch(p80, request("GET", "/"))
    assert redirect.get("location") == "https://derp.example.com/debug/"
    redirect = await fetch(p80, request("GET", "/x"))
    assert redirect.get("location") == "https://derp.example.com/x"


# -- bounded requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", [b"Content-Length: 10737418240", b"Transfer-Encoding: chunked"])
@pytest_twisted.ensureDeferred
async def test_a_request_body_is_refused_before_it_is_read(serve, framing):
    port = serve(build_main_site(derp_enabled=True, home="", hostname="derp.example.com"))
    reply = await deferToThread(raw_exchange, port, b"POST /derp/probe HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n0123")
    assert reply.startswith(b"HTTP/1.1 413 ") and reply.endswith(b"no endpoint takes a request body\n")


def clocked_channel():
    """The main site's HTTP channel on a fake clock: (clock, channel, transport)."""
    from twisted.internet.testing import StringTransport

    clock = Clock()
    site = QuietSite(build_main_site(derp_enabled=True, home="", hostname="derp.example.com").resource, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, channel, transport


def test_a_trickled_request_is_cut_at_its_deadline():
    from derpbox.web.endpoints import REQUEST_DEADLINE

    clock, channel, transport = clocked_channel()
    channel.dataReceived(b"GET /derp/probe HTTP/1.1\r\n")
    for _ in range(int(REQUEST_DEADLINE) - 1):
        clock.advance(1)
        channel.dataReceived(b"X-Slow: 1\r\n")  # every byte resets Twisted's idle timer; not this one
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting or transport.disconnected
    channel.connectionLost(None)


def test_a_complete_request_stops_its_deadline():
    from derpbox.web.endpoints import REQUEST_DEADLINE

    clock, channel, transport = clocked_channel()
    channel.dataReceived(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(REQUEST_DEADLINE + 1)  # kept alive, idle: only Twisted's idle timeout applies
    assert channel._deadline is None


def test_a_body_trickled_after_the_413_is_ignored_and_the_connection_cut(log_lines):
    from derpbox.web.endpoints import CLOSE_GRACE

    clock, channel, transport = clocked_channel()
    channel.dataReceived(b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting
    for _ in range(5):
        channel.dataReceived(b"x")  # Twisted would hand these to a request that is gone
    assert not any("Traceback" in line or "Unhandled" in line for line in log_lines)
    assert not transport.disconnected
    # A client that never lets go (no TLS close_notify) is cut off shortly after the reply.
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected
    channel.connectionLost(None)


def test_a_refused_head_is_cut_off_after_the_grace_not_the_request_deadline():
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web.server import Site

    from derpbox.web.connection import FrontFactory
    from derpbox.web.endpoints import CLOSE_GRACE

    clock = Clock()
    relay = Relay(PrivateKey.generate(), clock)
    factory = FrontFactory(relay, Site(Resource()), clock)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
    conn = factory.buildProtocol(None)
    conn.makeConnection(transport)
    conn.dataReceived(b"GET / HTTP/9.9\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 505 ") and transport.disconnecting
    sent = transport.value()
    conn.dataReceived(b"GARBAGE\r\n\r\n")  # not read as another request
    assert transport.value() == sent and relay.stats.http_refusals["505"] == 1
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected


@pytest_twisted.inlineCallbacks
def test_an_answer_that_comes_after_the_client_left_is_dropped_quietly():
    from twisted.internet.defer import Deferred
    from twisted.web.server import Site

    from derpbox.web.endpoints import reply_later

    from .support import wait_for

    answer, left = Deferred(), []

    class Slow(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.notifyFinish().addErrback(left.append)
            return reply_later(request, answer)

    errors = []

    def observer(event):
        if event.get("isError") or event.get("log_failure"):
            errors.append(event)

    port = reactor.listenTCP(0, Site(Slow()), interface="127.0.0.1")
    globalLogPublisher.addObserver(observer)
    try:
        def ask_and_leave():
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

        yield deferToThread(ask_and_leave)
        yield wait_for(lambda: left)
        answer.callback(b"too late")
        # Finishing a request whose client left raises inside the callback.
        answer.addErrback(errors.append)
    finally:
        globalLogPublisher.removeObserver(observer)
        yield port.stopListening()
    assert errors == []
