"""``derpbox healthcheck`` and ``derpbox check`` against real derpbox instances on loopback,
and against small fake servers for the broken cases (expired certificate, an HTTP proxy)."""

from __future__ import annotations

import datetime
import io
import json
import os
import socket
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from nacl.public import PrivateKey
from twisted.internet import protocol, reactor
from twisted.internet import ssl as tssl
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import TimeoutFactory
from twisted.protocols.portforward import ProxyFactory

from derpbox.checks.certificates import check_cert_name_rules, name_matches, validity
from derpbox.checks.command import check_main
from derpbox.checks.healthcheck import healthcheck_main
from derpbox.checks.results import FAIL, OK, WARN
from derpbox.client import DERPClient, read_response_head
from derpbox.keys import load_or_create_key
from derpbox.tls.metacert import is_meta_certificate, make_meta_certificate, meta_certificate_key

from .conftest import make_cert
from .fakes.headscale import FakeHeadscale
from .fakes.tailscaled import FakeTailscaled


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(main, argv):
    out = io.StringIO()
    code = main(argv, {}, out=out)
    return code, out.getvalue()


def line(text: str, name: str) -> str:
    """The report line of check ``name`` (healthcheck or check format)."""
    found = [ln.strip() for ln in text.splitlines() if ln.strip()[5:].startswith(name + ":")]
    assert found, f"no line for {name!r} in:\n{text}"
    return found[0]


def hc_flags(server, *extra, tls=True, stun_port=None):
    svc = server.service
    flags = ["-a", f"127.0.0.1:{server.port}", "-c", str(server.tmp / "derper.key"),
             "-stun-port", str(stun_port or svc.stun_port or free_port(socket.SOCK_DGRAM)),
             "-http-port", str(svc.http_port if svc.http_port else -1)]
    if tls:
        flags += ["-certmode", "manual", "-certdir", str(server.tmp / "certs"), "-hostname", "127.0.0.1"]
    else:
        flags += ["-tls", "off"]
    return flags + list(extra)


def leaf_sha256(crt_path) -> str:
    return x509.load_pem_x509_certificates(crt_path.read_bytes())[0].fingerprint(hashes.SHA256()).hex()


def write_map(path, **node) -> str:
    node = {"Name": "900a", "RegionID": 900, "IPv6": "none", **node}
    doc = {"Regions": {"900": {"RegionID": 900, "RegionCode": "test", "RegionName": "Test", "Nodes": [node]}}}
    path.write_text(json.dumps(doc))
    return str(path)


class HTMLProxy(protocol.Protocol):
    """Answers every request with 200 and an HTML page, as a web server or L7 proxy would."""

    def connectionMade(self):
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            body = b"<html><body>Welcome to nginx!</body></html>"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nServer: nginx\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.loseConnection()


@pytest.fixture
def html_tls_server(request):
    def start(crt, key) -> int:
        ctx = tssl.DefaultOpenSSLContextFactory(str(key), str(crt))
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(HTMLProxy), ctx, interface="127.0.0.1")
        request.addfinalizer(lambda: pytest_twisted.blockon(port.stopListening()))
        return port.getHost().port

    return start


# -- healthcheck ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_healthcheck_passes_tls_ip_mode(start_server):
    server = yield start_server()
    start = time.monotonic()
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server))
    assert time.monotonic() - start < 2
    assert code == 0, text
    assert line(text, "tls").startswith("ok   tls: TLSv1.3, certificate valid 36")
    assert line(text, "probe").startswith("ok")
    assert line(text, "relay").startswith("ok   relay: packet relayed")
    assert line(text, "stun").startswith("ok")
    assert line(text, "http").startswith("ok")


@pytest_twisted.inlineCallbacks
def test_healthcheck_passes_plain_http(start_server):
    server = yield start_server(tls=False)
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server, tls=False))
    assert code == 0, text
    assert "tls:" not in text
    assert line(text, "relay").startswith("ok")
    assert line(text, "stun").startswith("ok")


@pytest_twisted.inlineCallbacks
def test_healthcheck_fails_when_stun_is_off(start_server):
    server = yield start_server("-stun=false")
    assert server.service.stun_port is None
    dead = free_port(socket.SOCK_DGRAM)
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server, stun_port=dead))
    assert code == 1, text
    assert line(text, "stun").startswith(f"FAIL stun: 127.0.0.1:{dead}")
    assert line(text, "relay").startswith("ok")


@pytest_twisted.inlineCallbacks
def test_healthcheck_expired_certificate(start_server, html_tls_server, tmp_path):
    # derpbox refuses to start with an expired manual certificate, so a TLS server of our own
    # serves one; healthcheck's TLS line must say so (the other checks fail too, naturally).
    _, crt, key = make_cert(tmp_path / "expired", "127.0.0.1", days=-1)
    port = html_tls_server(crt, key)
    flags = ["-a", f"127.0.0.1:{port}", "-certmode", "manual", "-certdir", str(tmp_path / "expired"),
             "-hostname", "127.0.0.1", "-c", str(tmp_path / "k.key"), "-stun=false", "-http-port", "-1"]
    code, text = yield deferToThread(run, healthcheck_main, flags)
    assert code == 1
    assert line(text, "tls").startswith("FAIL tls: TLSv1.3, certificate expired at")

    _, crt, key = make_cert(tmp_path / "soon", "127.0.0.1", days=5)
    port = html_tls_server(crt, key)
    flags[1] = f"127.0.0.1:{port}"
    code, text = yield deferToThread(run, healthcheck_main, flags)
    assert line(text, "tls").startswith("WARN tls: TLSv1.3, certificate expires in 4 days")


def test_validity_window(tmp_path):
    _, crt, _ = make_cert(tmp_path, "derp.test", days=30)
    cert = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert validity(cert, now)[0] == OK
    assert validity(cert, now - datetime.timedelta(days=2))[0] == FAIL
    assert "not valid before" in validity(cert, now - datetime.timedelta(days=2))[1]
    assert validity(cert, now + datetime.timedelta(days=20))[0] == WARN


@pytest_twisted.inlineCallbacks
def test_healthcheck_admission_backend_down_but_relay_passes(start_server):
    closed = free_port()
    url = f"http://127.0.0.1:{closed}/verify"
    server = yield start_server("-verify-client-url", url)  # fail-open: the server runs
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server, "-verify-client-url", url))
    assert code == 1, text
    assert line(text, f"admission {url}").startswith(f"FAIL admission {url}: unreachable: connection refused")
    assert line(text, "relay").startswith("ok")


@pytest_twisted.inlineCallbacks
def test_healthcheck_checks_every_tailnet_socket(start_server, request, tmp_path):
    sockets = [str(tmp_path / f"t{i}.sock") for i in range(2)]
    fakes = [FakeTailscaled(path).start() for path in sockets]
    for fake in fakes:
        request.addfinalizer(lambda fake=fake: pytest_twisted.blockon(fake.stop()))
    flags_tail = ("-verify-clients", "-socket", ",".join(sockets))
    server = yield start_server(*flags_tail)
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server, *flags_tail))
    assert code == 0, text
    assert line(text, "admission tailscaled") == f"ok   admission tailscaled: {sockets[0]}, {sockets[1]} accept connections"
    yield fakes[1].stop()
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server, *flags_tail))
    assert code == 1
    assert line(text, "admission tailscaled").startswith(f"FAIL admission tailscaled: cannot connect to {sockets[1]}")


@pytest_twisted.inlineCallbacks
def test_healthcheck_relay_passes_with_verification_rejecting_strangers(start_server, request):
    hs = FakeHeadscale([]).start()
    request.addfinalizer(lambda: pytest_twisted.blockon(hs.stop()))
    server = yield start_server("-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
    stranger_admitted = yield deferToThread(_admitted, server.url)
    assert not stranger_admitted  # so the relay check below passes only thanks to the health key
    flags = hc_flags(server, "-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
    code, text = yield deferToThread(run, healthcheck_main, flags)
    assert code == 0, text
    assert line(text, "relay").startswith("ok")
    assert line(text, f"admission {hs.url}").startswith("ok")

    # Without the key file (another key), the test clients are strangers too.
    other = server.tmp / "other.key"
    flags[flags.index("-c") + 1] = str(other)
    load_or_create_key(str(other))
    code, text = yield deferToThread(run, healthcheck_main, flags)
    assert code == 1 and line(text, "relay").startswith("FAIL")


def _admitted(url):
    try:
        DERPClient.connect(url, PrivateKey.generate(), timeout=2).close()
        return True
    except (ConnectionError, OSError):
        return False


# -- check ------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_check_ip_mode_with_sha256_raw_map(start_server, tmp_path):
    server = yield start_server()
    pin = leaf_sha256(tmp_path / "certs" / "127.0.0.1.crt")
    path = write_map(tmp_path / "map.json", HostName="127.0.0.1", IPv4="127.0.0.1", CertName=f"sha256-raw:{pin}",
                     DERPPort=server.port, STUNPort=server.service.stun_port, CanPort80=True)
    code, text = yield deferToThread(run, check_main, [path, "--http-port", str(server.service.http_port)])
    assert code == 0, text
    for name in ("tcp4", "tls", "meta-cert", "upgrade", "relay", "fast-start", "latency-check", "stun4",
                 "captive-portal"):
        assert line(text, name).startswith("ok"), text
    assert line(text, "stun6").startswith("skip")
    assert "DIAGNOSIS" not in text

    code, text = yield deferToThread(run, check_main, [path, "--json", "--region", "900",
                                                       "--http-port", str(server.service.http_port)])
    doc = json.loads(text)
    assert code == 0 and doc["ok"] is True
    node = doc["nodes"][0]
    assert node["region_id"] == 900 and node["node"] == "900a"
    by = {c["name"]: c for c in node["checks"]}
    assert by["relay"]["status"] == "ok" and by["relay"]["data"]["rtt_ms"] > 0
    assert by["fast-start"]["status"] == "ok"
    key = server.relay.public_key
    assert by["relay"]["data"]["server_key"] == (key if isinstance(key, bytes) else bytes(key)).hex()
    assert by["meta-cert"]["data"]["key"] == by["relay"]["data"]["server_key"]

    # A wrong pin is diagnosed with the right one.
    write_map(tmp_path / "bad.json", HostName="127.0.0.1", IPv4="127.0.0.1", CertName="sha256-raw:" + "ab" * 32,
              DERPPort=server.port, STUNPort=server.service.stun_port)
    code, text = yield deferToThread(run, check_main, [str(tmp_path / "bad.json")])
    assert code == 1
    assert line(text, "tls").startswith("FAIL tls: TLSv1.3, certificate does not match the sha256-raw pin")
    assert f'CertName to "sha256-raw:{pin}"' in text


@pytest_twisted.inlineCallbacks
def test_check_dns_name_with_ca_file_and_wrong_name(start_server, tmp_path):
    ca, _, _ = make_cert(tmp_path / "certs", "derp.test", days=90)
    server = yield start_server("-hostname", "derp.test")
    base = dict(HostName="derp.test", IPv4="127.0.0.1", DERPPort=server.port, STUNPort=server.service.stun_port)
    path = write_map(tmp_path / "map.json", **base)
    code, text = yield deferToThread(run, check_main, [path, "--ca-file", str(ca)])
    assert code == 0, text
    assert line(text, "tls").startswith("ok   tls: TLSv1.3, certificate valid 8")
    assert "verified for derp.test" in text
    assert line(text, "relay").startswith("ok")

    # Without the private CA the chain is not trusted.
    code, text = yield deferToThread(run, check_main, [path])
    assert code == 1 and line(text, "tls").startswith("FAIL tls: TLSv1.3, certificate for derp.test not trusted")

    # CertName naming another host: the certificate is fine, but for derp.test.
    path = write_map(tmp_path / "wrong.json", CertName="derp.example.com", **base)
    code, text = yield deferToThread(run, check_main, [path, "--ca-file", str(ca)])
    assert code == 1
    assert line(text, "tls").startswith("FAIL tls: TLSv1.3, certificate is valid but not for derp.example.com")
    assert "DIAGNOSIS: wrong certificate name: the certificate is for derp.test, not derp.example.com (CertName)" in text
    assert "set HostName (or CertName) to derp.test" in text


@pytest_twisted.inlineCallbacks
def test_check_diagnoses_closed_port_80(start_server, tmp_path):
    server = yield start_server()
    pin = leaf_sha256(tmp_path / "certs" / "127.0.0.1.crt")
    path = write_map(tmp_path / "map.json", HostName="127.0.0.1", IPv4="127.0.0.1", CertName=f"sha256-raw:{pin}",
                     DERPPort=server.port, STUNPort=server.service.stun_port, CanPort80=True)
    closed = free_port()
    code, text = yield deferToThread(run, check_main, [path, "--http-port", str(closed)])
    assert code == 1
    assert line(text, "captive-portal").startswith(f"FAIL captive-portal: http://127.0.0.1:{closed}/generate_204")
    assert "but the DERP map says CanPort80" in text
    assert line(text, "relay").startswith("ok")

    # Something else (a web server) on port 80 does not echo the challenge.
    other = reactor.listenTCP(0, protocol.Factory.forProtocol(HTMLProxy), interface="127.0.0.1")
    try:
        code, text = yield deferToThread(run, check_main, [path, "--http-port", str(other.getHost().port)])
    finally:
        yield other.stopListening()
    assert code == 1
    assert line(text, "captive-portal").startswith("FAIL captive-portal: /generate_204 answered 200 without")
    assert "clients will report a captive portal" in text


@pytest_twisted.inlineCallbacks
def test_check_diagnoses_stun_unreachable(start_server, tmp_path):
    server = yield start_server("-stun=false")
    pin = leaf_sha256(tmp_path / "certs" / "127.0.0.1.crt")
    path = write_map(tmp_path / "map.json", HostName="127.0.0.1", IPv4="127.0.0.1", CertName=f"sha256-raw:{pin}",
                     DERPPort=server.port, STUNPort=free_port(socket.SOCK_DGRAM))
    code, text = yield deferToThread(run, check_main, [path, "--timeout", "1"])
    assert code == 1
    assert line(text, "stun4").startswith("FAIL")
    assert "DIAGNOSIS: STUN unreachable: allow UDP" in text


@pytest_twisted.inlineCallbacks
def test_check_diagnoses_http_proxy_in_front(html_tls_server, tmp_path):
    ca, crt, key = make_cert(tmp_path / "proxy", "127.0.0.1")
    port = html_tls_server(crt, key)
    code, text = yield deferToThread(run, check_main,
                                     [f"https://127.0.0.1:{port}", "--ca-file", str(ca), "--stun-port", "-1"])
    assert code == 1
    assert line(text, "tls").startswith("ok")
    assert line(text, "upgrade").startswith("FAIL upgrade: /derp answered HTTP 200 OK")
    assert ("DIAGNOSIS: /derp answered HTTP 200 with an HTML page instead of 101 Switching Protocols (Server: nginx): "
            "something in front of derpbox does not pass the Upgrade; use TCP/SNI passthrough") in text
    assert line(text, "relay").startswith("FAIL")
    assert line(text, "meta-cert").startswith("WARN")


def test_check_usage_errors():
    out = io.StringIO()
    assert check_main(["/nonexistent/map.json"], {}, out=out) == 2
    assert check_main(["http://example.com"], {}, out=io.StringIO()) == 2


def test_cert_name_rules_unit(tmp_path):
    _, crt, _ = make_cert(tmp_path, "derp.test")
    chain = x509.load_pem_x509_certificates(crt.read_bytes())
    # A chain (leaf + CA) cannot be pinned: "exactly one other certificate".
    pin = "sha256-raw:" + chain[0].fingerprint(hashes.SHA256()).hex()
    status, detail, _ = check_cert_name_rules(chain, "derp.test", pin, "derp.test", None)
    assert status == FAIL and "exactly one" in detail
    status, _, _ = check_cert_name_rules(chain[:1], "derp.test", pin, "derp.test", None)
    assert status == OK
    # Uppercase hex fails, as in Go.
    status, _, diag = check_cert_name_rules(chain[:1], "derp.test", pin.upper().replace("SHA256-RAW", "sha256-raw"),
                                            "derp.test", None)
    assert status == FAIL and "lowercase" in diag[0]
    assert name_matches(chain[0], "DERP.test.") and not name_matches(chain[0], "x.derp.test")


def test_meta_certificate_key_is_found_after_the_leaf(tmp_path):
    _, crt, _ = make_cert(tmp_path, "derp.test")
    leaf = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    key = os.urandom(32)
    meta = make_meta_certificate(key)
    assert is_meta_certificate(meta) and not is_meta_certificate(leaf)
    assert meta_certificate_key([leaf, meta]) == key
    assert meta_certificate_key([leaf]) is None


class ChunkStream:
    def __init__(self, *chunks: bytes):
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_response_head_and_what_follows_it():
    head, rest = read_response_head(ChunkStream(b"HTTP/1.1 101 Switching\r\nUpgrade: DERP\r", b"\n\r\n\x01\x02"))
    assert head == b"HTTP/1.1 101 Switching\r\nUpgrade: DERP\r\n\r\n" and rest == b"\x01\x02"
    with pytest.raises(ConnectionError, match="without an HTTP response"):
        read_response_head(ChunkStream())
    with pytest.raises(ConnectionError, match="during HTTP response"):
        read_response_head(ChunkStream(b"HTTP/1.1 200 OK\r\n"))


@pytest_twisted.inlineCallbacks
def test_check_diagnoses_an_idle_timeout_shorter_than_the_keepalive(start_server, tmp_path):
    """A TCP proxy that cuts connections idle for 1 s sits in front; a 3 s idle test catches it."""
    server = yield start_server()
    proxy = reactor.listenTCP(0, TimeoutFactory(ProxyFactory("127.0.0.1", server.port), timeoutPeriod=1),
                              interface="127.0.0.1")
    try:
        pin = leaf_sha256(tmp_path / "certs" / "127.0.0.1.crt")
        path = write_map(tmp_path / "map.json", HostName="127.0.0.1", IPv4="127.0.0.1", CertName=f"sha256-raw:{pin}",
                         DERPPort=proxy.getHost().port, STUNPort=-1)
        code, text = yield deferToThread(run, check_main, [path, "--idle-test", "3"])
        assert code == 1, text
        assert line(text, "idle").startswith("FAIL"), text
        assert "DIAGNOSIS" in text and "keepalive" in text.lower(), text
        # Straight to derpbox, the same idle test passes.
        path = write_map(tmp_path / "direct.json", HostName="127.0.0.1", IPv4="127.0.0.1",
                         CertName=f"sha256-raw:{pin}", DERPPort=server.port, STUNPort=-1)
        code, text = yield deferToThread(run, check_main, [path, "--idle-test", "3"])
        assert code == 0 and line(text, "idle").startswith("ok"), text
    finally:
        yield proxy.stopListening()


@pytest.mark.parametrize("mode", ["v1", "v2"])
@pytest_twisted.inlineCallbacks
def test_healthcheck_behind_proxy_protocol_sends_local_header(start_server, mode):
    """With PROXY protocol required from 127.0.0.1, the local healthcheck (also from
    127.0.0.1) must say LOCAL first, or derpbox closes its connections."""
    flags = ("-proxy-protocol", mode, "-trusted-proxies", "127.0.0.1")
    server = yield start_server(*flags)
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server) + list(flags))
    assert code == 0, text
    for name in ("tls", "probe", "relay", "http"):
        assert line(text, name).startswith("ok"), text
    # Without the header the same checks fail: the preamble is what makes them pass.
    code, text = yield deferToThread(run, healthcheck_main, hc_flags(server))
    assert code == 1 and line(text, "relay").startswith("FAIL"), text
