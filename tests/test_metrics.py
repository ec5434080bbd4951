"""Metrics exposition, the metrics listener, /debug/ pages and their access rule.

Values are read from the exposition fetched over HTTP, as a scraper sees them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread
from twisted.web.test.requesthelper import DummyRequest

from derpbox.client import DERPClient
from derpbox.metrics import Metrics
from derpbox.tls.stats import TLSStats
from derpbox.protocol import stun
from derpbox.relay.stats import DROP_REASONS, PACKET_KINDS, RelayStats
from derpbox.web.debug import DEBUG_CSP, DebugResource, ip_debug_allowed

from .support import wait_for

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# -- helpers ----------------------------------------------------------------


def nodekey(key: PrivateKey) -> str:
    return "nodekey:" + bytes(key.public_key).hex()


def http_get(port: int, target: str, *, tls: bool = False, source: str | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    kw = {"timeout": 5, "source_address": (source, 0) if source else None}
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, **kw)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, **kw)
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get(port, target, **kw):
    return deferToThread(http_get, port, target, **kw)


def parse_exposition(text: str):
    """{(name, frozenset(labels)): value} plus {name: type} and the set of HELP names."""
    samples, types, helps = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples, types, helps


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def stun_request(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(stun.build_binding_request(os.urandom(12)), ("127.0.0.1", port))
        s.recv(1500)


def promtool_check(text: bytes) -> tuple[int, str]:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    return r.returncode, (r.stdout + r.stderr).decode()


def assert_promtool_ok(text: bytes) -> None:
    """promtool 2.42 cannot turn linting off for `check metrics`; rc 3 means lint
    problems only. derper's counter names have no `_total` suffix and its gauge
    `derp_clients_total` has one, and derper's `uptime_sec` and
    `derp_average_queue_duration_ms` abbreviate their units, and its counter `derp_tcp_rtt`
    has an `le` label;
    derpbox keeps derper's names, so rc 3 is accepted exactly when every problem is
    one of those naming lints."""
    rc, out = promtool_check(text)
    if rc == 0:
        return
    assert rc == 3, (rc, out)
    problems = [line.strip() for line in out.splitlines() if line.strip()]
    assert problems
    derper_names = {
        'derp_clients_total non-counter metrics should not have "_total" suffix',
        "uptime_sec metric names should not contain abbreviated units",
        "derp_average_queue_duration_ms metric names should not contain abbreviated units",
        'derp_tcp_rtt non-histogram metrics should not have "le" label',
    }
    for line in problems:
        assert re.fullmatch(r'[a-z_:][a-z0-9_:]* counter metrics should have "_total" suffix', line) or (
            line in derper_names), line


@pytest.fixture
def allow_two(tmp_path):
    a, b = PrivateKey.generate(), PrivateKey.generate()
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps([nodekey(a), nodekey(b)]))
    return a, b, path


# -- the exposition over HTTP ------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_counters_move_with_traffic_drops_rejections_and_stun(start_server, allow_two):
    a_key, b_key, allow = allow_two
    server = yield start_server("-verify-allowlist-file", str(allow), "-metrics-addr", "127.0.0.1:0")
    mport = server.service.metrics_port

    def traffic():
        a = DERPClient.connect(server.url, a_key)
        b = DERPClient.connect(server.url, b_key)
        for i in range(5):
            a.send_packet(b.public_key, b"x" * 10)
        for _ in range(5):
            b.recv_packet()
        a.send_packet(bytes(PrivateKey.generate().public_key), b"y" * 7)  # unknown destination
        try:
            DERPClient.connect(server.url, PrivateKey.generate()).close()
            stranger_connected = True
        except (ConnectionError, OSError):
            stranger_connected = False
        stun_request(server.service.stun_port)
        return a, b, stranger_connected

    a, b, stranger_connected = yield deferToThread(traffic)
    assert not stranger_connected
    yield wait_for(lambda: server.stats.total_dropped("unknown_dest") == 1)

    status, headers, body = yield get(mport, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, types, helps = parse_exposition(body.decode())
    histograms = {name for name, kind in types.items() if kind == "histogram"}
    series = {name for name, _ in samples}
    assert set(types) == helps, "HELP and TYPE for every family"
    assert series == (set(types) - histograms) | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
    assert histograms == {"derp_mesh_update_batch_size", "derp_mesh_update_loop_count", "derp_buffered_write_frames"}
    # Every packet sent went out in some write; the frames of each write are counted once.
    assert value(samples, "derp_buffered_write_frames_sum") >= 5
    assert value(samples, "derp_buffered_write_frames_count") <= value(samples, "derp_buffered_write_frames_sum")
    assert types["derp_average_queue_duration_ms"] == "untyped"
    assert value(samples, "derp_average_queue_duration_ms") >= 0
    assert value(samples, "derp_memstats_sys0") > 1 << 20
    assert {dict(labels)["le"] for name, labels in samples if name == "derp_tcp_rtt"} == {
        "10ms", "20ms", "50ms", "100ms", "150ms", "250ms", "500ms", "inf", "non-tcp", "error"}

    assert value(samples, "derp_current_connections") == 2 and types["derp_current_connections"] == "gauge"
    assert value(samples, "derp_clients_total") == value(samples, "derp_clients_local") == 2
    assert value(samples, "derp_clients_remote") == 0
    assert value(samples, "derp_accepts") == 3 and types["derp_accepts"] == "counter"
    assert value(samples, "derp_packets_received") == 6
    assert value(samples, "derp_bytes_received") == 57
    assert value(samples, "derp_packets_sent") == 5 and value(samples, "derp_bytes_sent") == 50
    assert value(samples, "derp_packets_received_kind", kind="other") == 6
    assert value(samples, "derp_packets_received_kind", kind="disco") == 0
    for reason in DROP_REASONS:
        for kind in PACKET_KINDS:
            expected = (1, 7) if (reason, kind) == ("unknown_dest", "other") else (0, 0)
            got = (value(samples, "derp_packets_dropped", reason=reason, kind=kind),
                   value(samples, "derp_bytes_dropped", reason=reason, kind=kind))
            assert got == expected, (reason, kind)
    assert body.index(b'derp_packets_dropped{reason="unknown_dest",kind="disco"}')  # label order reason, kind
    assert value(samples, "stun_requests", disposition="success") == 1
    assert value(samples, "stun_addrfamily", family="ipv4") == 1
    assert value(samples, "derpbox_admission_decisions", check="allowlist", outcome="allow") == 2
    assert value(samples, "derpbox_admission_decisions", check="allowlist", outcome="reject") == 1
    assert value(samples, "derpbox_admission_rejections") == 1
    assert value(samples, "derpbox_admission_rejected") == 1
    assert value(samples, "derpbox_fast_start_upgrades") == 3
    assert value(samples, "tls_listener_accepted_connections") == 3
    assert value(samples, "derper_tls_request_version", version="1.3") == 3
    assert value(samples, "derper_tls_active_version", version="1.3") == 2
    assert types["derper_tls_active_version"] == "gauge"
    assert value(samples, "version", version=__import__("derpbox").__version__, binary="derpbox") == 1
    assert value(samples, "process_open_fds") > 0 and value(samples, "derp_current_file_descriptors") > 0
    assert value(samples, "process_resident_memory_bytes") > 1 << 20
    assert abs(value(samples, "process_start_unix_time") - time.time()) < 300
    assert "process_cpu_seconds_total" in types and "uptime_sec" in types

    yield deferToThread(lambda: (a.close(), b.close()))
    yield wait_for(lambda: server.stats.current_connections == 0)
    # The active-version gauge drops when the TLS connections close (the debug page
    # fetch below is itself a live TLS 1.3 connection).
    status, _, body = yield get(server.port, "/debug/varz", tls=True)
    assert status == 200
    samples, _, _ = parse_exposition(body.decode())
    assert value(samples, "derper_tls_active_version", version="1.3") == 1
    assert value(samples, "derp_current_connections") == 0


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool not installed")
@pytest_twisted.inlineCallbacks
def test_exposition_passes_promtool(start_server, allow_two):
    a_key, b_key, allow = allow_two
    server = yield start_server("-verify-allowlist-file", str(allow), "-metrics-addr", "127.0.0.1:0")
    a = yield deferToThread(DERPClient.connect, server.url, a_key)
    yield deferToThread(stun_request, server.service.stun_port)
    _, _, body = yield get(server.service.metrics_port, "/metrics")
    yield deferToThread(a.close)
    rc, out = yield deferToThread(promtool_check, body)
    assert rc in (0, 3), out
    yield deferToThread(assert_promtool_ok, body)
    # The check is not vacuous: a broken exposition is a parse error (rc 1).
    rc, _ = yield deferToThread(promtool_check, body + b'broken{label="x} 1\n')
    assert rc == 1


def test_exposition_escapes_label_values():
    stats = TLSStats()
    stats.handshake('we"ird\\ver\nsion')
    relay = SimpleNamespace(stats=RelayStats(), rate_limits=None,
                            peers=lambda: iter(()), client_counts=lambda: (0, 0))
    text = Metrics(relay, tls_stats=stats).exposition()
    assert b'derper_tls_request_version{version="we\\"ird\\\\ver\\nsion"} 1\n' in text
    if os.path.exists(PROMTOOL):
        assert_promtool_ok(text)


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="prometheus not installed")
@pytest_twisted.inlineCallbacks
def test_real_prometheus_scrapes_metrics_listener(start_server, tmp_path):
    server = yield start_server("-metrics-addr", "127.0.0.1:0")
    clients = yield deferToThread(lambda: [DERPClient.connect(server.url) for _ in range(2)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web_port = s.getsockname()[1]
    prom = tmp_path / "prom"
    (prom / "data").mkdir(parents=True)
    (prom / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: derp\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: [\"127.0.0.1:{server.service.metrics_port}\"]\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={prom / 'prometheus.yml'}", f"--storage.tsdb.path={prom / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=open(prom / "stderr.log", "wb"),
    )

    def query_until_value(deadline: float):
        url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": 'derp_current_connections{job="derp"}'})
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    last = json.load(r)
                result = last["data"]["result"]
                if result:
                    return result[0]["value"][1]
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"no scrape within the deadline; last answer {last}")

    try:
        got = yield deferToThread(query_until_value, time.monotonic() + 20)
        assert got == "2"
    finally:
        proc.terminate()
        yield deferToThread(proc.wait, 10)
        yield deferToThread(lambda: [c.close() for c in clients])


# -- the metrics listener ----------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_metrics_listener_allow_list(start_server):
    server = yield start_server("-metrics-addr", "127.0.0.1:0", "-metrics-allow", "127.0.0.2")
    port = server.service.metrics_port
    status, _, body = yield get(port, "/metrics", source="127.0.0.1")
    assert (status, body) == (403, b"metrics access denied\n")
    status, _, body = yield get(port, "/healthz", source="127.0.0.1")
    assert status == 403
    status, _, body = yield get(port, "/metrics", source="127.0.0.2")
    assert status == 200 and b"# TYPE derp_current_connections gauge\n" in body
    status, _, body = yield get(port, "/healthz", source="127.0.0.2")
    assert (status, body) == (200, b"ok\n")
    # Never the DERP or debug endpoints.
    for target in ("/derp", "/debug/", "/generate_204", "/"):
        status, _, _ = yield get(port, target, source="127.0.0.2")
        assert status == 404, target


@pytest_twisted.inlineCallbacks
def test_no_metrics_listener_by_default(start_server):
    server = yield start_server()
    assert server.service.metrics_listener is None and server.service.metrics_port is None


# -- /debug/ access ------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "environ", "allowed"),
    [
        ("127.0.0.1", {}, True),
        ("127.0.0.2", {}, True),
        ("::1", {}, True),
        ("::ffff:127.0.0.1", {}, True),
        ("100.64.0.1", {}, True),
        ("100.127.255.254", {}, True),
        ("100.115.92.5", {}, False),  # ChromeOS range carved out of CGNAT
        ("100.115.93.255", {}, False),
        ("100.115.94.0", {}, True),
        ("fd7a:115c:a1e0::1", {}, True),
        ("fd7a:115c:a1e1::1", {}, False),
        ("203.0.113.5", {}, False),
        ("10.0.0.1", {}, False),
        ("203.0.113.5", {"TS_ALLOW_DEBUG_IP": "203.0.113.5"}, True),
        ("203.0.113.6", {"TS_ALLOW_DEBUG_IP": "203.0.113.5"}, False),
        ("203.0.113.6", {"TS_DEBUG_TRUSTED_CIDRS": "198.51.100.0/24, 203.0.113.0/28"}, True),
        ("203.0.113.16", {"TS_DEBUG_TRUSTED_CIDRS": "198.51.100.0/24, 203.0.113.0/28"}, False),
        ("2001:db8::7", {"TS_DEBUG_TRUSTED_CIDRS": "bogus,2001:db8::/64"}, True),
        ("not-an-ip", {}, False),
    ],
)
def test_ip_debug_allowed(ip, environ, allowed):
    assert ip_debug_allowed(ip, environ) is allowed


def _dummy_debug_request(path: bytes, peer: str, args=None, headers=None):
    req = DummyRequest(path.lstrip(b"/").split(b"/"))
    req.path = path
    req.uri = path
    req.args = args or {}
    for k, v in (headers or {}).items():
        req.requestHeaders.setRawHeaders(k, [v])
    req.channel = SimpleNamespace(transport=SimpleNamespace(getPeer=lambda: IPv4Address("TCP", peer, 4242)))
    return req


def _debug_resource(environ, problems=()):
    relay = SimpleNamespace(stats=RelayStats(), rate_limits=None,
                            peers=lambda: iter(()), client_counts=lambda: (0, 0), check_consistency=lambda: list(problems))
    return DebugResource(Metrics(relay), hostname="derp.example.com", clock=Clock(), environ=environ)


def test_debug_denied_for_public_source_and_allowed_by_env():
    req = _dummy_debug_request(b"/debug/varz", "203.0.113.5")
    body = _debug_resource({}).render(req)
    assert (req.responseCode, body) == (403, b"debug access denied\n")
    req = _dummy_debug_request(b"/debug/varz", "203.0.113.5")
    body = _debug_resource({"TS_ALLOW_DEBUG_IP": "203.0.113.5"}).render(req)
    assert req.responseCode in (None, 200) and b"# TYPE derp_accepts counter" in body
    req = _dummy_debug_request(b"/debug/varz", "203.0.113.5", headers={b"X-Forwarded-For": b"1.2.3.4"})
    _debug_resource({"TS_ALLOW_DEBUG_IP": "203.0.113.5"}).render(req)
    assert req.responseCode == 403


def test_debug_check_reports_problems():
    req = _dummy_debug_request(b"/debug/check", "127.0.0.1")
    body = _debug_resource({}, problems=["current_connections=3 but 2 registered"]).render(req)
    assert (req.responseCode, body) == (500, b"current_connections=3 but 2 registered\n")


@pytest_twisted.inlineCallbacks
def test_debug_pages_from_loopback(start_server):
    server = yield start_server()
    port = server.port
    status, headers, body = yield get(port, "/debug/", tls=True)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == DEBUG_CSP.decode()
    assert "style-src 'self' 'unsafe-inline'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    for text in (b"Uptime", b"Version", b"Machine", b"TLS hostname", b"Mesh key", b"/debug/varz", b"/debug/vars"):
        assert text in body
    status, headers, body = yield get(port, "/debug/varz", tls=True)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE derp_current_connections gauge" in body
    status, headers, body = yield get(port, "/debug/vars", tls=True)
    data = json.loads(body)
    assert status == 200 and data["derp_current_connections"] == 0
    assert data["derp_packets_dropped"]["reason=unknown_dest,kind=other"] == 0
    status, _, body = yield get(port, "/debug/check", tls=True)
    assert (status, body) == (200, b"derp.Server ConsistencyCheck okay")
    status, _, body = yield get(port, "/debug/nope", tls=True)
    assert (status, body) == (404, b"404 page not found\n")
    status, headers, _ = yield get(port, "/debug", tls=True)
    assert status == 301 and headers["location"] == "/debug/"
    # Another loopback address is still loopback.
    status, _, _ = yield get(port, "/debug/", tls=True, source="127.0.0.2")
    assert status == 200


@pytest_twisted.inlineCallbacks
def test_debug_forwarded_request_denied_unless_debugkey(start_server, tmp_path):
    keyfile = tmp_path / "debugkey"
    keyfile.write_text("  s3cret-key \n")
    server = yield start_server(environ={"TS_DEBUG_KEY_PATH": str(keyfile)})
    xff = {"X-Forwarded-For": "198.51.100.9"}
    status, _, body = yield get(server.port, "/debug/", tls=True, headers=xff)
    assert (status, body) == (403, b"debug access denied\n")
    status, _, _ = yield get(server.port, "/debug/varz?debugkey=wrong", tls=True, headers=xff)
    assert status == 403
    status, _, body = yield get(server.port, "/debug/varz?debugkey=s3cret-key", tls=True, headers=xff)
    assert status == 200 and b"derp_accepts" in body


@pytest_twisted.inlineCallbacks
def test_port80_debug_uses_main_site_and_acl(start_server):
    server = yield start_server()
    p80 = server.service.http_port
    status, _, body = yield get(p80, "/debug/varz")
    assert status == 200 and b"# TYPE derp_accepts counter" in body
    status, _, body = yield get(p80, "/debug/varz", headers={"X-Forwarded-For": "198.51.100.9"})
    assert (status, body) == (403, b"debug access denied\n")
    # The redirects point at the DERP port (ephemeral here), not port 80's.
    origin = f"https://derp.example.com:{server.service.derp_port}"
    status, headers, _ = yield get(p80, "/", headers={"Host": "derp.example.com"})
    assert status == 302 and headers["location"] == f"{origin}/debug/"
    status, headers, _ = yield get(p80, "/", headers={"Host": "derp.example.com", "X-Forwarded-For": "1.2.3.4"})
    assert status == 302 and headers["location"] == f"{origin}/"


# -- failures at the front door are counted by reason ----------------------------------------


def _raw_exchange(port: int, data: bytes, close_at_once: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if close_at_once:
            return
        s.sendall(data)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass


def _tls_exchange(port: int, data: bytes) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


@pytest_twisted.inlineCallbacks
def test_tls_handshake_failures_and_bad_requests_are_counted(start_server):
    server = yield start_server()
    port = server.port
    # Not TLS at all, on the TLS port; then a client that leaves before its ClientHello.
    yield deferToThread(_raw_exchange, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    yield deferToThread(_raw_exchange, port, b"", True)
    # A bad first request, inside TLS: answered 400 and counted.
    reply = yield deferToThread(_tls_exchange, port, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    failures = server.service.tls_stats.handshake_failures
    deadline = time.monotonic() + 5
    while failures.get("closed", 0) < 1 or failures.get("tls_error", 0) < 1:
        assert time.monotonic() < deadline, failures
        yield deferToThread(time.sleep, 0.02)
    status, _, body = yield get(port, "/debug/varz", tls=True)
    samples, types, _ = parse_exposition(body.decode())
    assert value(samples, "derpbox_tls_handshake_failures", reason="tls_error") == 1
    assert value(samples, "derpbox_tls_handshake_failures", reason="closed") == 1
    assert types["derpbox_tls_handshake_failures"] == "counter"
    assert value(samples, "derpbox_http_refusals", status="400") == 1
    assert value(samples, "derpbox_http_head_timeouts") == 0
