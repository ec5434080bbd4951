"""Client admission backends against contract-faithful fakes, over real sockets.

The fakes (tests/fakes) follow the upstream contracts in spec section 5; each has a
contract test here that talks to it with a raw socket, independent of derpbox.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import pytest
import pytest_twisted
from twisted.internet import defer, ssl, task
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import BrowserLikePolicyForHTTPS

from derpbox.admission import Admission, AdmissionConfigError, AdmissionStats, AllowlistError, Decision
from derpbox.admission.decision import CHECKS, OUTCOMES
from derpbox.admission.ratelimit import PerKeyLimiter
from derpbox.admission.verify_url import decode_admit_response, go_source, request_body

from .conftest import make_cert
from .fakes.headscale import BlackHole, FakeHeadscale
from .fakes.tailscaled import FakeTailscaled


def reactor():
    from twisted.internet import reactor

    return reactor


def key(n: int) -> bytes:
    return bytes([n]) * 32


def nk(k: bytes) -> str:
    return "nodekey:" + k.hex()


A, B, C = key(1), key(2), key(3)


@pytest.fixture
def sock_dir():
    # Unix socket paths must stay short (108 bytes): not under pytest's tmp_path.
    path = tempfile.mkdtemp(prefix="dbx", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tailscaled(sock_dir, request):
    fake = FakeTailscaled(os.path.join(sock_dir, "tailscaled.sock"), nodes=[nk(A)]).start()
    request.addfinalizer(lambda: pytest_twisted.blockon(fake.stop()))
    return fake


@pytest.fixture
def headscale(request):
    fakes = []

    def make(nodes=(nk(A),), **start):
        fake = FakeHeadscale(nodes).start(**start)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        pytest_twisted.blockon(fake.stop())


@pytest.fixture
def blackhole(request):
    hole = BlackHole().start()
    request.addfinalizer(lambda: pytest_twisted.blockon(hole.stop()))
    return hole


def refused_url() -> str:
    """An http URL on a loopback port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/verify"


def admission(**kw) -> Admission:
    args = dict(reactor=reactor(), verify_clients=False, socket_path="", urls=(), fail_open=True)
    args.update(kw)
    return Admission(**args)


def sleep(seconds):
    return deferLater(reactor(), seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        yield sleep(0.02)


def raw_http(family, address, data: bytes, timeout=2.0) -> bytes:
    """Send ``data`` on a fresh socket and read until the peer closes (blocking; run in a thread)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def parse_response(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return status, headers, body


def localapi(path: str, *, host="local-tailscaled.sock", extra="") -> bytes:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return f"GET {path} HTTP/1.1\r\n{host_line}{extra}Connection: close\r\n\r\n".encode()


# -- the fakes' own contracts -------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_fake_tailscaled_contract(tailscaled):
    ask = lambda data: deferToThread(raw_http, socket.AF_UNIX, tailscaled.path, data)  # noqa: E731
    whois = "/localapi/v0/whois?addr=nodekey%3A"

    status, headers, body = parse_response((yield ask(localapi(whois + A.hex()))))
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    assert reply["Node"]["Key"] == nk(A) and "UserProfile" in reply and reply["CapMap"] == {}

    status, _, body = parse_response((yield ask(localapi(whois + B.hex()))))
    assert (status, body) == (404, b"no match for IP:port\n")
    status, _, body = parse_response((yield ask(localapi("/localapi/v0/whois?addr=nonsense"))))
    assert (status, body) == (400, b"invalid 'addr' parameter\n")
    status, _, body = parse_response((yield ask(localapi("/localapi/v0/whois?addr=nodekey%3Azz"))))
    assert (status, body) == (400, b"invalid nodekey in 'addr' parameter\n")
    status, _, body = parse_response((yield ask(localapi("/localapi/v0/whois"))))
    assert (status, body) == (400, b"missing 'addr' parameter\n")
    status, _, _ = parse_response((yield ask(localapi("/localapi/v0/status"))))
    assert status == 404

    # The LocalAPI guard: Referer, Origin, or a foreign Host -> 403; an empty Host is fine.
    for request in (
        localapi(whois + A.hex(), extra="Referer: http://evil.example/\r\n"),
        localapi(whois + A.hex(), extra="Origin: http://evil.example\r\n"),
        localapi(whois + A.hex(), host="evil.example"),
    ):
        status, _, body = parse_response((yield ask(request)))
        assert (status, body) == (403, b"invalid localapi request\n")
    status, _, _ = parse_response((yield ask(localapi(whois + A.hex(), host=""))))
    assert status == 200

    tailscaled.mode = "old"
    status, _, body = parse_response((yield ask(localapi(whois + A.hex()))))
    assert (status, body) == (400, b"invalid 'addr' parameter\n")

    tailscaled.mode = "hang"
    raw = yield deferToThread(raw_http, socket.AF_UNIX, tailscaled.path, localapi(whois + A.hex()), 0.3)
    assert raw == b""  # nothing within 0.3 s; our client hung up, which releases the request

    assert len(tailscaled.requests) == 12
    assert tailscaled.requests[0].args == {"addr": [nk(A)]}
    assert tailscaled.requests[0].query == "addr=nodekey%3A" + A.hex()

    # Stop deletes the socket file; start binds the same path again.
    yield tailscaled.stop()
    assert not os.path.exists(tailscaled.path)
    tailscaled.mode = "normal"
    tailscaled.start()
    status, _, _ = parse_response((yield ask(localapi(whois + A.hex()))))
    assert status == 200


@pytest_twisted.inlineCallbacks
def test_fake_headscale_contract(headscale):
    fake = headscale()
    address = ("127.0.0.1", fake.port)

    def post(body: bytes, method="POST", path="/verify"):
        head = f"{method} {path} HTTP/1.1\r\nHost: hs\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return deferToThread(raw_http, socket.AF_INET, address, head.encode() + body)

    status, headers, body = parse_response((yield post(request_body(nk(A), "192.0.2.1"))))
    assert (status, headers["content-type"], body) == (200, "application/json", b'{"Allow":true}\n')
    status, _, body = parse_response((yield post(request_body(nk(B), "192.0.2.1"))))
    assert (status, body) == (200, b'{"Allow":false}\n')
    # Go decoding: names case-insensitive, Source ignored but must be an IP or empty.
    status, _, body = parse_response((yield post(b'{"nodepublic":"%s","source":""}' % nk(A).encode())))
    assert (status, body) == (200, b'{"Allow":true}\n')
    status, _, body = parse_response((yield post(b'{"NodePublic":"%s","Source":"x"}' % nk(A).encode())))
    assert (status, body) == (400, b"Bad Request: invalid JSON\n")
    status, _, body = parse_response((yield post(b"not json")))
    assert (status, body) == (400, b"Bad Request: invalid JSON\n")
    status, _, body = parse_response((yield post(b"{" + b" " * 4096 + b"}")))
    assert (status, body) == (413, b"request body too large\n")
    status, _, body = parse_response((yield post(b"", method="GET")))
    assert (status, body) == (405, b"method not allowed\n")
    status, _, _ = parse_response((yield post(b"", path="/other")))
    assert status == 404
    assert [r.method for r in fake.requests] == ["POST"] * 6 + ["GET", "POST"]
    assert fake.requests[0].body == request_body(nk(A), "192.0.2.1")

    fake.force_status, fake.force_body = 500, b"boom"
    status, _, body = parse_response((yield post(request_body(nk(A), ""))))
    assert (status, body) == (500, b"boom")
    fake.force_status = fake.force_body = None
    fake.hang = True
    raw = yield deferToThread(raw_http, socket.AF_INET, address, b"POST /verify HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2\r\n\r\n{}", 0.3)
    assert raw == b""


# -- Decision / stats shape ---------------------------------------------------------------


def test_stats_precreate_every_pair_and_decision_is_frozen():
    stats = AdmissionStats()
    assert set(stats.decisions) == {(c, o) for c in CHECKS for o in OUTCOMES}
    assert all(v == 0 for v in stats.decisions.values())
    d = Decision(True, "none", "x")
    with pytest.raises(AttributeError):
        d.allow = False


@pytest_twisted.inlineCallbacks
def test_nothing_enabled_admits():
    adm = admission()
    assert not adm.enabled
    decision = yield adm.check(A, "192.0.2.1")
    assert decision == Decision(True, "none", "no client verification configured")
    assert adm.stats.decisions[("none", "allow")] == 1


# -- tailscaled ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_tailscaled_allow_reject_and_request_shape(tailscaled):
    adm = admission(verify_clients=True, socket_path=tailscaled.path)
    assert adm.enabled
    ok = yield adm.check(A, "192.0.2.1")
    assert ok.allow and ok.check == "tailscaled"
    no = yield adm.check(B, "192.0.2.1")
    assert no == Decision(False, "tailscaled", "node key not in tailnet (tailscaled 404)")
    assert adm.stats.decisions[("tailscaled", "allow")] == 1
    assert adm.stats.decisions[("tailscaled", "reject")] == 1

    # Exactly what LocalClient.WhoIsNodeKey sends; never Referer or Origin.
    for req, k in zip(tailscaled.requests, (A, B)):
        assert req.method == "GET"
        assert req.path == "/localapi/v0/whois"
        assert req.query == "addr=nodekey%3A" + k.hex()
        assert req.header("host") == "local-tailscaled.sock"
        assert int(req.header("tailscale-cap")) >= 100
        assert "referer" not in req.headers and "origin" not in req.headers
    # A new connection for every check.
    assert tailscaled.connections == 2


@pytest_twisted.inlineCallbacks
def test_tailscaled_too_old_logs_once(tailscaled, log_lines):
    tailscaled.mode = "old"
    adm = admission(verify_clients=True, socket_path=tailscaled.path)
    for k in (A, B, A):
        decision = yield adm.check(k, "192.0.2.1")
        assert not decision.allow and decision.check == "tailscaled"
        assert "too old" in decision.reason
    assert len([line for line in log_lines if "too old" in line and "version skew" in line]) == 1
    assert adm.stats.decisions[("tailscaled", "error")] == 3
    # Upgraded: it works, and a later skew episode is reported again.
    tailscaled.mode = "normal"
    assert (yield adm.check(A, "192.0.2.1")).allow
    tailscaled.mode = "old"
    yield adm.check(A, "192.0.2.1")
    assert len([line for line in log_lines if "version skew" in line]) == 2


@pytest_twisted.inlineCallbacks
def test_tailscaled_socket_recreated_and_outage_logged_once(tailscaled, log_lines):
    adm = admission(verify_clients=True, socket_path=tailscaled.path)
    assert (yield adm.check(A, "192.0.2.1")).allow
    yield tailscaled.stop()
    for n in range(10, 15):
        decision = yield adm.check(key(n), "192.0.2.1")
        assert not decision.allow and decision.check == "tailscaled"
        assert "unreachable" in decision.reason and "no fail-open" in decision.reason
    # One line for the outage, none per rejected client.
    outage = [line for line in log_lines if "tailscaled" in line and "unreachable" in line]
    assert len(outage) == 1 and tailscaled.path in outage[0]
    assert not [line for line in log_lines if "rejected by" in line]
    # tailscaled restarts and re-creates its socket: the same Admission uses it.
    tailscaled.start()
    assert (yield adm.check(A, "192.0.2.1")).allow
    back = [line for line in log_lines if "reachable again" in line]
    assert len(back) == 1 and "5 client checks were rejected" in back[0]


@pytest_twisted.inlineCallbacks
def test_tailscaled_hung_times_out(tailscaled, log_lines):
    tailscaled.mode = "hang"
    adm = admission(verify_clients=True, socket_path=tailscaled.path, tailscaled_timeout=0.3)
    started = time.monotonic()
    decision = yield adm.check(A, "192.0.2.1")
    assert 0.25 < time.monotonic() - started < 2
    assert not decision.allow and "no answer within 0.3 s" in decision.reason
    yield wait_for(lambda: tailscaled.held == 0)  # we hung up
    assert any("is unreachable" in line for line in log_lines)


def test_tailscaled_default_timeout_is_5s():
    adm = admission(verify_clients=True, socket_path="/nonexistent")
    assert adm.tailscaled.timeout == 5.0


@pytest_twisted.inlineCallbacks
def test_tailscaled_socket_search_is_per_check(sock_dir, request):
    first, second = os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock")
    adm = admission(verify_clients=True, socket_path="", tailscaled_sockets=(first, second))
    none = yield adm.check(A, "192.0.2.1")
    assert none.reason == f"tailscaled unreachable at any of {first}, {second} (no socket file); no fail-open"
    fake_b = FakeTailscaled(second, nodes=[nk(A)]).start()
    request.addfinalizer(lambda: pytest_twisted.blockon(fake_b.stop()))
    assert (yield adm.check(A, "192.0.2.1")).allow
    fake_a = FakeTailscaled(first, nodes=[nk(B)]).start()
    request.addfinalizer(lambda: pytest_twisted.blockon(fake_a.stop()))
    assert not (yield adm.check(A, "192.0.2.1")).allow  # the first existing path wins
    assert (yield adm.check(B, "192.0.2.1")).allow


@pytest_twisted.inlineCallbacks
def test_tailscaled_probe(tailscaled, log_lines):
    adm = admission(verify_clients=True, socket_path=tailscaled.path)
    (line,) = yield adm.probe()
    assert "reachable, node-key lookups work" in line and tailscaled.path in line and "no fail-open" in line
    assert line in log_lines
    tailscaled.mode = "old"
    (line,) = yield adm.probe()
    assert "too old" in line and "REJECTED" in line
    yield tailscaled.stop()
    (line,) = yield adm.probe()
    assert "unreachable" in line and "REJECTED while it is down" in line


@pytest.fixture
def two_tailnets(sock_dir, request):
    """Two tailscaleds, one per tailnet: A is in the first, B in the second."""
    fakes = [FakeTailscaled(os.path.join(sock_dir, f"tailnet{i}.sock"), nodes=[nk(k)]).start()
             for i, k in enumerate((A, B))]
    for fake in fakes:
        request.addfinalizer(lambda fake=fake: pytest_twisted.blockon(fake.stop()))
    return fakes


@pytest_twisted.inlineCallbacks
def test_several_sockets_admit_a_key_any_tailnet_knows(two_tailnets):
    one, two = two_tailnets
    adm = admission(verify_clients=True, socket_path=f"{one.path}, {two.path}", cache_ttl=60)
    a = yield adm.check(A, "192.0.2.1")
    b = yield adm.check(B, "192.0.2.1")
    c = yield adm.check(C, "192.0.2.1")
    assert a.allow and b.allow and a.check == b.check == "tailscaled"
    assert two.path in b.reason and "whois 200" in b.reason
    assert c == Decision(False, "tailscaled", "node key not in any of the 2 tailnets (tailscaled 404 from each)")
    # Each tailnet was asked about each key, at once.
    assert [r.query[-64:] for r in one.requests] == [r.query[-64:] for r in two.requests] == [A.hex(), B.hex(), C.hex()]
    assert adm.stats.decisions[("tailscaled", "allow")] == 2 and adm.stats.decisions[("tailscaled", "reject")] == 1
    lines = yield adm.probe()
    assert [one.path in lines[0], two.path in lines[1]] == [True, True]
    assert all("reachable, node-key lookups work" in line for line in lines[:2])


@pytest_twisted.inlineCallbacks
def test_several_sockets_one_tailnet_down(two_tailnets):
    one, two = two_tailnets
    yield one.stop()
    adm = admission(verify_clients=True, socket_path=f"{one.path},{two.path}", cache_ttl=60)
    assert (yield adm.check(B, "192.0.2.1")).allow
    unknown = yield adm.check(C, "192.0.2.1")
    # The tailnet that could not answer may know the key: an error, not a cached "no".
    assert not unknown.allow and one.path in unknown.reason and "unreachable" in unknown.reason
    assert adm.stats.decisions[("tailscaled", "error")] == 1
    assert adm.cache.get(C) is None and adm.cache.get(B) is not None


# -- admission URL ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_url_checks_keep_their_connection_and_resend_when_the_server_closed_it(headscale):
    hs = headscale(nodes=(nk(A), nk(B)))
    adm = admission(urls=(hs.url,), fail_open=False)
    pool = adm.url_checks.urls[0].pool

    def kept():
        return sum(map(len, pool._connections.values()))

    try:
        assert (yield adm.check(A, "192.0.2.1")).allow
        yield wait_for(lambda: kept() == 1)  # the answer arrives a moment before the connection is free
        assert (yield adm.check(B, "192.0.2.1")).allow
        yield wait_for(lambda: kept() == 1)
        assert hs.connections == 1  # kept and reused, as Go's http.DefaultClient does
        # The server closes the kept connection just as the next check goes out on it:
        # the check is sent again on a new one, not taken for an outage.
        hs.drop_next = 1
        again = yield adm.check(A, "192.0.2.1")
        assert again.allow and adm.stats.decisions[("url", "error")] == 0
        assert hs.connections == 2 and len(hs.requests) == 4
    finally:
        adm.stop()


FAIL_OPEN_MATRIX = [
    # scenario, allowed with fail-open on, allowed with it off, words in the reason
    ("refused", True, False, "connection refused"),
    ("silent", True, False, "no response within 0.5 s"),
    ("status500", False, False, "HTTP 500"),
    ("badjson", False, False, "invalid JSON"),
    ("deny", False, False, "Allow:false"),
    ("allow", True, True, "allows"),
]


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
@pytest.mark.parametrize("scenario,open_allows,closed_allows,words", FAIL_OPEN_MATRIX)
@pytest_twisted.inlineCallbacks
def test_url_fail_open_matrix(headscale, blackhole, scenario, open_allows, closed_allows, words, fail_open):
    if scenario == "refused":
        url = refused_url()
    elif scenario == "silent":
        url = blackhole.url
    else:
        fake = headscale(nodes=[nk(A)] if scenario != "deny" else [])
        fake.force_status = 500 if scenario == "status500" else None
        fake.force_body = b"not json" if scenario == "badjson" else None
        url = fake.url
    # Twisted reports a refused connect only after its 0.3 s happy-eyeballs step, so
    # only the silent server gets the short timeout.
    adm = admission(urls=(url,), fail_open=fail_open, url_timeout=0.5 if scenario == "silent" else 5)
    decision = yield adm.check(A, "192.0.2.1")
    assert decision.allow is (open_allows if fail_open else closed_allows)
    assert decision.check == "url"
    assert words in decision.reason
    if scenario in ("refused", "silent"):
        outcome = "fail_open" if fail_open else "error"
        assert ("fail-open admits" if fail_open else "fail-open is off") in decision.reason
    else:
        outcome = {"status500": "error", "badjson": "error", "deny": "reject", "allow": "allow"}[scenario]
    assert adm.stats.decisions[("url", outcome)] == 1


@pytest_twisted.inlineCallbacks
def test_url_request_bytes(headscale):
    fake = headscale()
    adm = admission(urls=(fake.url,))
    yield adm.check(A, "192.0.2.7")
    yield adm.check(A, "::ffff:192.0.2.8")
    yield adm.check(A, "2001:DB8::1")
    yield adm.check(A, "not an address")
    sources = [json.loads(r.body)["Source"] for r in fake.requests]
    assert sources == ["192.0.2.7", "192.0.2.8", "2001:db8::1", ""]
    req = fake.requests[0]
    assert req.method == "POST" and req.path == "/verify"
    assert req.body == b'{"NodePublic":"nodekey:' + A.hex().encode() + b'","Source":"192.0.2.7"}'
    assert req.header("content-type") is None
    assert req.header("content-length") == str(len(req.body))
    assert req.header("authorization") is None and req.header("referer") is None

    # user:password@ in the URL becomes Basic auth, as Go's client does; never logged.
    fake.requests.clear()
    adm = admission(urls=(f"http://derp:s3cret@127.0.0.1:{fake.port}/verify",))
    decision = yield adm.check(A, "192.0.2.7")
    assert decision.allow and "s3cret" not in decision.reason
    assert fake.requests[0].header("authorization") == "Basic ZGVycDpzM2NyZXQ="


def test_go_source_and_body_helpers():
    assert go_source("fe80::1%eth0") == "fe80::1%eth0"
    assert go_source("") == ""
    assert request_body(nk(A), "") == b'{"NodePublic":"%s","Source":""}' % nk(A).encode()


@pytest.mark.parametrize(
    "body,allow",
    [
        (b'{"Allow":true}', True),
        (b'{"allow":true}', True),  # Go matches field names case-insensitively
        (b'{"ALLOW":true,"Extra":[1,2]}', True),
        (b' \n{"Allow":true} trailing garbage', True),  # json.Decoder reads one value
        (b'{"Allow":true,"allow":false}', False),  # the last one wins
        (b'{"Allow":null}', False),
        (b"null", False),
        (b"{}", False),
        (b'{"Allow":"true"}', None),
        (b'{"Allow":1}', None),
        (b"[true]", None),
        (b"true", None),
        (b"", None),
        (b'{"Allow":true', None),
        (b'{"Allow":NaN}', None),
    ],
)
def test_decode_admit_response_like_go(body, allow):
    assert decode_admit_response(body)[0] is allow


@pytest_twisted.inlineCallbacks
def test_url_redirects_like_go(headscale):
    fake = headscale()
    fake.redirects = {"/see-other": (303, "/verify"), "/temporary": (307, "/verify"), "/moved": (301, "/verify")}
    adm = admission(urls=(fake.base + "/temporary",))
    decision = yield adm.check(A, "192.0.2.1")
    assert decision.allow
    (first, second) = fake.requests
    assert (first.method, first.path, second.method, second.path) == ("POST", "/temporary", "POST", "/verify")
    assert second.body == first.body == request_body(nk(A), "192.0.2.1")

    for path in ("/see-other", "/moved"):
        fake.requests.clear()
        adm = admission(urls=(fake.base + path,))
        decision = yield adm.check(A, "192.0.2.1")
        # POST became a body-less GET, which Headscale's /verify refuses: rejected, not fail-open.
        (first, second) = fake.requests
        assert (first.method, second.method, second.path, second.body) == ("POST", "GET", "/verify", b"")
        assert not decision.allow and "HTTP 405" in decision.reason


@pytest_twisted.inlineCallbacks
def test_url_redirect_loop_is_a_request_failure(headscale):
    fake = headscale()
    fake.redirects = {"/loop": (302, "/loop")}
    for fail_open in (True, False):
        fake.requests.clear()
        adm = admission(urls=(fake.base + "/loop",), fail_open=fail_open)
        decision = yield adm.check(A, "192.0.2.1")
        assert len(fake.requests) == 10
        assert "stopped after 10 redirects" in decision.reason
        assert decision.allow is fail_open  # Go's Do() fails, so fail-open applies


@pytest_twisted.inlineCallbacks
def test_url_body_limit(headscale):
    fake = headscale()
    adm = admission(urls=(fake.url,))
    fake.force_body = b'{"Allow":true,"pad":"' + b"x" * 5000 + b'"}'
    decision = yield adm.check(A, "192.0.2.1")
    assert not decision.allow and "4096" in decision.reason
    # A whole value within 4 KiB is enough, whatever follows (Go's json.Decoder).
    fake.force_body = b'{"Allow":true}' + b" " * 5000
    assert (yield adm.check(A, "192.0.2.1")).allow


@pytest_twisted.inlineCallbacks
def test_url_body_stall_rejects_even_with_fail_open(headscale):
    fake = headscale()
    fake.partial_body = b'{"Allow":tr'
    adm = admission(urls=(fake.url,), fail_open=True, url_timeout=0.3)
    decision = yield adm.check(A, "192.0.2.1")
    assert not decision.allow and "body not complete within 0.3 s" in decision.reason
    yield wait_for(lambda: not fake._held)
    # A whole object arrives and the body never ends: decided without waiting (Go's decoder stops there).
    fake.partial_body = b'{"Allow":true}'
    started = time.monotonic()
    assert (yield adm.check(A, "192.0.2.1")).allow
    assert time.monotonic() - started < 0.25


@pytest_twisted.inlineCallbacks
def test_url_outage_logged_once_per_episode(headscale, log_lines):
    fake = headscale()
    port = fake.port
    adm = admission(urls=(fake.url,), fail_open=True)
    url = fake.url
    yield fake.stop()
    for k in (A, B, A, B):
        assert (yield adm.check(k, "192.0.2.1")).allow
    outage = [line for line in log_lines if "is unreachable" in line]
    assert len(outage) == 1 and url in outage[0] and "ADMITTED" in outage[0]
    # Per-client fail-open lines: once per key per minute.
    assert len([line for line in log_lines if "allowing client" in line]) == 2
    fake.start(port=port)
    assert (yield adm.check(A, "192.0.2.1")).allow
    assert len([line for line in log_lines if "answers properly again" in line]) == 1


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # Twisted's PrivateCertificate
@pytest_twisted.inlineCallbacks
def test_https_url_verifies_certificates(headscale, tmp_path):
    ca, crt, key_path = make_cert(tmp_path / "certs", "127.0.0.1")
    server_cert = ssl.PrivateCertificate.loadPEM(crt.read_text() + key_path.read_text())
    fake = headscale(tls=server_cert.options())
    assert fake.url.startswith("https://")
    for fail_open in (True, False):
        adm = admission(urls=(fake.url,), fail_open=fail_open)
        decision = yield adm.check(A, "192.0.2.1")
        assert decision.allow is fail_open and "TLS" in decision.reason
    assert fake.requests == []  # nothing was sent over the untrusted connection
    trusting = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca.read_text()))
    adm = admission(urls=(fake.url,), fail_open=False, https_policy=trusting)
    decision = yield adm.check(A, "192.0.2.1")
    assert decision.allow and decision.reason == f"admission URL {fake.url} allows"


@pytest_twisted.inlineCallbacks
def test_multiple_urls_any_admits(headscale, blackhole):
    tailnet1, tailnet2 = headscale(nodes=[nk(A)]), headscale(nodes=[nk(B)])
    adm = admission(urls=(tailnet1.url, tailnet2.url), fail_open=False)
    one = yield adm.check(A, "192.0.2.1")
    two = yield adm.check(B, "192.0.2.1")
    assert one.allow and tailnet1.url in one.reason
    assert two.allow and tailnet2.url in two.reason
    neither = yield adm.check(C, "192.0.2.1")
    assert not neither.allow and tailnet1.url in neither.reason and tailnet2.url in neither.reason
    assert adm.stats.decisions[("url", "reject")] == 1

    # One tailnet's verifier is down: with fail-open its members must still get in,
    # so the client is admitted even though the other tailnet says no.
    down = refused_url()
    adm = admission(urls=(down, tailnet2.url), fail_open=True)
    decision = yield adm.check(C, "192.0.2.1")
    assert decision.allow and down in decision.reason and "fail-open admits" in decision.reason
    adm = admission(urls=(down, tailnet2.url), fail_open=False)
    decision = yield adm.check(C, "192.0.2.1")
    assert not decision.allow and adm.stats.decisions[("url", "error")] == 1

    # An explicit allow does not wait for a slow verifier.
    adm = admission(urls=(blackhole.url, tailnet1.url), fail_open=False, url_timeout=3)
    started = time.monotonic()
    decision = yield adm.check(A, "192.0.2.1")
    assert decision.allow and time.monotonic() - started < 1


def test_bad_url_is_a_config_error():
    with pytest.raises(AdmissionConfigError, match="ftp://x/verify"):
        admission(urls=("ftp://x/verify",))


@pytest_twisted.inlineCallbacks
def test_url_probe_lines(headscale, log_lines):
    fake = headscale()
    down = refused_url()
    adm = admission(urls=(fake.url, down), fail_open=True)
    up_line, down_line = yield adm.probe()
    assert up_line.startswith(f"admission URL {fake.url}: reachable") and "fail-open is ON" in up_line
    assert down_line == (
        f"admission URL {down}: unreachable (connection refused); fail-open is ON: "
        "clients will be ADMITTED while it is down"
    )
    assert up_line in log_lines and down_line in log_lines
    adm = admission(urls=(down,), fail_open=False)
    (line,) = yield adm.probe()
    assert line.endswith("fail-open is off: clients will be REJECTED while it is down")
    fake.force_status = 500
    adm = admission(urls=(fake.url,), fail_open=True)
    (line,) = yield adm.probe()
    assert "HTTP 500" in line and "REJECTED" in line
    (line,) = yield admission().probe()
    assert "no check enabled" in line


def test_userinfo_never_logged():
    adm = admission(urls=("https://user:secret@hs.example/verify",))
    assert adm.url_checks.urls[0].shown == "https://hs.example/verify"


# -- allowlist ----------------------------------------------------------------------------


def write_list(path, keys):
    path.write_text(json.dumps(keys))


@pytest_twisted.inlineCallbacks
def test_allowlist_allow_deny_reload_and_broken_replacement(tmp_path, log_lines):
    path = tmp_path / "nodes.json"
    write_list(path, [nk(A)])
    adm = admission(allowlist_file=str(path), allowlist_interval=0.05)
    adm.start()
    try:
        assert (yield adm.check(A, "192.0.2.1")) == Decision(True, "allowlist", f"node key listed in allowlist {path}")
        no = yield adm.check(B, "192.0.2.1")
        assert not no.allow and no.check == "allowlist"

        write_list(path, [nk(A), nk(B)])
        yield wait_for(lambda: adm.stats.allowlist_reloads == 1)
        assert (yield adm.check(B, "192.0.2.1")).allow
        assert adm.stats.allowlist_entries == 2

        # A broken replacement: the old list stays, and the log says why, once.
        path.write_text(json.dumps([nk(A), "nodekey:zz"]))
        yield wait_for(lambda: any("not reloaded" in line for line in log_lines))
        yield sleep(0.2)
        broken = [line for line in log_lines if "not reloaded" in line]
        assert len(broken) == 1
        assert str(path) in broken[0] and 'entry 1 is "nodekey:zz"' in broken[0] and "previous 2" in broken[0]
        assert (yield adm.check(B, "192.0.2.1")).allow

        path.write_text("[" + json.dumps(nk(A)) + ",")
        yield wait_for(lambda: any("invalid JSON" in line for line in log_lines))
        path.unlink()
        yield wait_for(lambda: any("cannot read it" in line for line in log_lines))
        assert (yield adm.check(B, "192.0.2.1")).allow

        write_list(path, [nk(C)])
        yield wait_for(lambda: adm.stats.allowlist_reloads == 2)
        assert not (yield adm.check(B, "192.0.2.1")).allow
        assert (yield adm.check(C, "192.0.2.1")).allow
    finally:
        adm.stop()


@pytest_twisted.inlineCallbacks
def test_allowlist_explicit_reload(tmp_path):
    path = tmp_path / "nodes.json"
    write_list(path, [nk(A)])
    adm = admission(allowlist_file=str(path))  # not started: no polling
    write_list(path, [nk(B)])
    assert (yield adm.reload()) is True
    assert (yield adm.check(B, "192.0.2.1")).allow
    assert (yield admission().reload()) is False


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{", "invalid JSON"),
        ('{"nodes": []}', "found a JSON object"),
        ('["nodekey:abc"]', 'entry 0 is "nodekey:abc"'),
        ('["%s", 5]' % nk(A), "entry 1 is 5"),
        (None, "cannot read it"),
    ],
)
def test_allowlist_broken_at_start_raises(tmp_path, content, problem):
    path = tmp_path / "nodes.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AllowlistError) as info:
        admission(allowlist_file=str(path))
    assert str(path) in str(info.value) and problem in str(info.value)
    assert isinstance(info.value, ValueError)


# -- order of checks ----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_order_all_must_admit_and_stop_at_first_rejection(tailscaled, headscale, tmp_path):
    fake = headscale(nodes=[nk(A), nk(B)])
    path = tmp_path / "nodes.json"
    write_list(path, [nk(A)])
    tailscaled.nodes.add(nk(B))
    adm = admission(verify_clients=True, socket_path=tailscaled.path, urls=(fake.url,), allowlist_file=str(path))
    decision = yield adm.check(C, "192.0.2.1")  # not in tailscaled: the URL is never asked
    assert decision.check == "tailscaled" and not decision.allow
    assert fake.requests == []
    decision = yield adm.check(B, "192.0.2.1")  # tailscaled and URL say yes, the allowlist no
    assert not decision.allow and decision.check == "allowlist"
    decision = yield adm.check(A, "192.0.2.1")
    assert decision.allow and decision.check == "allowlist"
    assert "tailscaled" in decision.reason and fake.url in decision.reason
    stats = adm.stats
    assert stats.decisions[("tailscaled", "allow")] == 2 and stats.decisions[("tailscaled", "reject")] == 1
    assert stats.decisions[("url", "allow")] == 2
    assert (stats.decisions[("allowlist", "allow")], stats.decisions[("allowlist", "reject")]) == (1, 1)
    assert (stats.admitted, stats.rejected) == (1, 2)


# -- cache --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_cache_hits_skip_the_backend(headscale):
    fake = headscale()
    adm = admission(urls=(fake.url,), cache_ttl=60)
    first = yield adm.check(A, "192.0.2.1")
    second = yield adm.check(A, "192.0.2.1")
    assert first.allow and second.allow and second.reason.endswith("(cached)")
    assert not (yield adm.check(B, "192.0.2.1")).allow
    assert (yield adm.check(B, "192.0.2.1")).reason.endswith("(cached)")  # denials are cached too
    assert len(fake.requests) == 2
    assert (adm.stats.cache_hits, adm.stats.cache_misses) == (2, 2)


@pytest_twisted.inlineCallbacks
def test_cache_expires(headscale):
    fake = headscale()
    adm = admission(urls=(fake.url,), cache_ttl=0.2)
    yield adm.check(A, "192.0.2.1")
    yield adm.check(A, "192.0.2.1")
    yield sleep(0.3)
    yield adm.check(A, "192.0.2.1")
    assert len(fake.requests) == 2


@pytest_twisted.inlineCallbacks
def test_fail_open_and_errors_are_not_cached(headscale):
    fake = headscale(nodes=[])
    port, url = fake.port, fake.url
    yield fake.stop()
    adm = admission(urls=(url,), fail_open=True, cache_ttl=60)
    for _ in range(2):
        decision = yield adm.check(A, "192.0.2.1")
        assert decision.allow and "fail-open admits" in decision.reason and "(cached)" not in decision.reason
    fake.start(port=port)  # the verifier is back, and it says no
    assert not (yield adm.check(A, "192.0.2.1")).allow
    fake.force_status = 500
    assert "(cached)" in (yield adm.check(A, "192.0.2.1")).reason  # the denial was definitive
    assert not (yield adm.check(B, "192.0.2.1")).allow
    fake.force_status = None
    yield adm.check(B, "192.0.2.1")
    assert len(fake.requests) == 3  # B's 500 was not cached


@pytest_twisted.inlineCallbacks
def test_allowlist_reload_clears_cache(tmp_path):
    path = tmp_path / "nodes.json"
    write_list(path, [nk(A)])
    adm = admission(allowlist_file=str(path), cache_ttl=60)
    assert (yield adm.check(A, "192.0.2.1")).allow
    write_list(path, [])
    yield adm.reload()
    assert not (yield adm.check(A, "192.0.2.1")).allow


@pytest_twisted.inlineCallbacks
def test_workers_share_the_cache_through_its_directory(headscale, tmp_path):
    """Two workers' gates on one directory: a decision made by one is a hit for the other."""
    fake = headscale()
    shared = str(tmp_path / "admission-cache")
    one, two = (admission(urls=(fake.url,), cache_ttl=60, cache_dir=shared) for _ in range(2))
    assert (yield one.check(A, "192.0.2.1")).allow
    assert not (yield one.check(B, "192.0.2.1")).allow
    allowed, denied = (yield two.check(A, "192.0.2.9")), (yield two.check(B, "192.0.2.9"))
    assert allowed.allow and allowed.reason.endswith("(cached)")
    assert not denied.allow and denied.reason.endswith("(cached)")
    assert len(fake.requests) == 2
    assert (two.stats.cache_hits, two.stats.cache_misses) == (2, 0)
    assert sorted(os.listdir(shared)) == sorted([A.hex(), B.hex()])


@pytest_twisted.inlineCallbacks
def test_a_shared_entry_expires_and_a_torn_one_is_asked_again(headscale, tmp_path):
    fake = headscale()
    shared = tmp_path / "admission-cache"
    one, two = (admission(urls=(fake.url,), cache_ttl=0.3, cache_dir=str(shared)) for _ in range(2))
    yield one.check(A, "192.0.2.1")
    yield sleep(0.4)
    assert "(cached)" not in (yield two.check(A, "192.0.2.1")).reason
    (shared / B.hex()).write_text('{"expires": ')
    assert "(cached)" not in (yield two.check(B, "192.0.2.1")).reason
    assert len(fake.requests) == 3


def test_the_shared_directory_is_swept_and_bounded(tmp_path):
    from derpbox.admission.cache import DecisionCache
    from derpbox.admission.decision import Verdict

    now = time.time()
    clock = task.Clock()
    clock.advance(now - 95)  # the first sweep is due 5 s from now
    cache = DecisionCache(clock, ttl=100, max_entries=3, directory=str(tmp_path))
    allow = Verdict(True, "url", "listed", "allow")

    def key(i):
        return bytes([i]) * 32

    for i in range(9):
        cache.put(key(i), allow)
        written = now - 200 if i < 3 else now - 10 + i  # 0-2 expired, then oldest first
        os.utime(tmp_path / key(i).hex(), (written, written))
    clock.advance(100)
    cache.put(key(9), allow)  # sweeps: 0-2 expired, and of the 7 live the newest 3 stay
    assert sorted(os.listdir(tmp_path)) == sorted(key(i).hex() for i in (7, 8, 9))


@pytest_twisted.inlineCallbacks
def test_an_allowlist_change_clears_the_shared_cache(tmp_path):
    path = tmp_path / "nodes.json"
    write_list(path, [nk(A)])
    shared = str(tmp_path / "admission-cache")
    one, two = (admission(allowlist_file=str(path), cache_ttl=60, cache_dir=shared) for _ in range(2))
    assert (yield one.check(A, "192.0.2.1")).allow
    write_list(path, [])
    yield one.reload()
    assert os.listdir(shared) == []  # the other worker's gate will not find the old answer
    yield two.reload()  # each worker's gate reads the list itself (within a second, unprompted)
    assert not (yield two.check(A, "192.0.2.1")).allow


# -- robustness and logging ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_check_never_errbacks():
    adm = admission(urls=(refused_url(),), fail_open=False)
    decision = yield adm.check(b"short", "192.0.2.1")
    assert not decision.allow and "internal error" in decision.reason
    assert adm.stats.internal_errors == 1
    decision = yield adm.check(A, None)  # an unparsable source is sent as "", like Go
    assert not decision.allow and "connection refused" in decision.reason


@pytest_twisted.inlineCallbacks
def test_rejections_logged_once_per_key_per_minute(tmp_path, log_lines):
    path = tmp_path / "nodes.json"
    write_list(path, [])
    clock = task.Clock()
    adm = Admission(reactor=clock, verify_clients=False, socket_path="", urls=(), fail_open=True,
                    allowlist_file=str(path))
    for _ in range(5):
        yield adm.check(A, "192.0.2.1")
    yield adm.check(B, "192.0.2.2")
    lines = [line for line in log_lines if "rejected by" in line]
    assert len(lines) == 2
    assert lines[0] == f"client {nk(A)} from 192.0.2.1 rejected by allowlist check: node key not in allowlist {path}"
    assert adm.stats.rejection_logs_suppressed == 4
    clock.advance(59)
    yield adm.check(A, "192.0.2.1")
    assert len([line for line in log_lines if "rejected by" in line]) == 2
    clock.advance(2)
    yield adm.check(A, "192.0.2.1")
    lines = [line for line in log_lines if "rejected by" in line]
    assert len(lines) == 3 and lines[-1].endswith("(5 more for this key in the last minute not logged)")


def test_limiter_is_bounded():
    clock = task.Clock()
    limiter = PerKeyLimiter(clock, max_keys=3)
    assert [limiter.allow(k) for k in "abcd"] == [0, 0, 0, 0]
    assert limiter.allow("a") == 0  # evicted, so logged again
    assert limiter.allow("d") is None


# -- fan-out: a flood of handshakes against a backend -----------------------------------------


@pytest_twisted.inlineCallbacks
def test_concurrent_checks_are_capped_against_a_hanging_backend(blackhole):
    adm = admission(urls=(blackhole.url,), fail_open=False, url_timeout=1.0, max_concurrent=8)
    keys = [os.urandom(32) for _ in range(40)]
    pending = [adm.check(k, "192.0.2.1") for k in keys]
    yield wait_for(lambda: len(blackhole.accepted) == 8)
    yield sleep(0.3)
    assert len(blackhole.accepted) == 8  # the other 32 wait their turn, not in 32 more requests
    decisions = yield defer.gatherResults(pending)
    assert not any(d.allow for d in decisions) and len(decisions) == 40  # all answered (fail-closed)
    assert adm.stats.admitted + adm.stats.rejected == 40


@pytest_twisted.inlineCallbacks
def test_simultaneous_checks_of_one_key_share_one_request(headscale):
    fake = headscale(nodes=[nk(A)])
    adm = admission(urls=(fake.url,))
    decisions = yield defer.gatherResults([adm.check(A, "192.0.2.1") for _ in range(50)])
    assert len(fake.requests) == 1
    assert all(d.allow for d in decisions) and adm.stats.shared_checks == 49
    assert (adm.stats.admitted, adm.stats.rejected) == (50, 0)
