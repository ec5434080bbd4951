"""``derpbox healthcheck`` (the local instance, for Docker HEALTHCHECK) and
``derpbox check`` (any DERP node or DERP map, as a Tailscale client sees it).

Both print one line per check (``ok``/``WARN``/``FAIL``/``skip``) and exit 0 only
when nothing failed. ``check`` adds ``DIAGNOSIS:`` lines for the usual deployment
mistakes and can print JSON. Every network step has a short timeout; checks of a
node run concurrently in daemon threads so a silent peer cannot stall the run.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import select
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from nacl.public import PrivateKey
from OpenSSL import SSL, crypto

from .protocol import stun

META_CERT_PREFIX = "derpkey"
EXPIRY_WARN_DAYS = 14
KEEPALIVE_SECONDS = 60
DEFAULT_STUN_PORT = 3478
PROBE_NODE_KEY = "nodekey:" + "00" * 32

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_LABEL = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}


@dataclass
class Result:
    name: str
    status: str
    detail: str
    diagnosis: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{_LABEL[self.status]} {self.name}: {self.detail}"

    def as_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "diagnosis": list(self.diagnosis), "data": self.data}


class CheckFailed(Exception):
    """A check's failure: message, and optional diagnosis lines."""

    def __init__(self, message: str, *diagnosis: str, status: str = FAIL, data: dict | None = None):
        super().__init__(message)
        self.diagnosis = [d for d in diagnosis if d]
        self.status = status
        self.data = data or {}


# -- running checks concurrently with a deadline ---------------------------------------------


def run_checks(checks: list[tuple[str, Callable[[], Result]]], deadline: float) -> list[Result]:
    """Run each ``(name, fn)`` in a daemon thread; collect in order; unfinished ones FAIL."""
    results: dict[int, Result] = {}

    def runner(i: int, name: str, fn):
        try:
            results[i] = fn()
        except CheckFailed as e:
            results[i] = Result(name, e.status, str(e), e.diagnosis, e.data)
        except Exception as e:  # noqa: BLE001 - any error is a failed check, reported
            results[i] = Result(name, FAIL, _describe_error(e))

    threads = []
    for i, (name, fn) in enumerate(checks):
        t = threading.Thread(target=runner, args=(i, name, fn), daemon=True, name=f"check-{name}")
        t.start()
        threads.append(t)
    end = time.monotonic() + deadline
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    out = []
    for i, (name, _) in enumerate(checks):
        out.append(results.get(i) or Result(name, FAIL, f"no result within {deadline:g} s"))
    return out


def _describe_error(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return f"timed out ({e})" if str(e) else "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, SSL.Error):
        return f"TLS error: {_ssl_error_text(e)}"
    text = str(e) or type(e).__name__
    return text


def _ssl_error_text(e: SSL.Error) -> str:
    try:
        parts = [p[2] for p in e.args[0] if len(p) >= 3]
        if parts:
            return "; ".join(parts)
    except (IndexError, TypeError):
        pass
    return str(e) or type(e).__name__


# -- certificates ------------------------------------------------------------------------------


def _cn(cert: x509.Certificate) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def is_meta_cert(cert: x509.Certificate) -> bool:
    return _cn(cert).startswith(META_CERT_PREFIX)


def meta_key(chain: list[x509.Certificate]) -> bytes | None:
    """The DERP key of the meta-certificate, as the Go client reads it (serial < 256)."""
    for cert in chain:
        cn = _cn(cert)
        if cn.startswith(META_CERT_PREFIX) and cert.serial_number < 256:
            try:
                key = bytes.fromhex(cn[len(META_CERT_PREFIX):])
            except ValueError:
                continue
            if len(key) == 32:
                return key
    return None


def cert_names(cert: x509.Certificate) -> list[str]:
    """DNS and IP SANs (the names Go verifies against; the CN is not used)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def name_matches(cert: x509.Certificate, name: str) -> bool:
    name = name.rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    for pattern in cert_names(cert):
        if ip is not None:
            try:
                if ipaddress.ip_address(pattern) == ip:
                    return True
            except ValueError:
                pass
            continue
        pattern = pattern.rstrip(".").lower()
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def validity(cert: x509.Certificate, now: datetime.datetime | None = None) -> tuple[str, str]:
    """(status, text) for a certificate's validity window: expired/not yet valid FAIL, < 14 days WARN."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        return FAIL, f"certificate not valid before {before:%Y-%m-%d %H:%M:%S} UTC"
    if now > after:
        return FAIL, f"certificate expired at {after:%Y-%m-%d %H:%M:%S} UTC"
    left = after - now
    days = left.days
    if left < datetime.timedelta(days=EXPIRY_WARN_DAYS):
        return WARN, f"certificate expires in {days} days ({after:%Y-%m-%d %H:%M} UTC)"
    return OK, f"certificate valid {days} days"


def verify_chain(chain: list[x509.Certificate], cafile: str | None) -> str | None:
    """None if the chain (meta-cert excluded) leads to a trusted root, else OpenSSL's reason."""
    certs = [c for c in chain if not is_meta_cert(c)]
    if not certs:
        return "no certificate presented"
    store = crypto.X509Store()
    paths = ssl.get_default_verify_paths()
    for f, d in ((paths.cafile, paths.capath), (paths.openssl_cafile, paths.openssl_capath)):
        try:
            store.load_locations(f if f and os.path.exists(f) else None, d if d and os.path.isdir(d) else None)
        except (crypto.Error, TypeError):
            pass
    if cafile:
        store.load_locations(cafile)
    leaf = crypto.X509.from_cryptography(certs[0])
    rest = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    try:
        crypto.X509StoreContext(store, leaf, chain=rest).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e.args[0] if e.args else e)
    return None


def check_cert_name_rules(chain: list[x509.Certificate], host_name: str, cert_name: str,
                          sni: str | None, cafile: str | None) -> tuple[str, str, list[str]]:
    """Apply Tailscale's CertName rules (spec 8.2): (status, detail, diagnosis)."""
    if cert_name.startswith("sha256-raw:"):
        want = cert_name[len("sha256-raw:"):]
        others = [c for c in chain if not is_meta_cert(c)]
        if len(others) != 1:
            return FAIL, f"sha256-raw pin needs exactly one certificate besides the meta-certificate, got {len(others)}", [
                "a pinned (sha256-raw:) node must serve only its self-signed leaf, no CA chain"]
        leaf = others[0]
        got = leaf.fingerprint(hashes.SHA256()).hex()
        if got != want:
            diag = [f"the server's certificate has SHA-256 {got}; set CertName to \"sha256-raw:{got}\""]
            if want.lower() == got:
                diag = ["the pin must be lowercase hex; Tailscale compares it string for string"]
            return FAIL, "certificate does not match the sha256-raw pin", diag
        status, text = validity(leaf)
        if status == FAIL:
            return FAIL, text, []
        if sni and not name_matches(leaf, sni):
            return FAIL, f"pinned certificate is not valid for the TLS name {sni}", [
                f"certificate names: {', '.join(cert_names(leaf)) or '(none)'}"]
        return status, f"pinned sha256-raw matches, {text}", []
    name = cert_name or host_name
    others = [c for c in chain if not is_meta_cert(c)]
    if not others:
        return FAIL, "no certificate presented", []
    leaf = others[0]
    names = cert_names(leaf)
    problem = verify_chain(chain, cafile)
    if not name_matches(leaf, name):
        field_name = "CertName" if cert_name else "HostName"
        diag = [
            f"wrong certificate name: the certificate is for {', '.join(names) or '(no SAN names)'}, "
            f"not {name} ({field_name})",
        ]
        if names:
            good = names[0]
            try:
                ipaddress.ip_address(good)
                diag.append(f"for an IP-only node pin the certificate: CertName \"sha256-raw:"
                            f"{leaf.fingerprint(hashes.SHA256()).hex()}\"")
            except ValueError:
                diag.append(f"set HostName (or CertName) to {good} in the DERP map, or install a certificate for {name}")
        if problem is None:
            return FAIL, f"certificate is valid but not for {name}", diag
        return FAIL, f"certificate not trusted ({problem}) and not for {name}", diag
    if problem is not None:
        diag = []
        if "self-signed" in problem or "self signed" in problem or "local issuer" in problem:
            diag.append("a self-signed or private-CA certificate needs CertName \"sha256-raw:"
                        f"{leaf.fingerprint(hashes.SHA256()).hex()}\" in the DERP map (or --ca-file for this check)")
        return FAIL, f"certificate for {name} not trusted: {problem}", diag
    status, text = validity(leaf)
    return status, f"{text}, verified for {name}", []


# -- network primitives -----------------------------------------------------------------------


@dataclass
class TLSInfo:
    version: str
    chain: list  # cryptography certificates, as presented
    seconds: float


def tls_handshake(host: str, port: int, sni: str | None, timeout: float, preamble: bytes = b"") -> TLSInfo:
    """A TLS handshake that accepts any certificate (verification is done afterwards)."""
    start = time.monotonic()
    sock = _connect(host, port, timeout, preamble)
    try:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        conn = SSL.Connection(ctx, sock)
        if sni:
            conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        deadline = start + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                want = ([sock], [])
            except SSL.WantWriteError:
                want = ([], [sock])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*want, [], left)[:2]):
                raise TimeoutError(f"TLS handshake not finished within {timeout:g} s")
        chain = [c.to_cryptography() for c in (conn.get_peer_cert_chain() or [])]
        return TLSInfo(conn.get_protocol_version_name(), chain, time.monotonic() - start)
    finally:
        sock.close()


@dataclass
class HTTPResponse:
    status: int
    reason: str
    headers: dict
    body: bytes


def _connect(host: str, port: int, timeout: float, preamble: bytes = b"") -> socket.socket:
    """A TCP connection; ``preamble`` (a PROXY LOCAL header) goes first when the
    local checker's address is one of derpbox's trusted proxies."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if preamble:
        sock.sendall(preamble)
    return sock


def _open(host: str, port: int, tls: bool, sni: str | None, timeout: float, preamble: bytes = b""):
    sock = _connect(host, port, timeout, preamble)
    if not tls:
        return sock
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        return ctx.wrap_socket(sock, server_hostname=sni)
    except BaseException:
        sock.close()
        raise


def _read_head(sock, limit: int = 65536) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            if not buf:
                raise ConnectionError("connection closed without an HTTP response")
            break
        buf += chunk
        if len(buf) > limit:
            break
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[int, str, dict]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def http_request(host: str, port: int, path: str, *, tls: bool, sni: str | None, host_header: str,
                 timeout: float, method: str = "GET", headers: dict | None = None,
                 body: bytes = b"", read_body: bool = True, preamble: bytes = b"") -> HTTPResponse:
    sock = _open(host, port, tls, sni, timeout, preamble)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}", "User-Agent: derpbox-check",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head, rest = _read_head(sock)
        status, reason, hdrs = _parse_head(head)
        if read_body and method != "HEAD":
            want = int(hdrs.get("content-length", "8192") or 0)
            while len(rest) < min(want, 8192):
                try:
                    chunk = sock.recv(8192)
                except (socket.timeout, ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                rest += chunk
        return HTTPResponse(status, reason, hdrs, rest[:8192])
    finally:
        sock.close()


def _host_header(host: str, port: int, default: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == default else f"{h}:{port}"


def stun_roundtrip(host: str, port: int, timeout: float) -> tuple[str, int, float]:
    """Send Tailscale's Binding Request (retransmitting every 100 ms); (mapped ip, port, rtt)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    txid = os.urandom(12)
    req = stun.build_binding_request(txid)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        start = time.monotonic()
        deadline = start + timeout
        sent = start
        s.send(req)
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no answer from {_host_header(host, port, -1)} within {timeout:g} s")
            if now - sent >= 0.1:
                s.send(req)
                sent = now
            s.settimeout(min(deadline, sent + 0.1) - now)
            try:
                data = s.recv(2048)
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                raise CheckFailed(f"{_host_header(host, port, -1)} answered ICMP port unreachable (nothing listens on UDP {port})") from None
            try:
                got_txid, ip, mport = stun.parse_binding_response(data)
            except stun.STUNError:
                continue
            if got_txid == txid:
                return ip, mport, time.monotonic() - start


def upgrade_probe(host: str, port: int, *, tls: bool, sni: str | None, host_header: str,
                  timeout: float) -> HTTPResponse:
    """Send the Go client's /derp upgrade request (no fast start) and read the answer head."""
    sock = _open(host, port, tls, sni, timeout)
    try:
        req = (f"GET /derp HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: Go-http-client/1.1\r\n"
               "Connection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
        sock.sendall(req.encode())
        head, rest = _read_head(sock)
        status, reason, hdrs = _parse_head(head)
        if status != 101:
            sock.settimeout(min(timeout, 0.3))
            try:
                while len(rest) < 512:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    rest += chunk
            except (socket.timeout, ssl.SSLError, OSError):
                pass
        return HTTPResponse(status, reason, hdrs, rest[:512])
    finally:
        sock.close()


def proxy_diagnosis(resp: HTTPResponse) -> list[str]:
    html = "html" in resp.headers.get("content-type", "") or b"<html" in resp.body.lower()
    what = f"HTTP {resp.status}" + (" with an HTML page" if html else "")
    server = resp.headers.get("server")
    diag = [f"/derp answered {what} instead of 101 Switching Protocols"
            + (f" (Server: {server})" if server else "")
            + ": something in front of derpbox does not pass the Upgrade; use TCP/SNI passthrough"]
    if resp.status == 426:
        diag.append("426 is derpbox/derper's answer to a request whose Upgrade header was removed on the way")
    return diag


def relay_test(url: str, *, sni: str | None, timeout: float, mesh_key: bytes | None = None,
               preamble: bytes = b"") -> dict:
    """Two fresh keys; A sends B one packet; returns facts about the connection and the RTT."""
    from .client import DERPClient

    kw = dict(timeout=timeout, server_name=sni, mesh_key=mesh_key, is_prober=True, preamble=preamble)
    a = DERPClient.connect(url, PrivateKey.generate(), **kw)
    try:
        b = DERPClient.connect(url, PrivateKey.generate(), **kw)
        try:
            payload = os.urandom(16)
            deadline = time.monotonic() + timeout
            start = time.monotonic()
            while True:
                a.send_packet(b.public_key, payload)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"packet not relayed within {timeout:g} s")
                try:
                    src, data = b.recv_packet(min(left, 0.25))
                except TimeoutError:
                    continue
                if src == a.public_key and data == payload:
                    rtt = time.monotonic() - start
                    break
            c = a.connected
            return {"rtt": rtt, "server_key": c.server_key, "fast_start": c.fast_start,
                    "tls_version": c.tls_version, "http_status": c.http_status}
        finally:
            b.close()
    finally:
        a.close()


# -- healthcheck ------------------------------------------------------------------------------


def _local_host(listen_host: str) -> str:
    if listen_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen_host == "::":
        return "::1"
    return listen_host


def _proxy_preamble(settings, host: str) -> bytes:
    """With -proxy-protocol v1/v2 a trusted proxy must send a header: when this checker
    connects from a trusted address, it says LOCAL (keep my own address)."""
    if settings.proxy_protocol not in ("v1", "v2"):
        return b""
    from .protocol.proxy import local_preamble

    addr = ipaddress.ip_address(host)
    if any(addr in ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies):
        return local_preamble(settings.proxy_protocol)
    return b""


def healthcheck(settings, timeout: float = 1.0) -> list[Result]:
    from .keys import health_key, load_or_create_key

    host = _local_host(settings.listen_host)
    port = settings.listen_port
    tls = settings.use_tls
    sni = None if settings.hostname_is_ip or not settings.hostname else settings.hostname
    hh = _host_header(settings.hostname if sni else host, port, 443 if tls else 80)
    checks: list[tuple[str, Callable[[], Result]]] = []

    mesh_key = None
    key_problem = None
    if settings.key_path:
        if os.path.exists(settings.key_path):
            try:
                mesh_key = health_key(load_or_create_key(settings.key_path))
            except (OSError, ValueError) as e:
                key_problem = f"cannot read the server key {settings.key_path}: {e}"
        else:
            key_problem = f"server key {settings.key_path} does not exist"
    verifying = bool(settings.verify_clients or settings.verify_client_urls
                     or getattr(settings, "verify_allowlist_file", ""))
    preamble = _proxy_preamble(settings, host)

    if tls:
        def tls_check():
            info = tls_handshake(host, port, sni, timeout, preamble)
            leaf = next((c for c in info.chain if not is_meta_cert(c)), None)
            if leaf is None:
                raise CheckFailed(f"{info.version}, but no certificate presented")
            status, text = validity(leaf)
            return Result("tls", status, f"{info.version}, {text}", data={"version": info.version})
        checks.append(("tls", tls_check))

    def probe_check():
        r = http_request(host, port, "/derp/probe", tls=tls, sni=sni, host_header=hh, timeout=timeout,
                         preamble=preamble)
        if r.status != 200:
            raise CheckFailed(f"GET /derp/probe answered {r.status}")
        return Result("probe", OK, "GET /derp/probe 200")
    checks.append(("probe", probe_check))

    if settings.derp:
        def relay_check():
            if verifying and mesh_key is None:
                raise CheckFailed(f"{key_problem}; client verification is on, so the test clients cannot be admitted")
            url = f"{'https' if tls else 'http'}://{_host_header(host, port, -1)}/derp"
            facts = relay_test(url, sni=sni, timeout=timeout, mesh_key=mesh_key, preamble=preamble)
            return Result("relay", OK, f"packet relayed between two fresh keys in {facts['rtt'] * 1000:.1f} ms"
                          + (" (fast start)" if facts["fast_start"] else ""))
        checks.append(("relay", relay_check))
    else:
        checks.append(("relay", lambda: Result("relay", SKIP, "DERP disabled (-derp=false)")))

    if settings.stun:
        def stun_check():
            stun_host = host if settings.listen_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            ip, p, rtt = stun_roundtrip(stun_host, settings.stun_port, min(timeout, 0.5))
            return Result("stun", OK, f"{_host_header(stun_host, settings.stun_port, -1)} answered in "
                          f"{rtt * 1000:.1f} ms (mapped {ip}:{p})")
        checks.append(("stun", stun_check))
    else:
        checks.append(("stun", lambda: Result("stun", SKIP, "STUN disabled (-stun=false)")))

    if tls and settings.http_port >= 0:
        def port80_check():
            r = http_request(host, settings.http_port, "/generate_204", tls=False, sni=None,
                             host_header=_host_header(host, settings.http_port, 80), timeout=timeout,
                             headers={"X-Tailscale-Challenge": "ts_healthcheck"}, preamble=preamble)
            if r.status != 204 or r.headers.get("x-tailscale-response") != "response ts_healthcheck":
                raise CheckFailed(f"GET /generate_204 on port {settings.http_port} answered {r.status} without the challenge response")
            return Result("http", OK, f"port {settings.http_port} /generate_204 answered 204 with the challenge")
        checks.append(("http", port80_check))

    if settings.verify_clients:
        def socket_check():
            from .admission.tailscaled import DEFAULT_SOCKETS

            paths = [settings.socket] if settings.socket else [p for p in DEFAULT_SOCKETS if os.path.exists(p)]
            if not paths:
                raise CheckFailed(f"no tailscaled socket at any of {', '.join(DEFAULT_SOCKETS)}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                try:
                    s.connect(paths[0])
                except OSError as e:
                    raise CheckFailed(f"cannot connect to {paths[0]}: {e.strerror or e}") from None
            return Result("admission tailscaled", OK, f"{paths[0]} accepts connections")
        checks.append(("admission tailscaled", socket_check))

    for url in settings.verify_client_urls:
        def url_check(url=url):
            shown = _redact(url)
            body = json.dumps({"NodePublic": PROBE_NODE_KEY, "Source": "127.0.0.1"}).encode()
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    status = resp.status
            except urllib.error.HTTPError as e:
                status = e.code
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise CheckFailed(f"unreachable: {_describe_error(reason) if isinstance(reason, BaseException) else reason}") from None
            return Result(f"admission {shown}", OK, f"reachable (HTTP {status})")
        checks.append((f"admission {_redact(url)}", url_check))

    results = run_checks(checks, deadline=max(1.5, timeout + 0.5))
    if key_problem and not verifying and settings.key_path:
        results.append(Result("key", WARN, key_problem))
    return results


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password or parts.query:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")
    return url


def healthcheck_main(argv: list[str], environ=os.environ, out=None) -> int:
    """``derpbox healthcheck [derper flags]``: the same settings as the server, checked locally."""
    from .config import ConfigError, UsageRequested, load_settings

    out = out or sys.stdout
    try:
        settings = load_settings(argv, environ)
    except UsageRequested as u:
        out.write("usage: derpbox healthcheck [the server's flags]\n"
                  "Checks the local derpbox started with these flags/DERP_* variables.\n\n" + u.usage)
        return 0
    except ConfigError as e:
        out.write(f"FAIL config: {e}\n")
        return 2
    results = healthcheck(settings)
    for r in results:
        out.write(r.line() + "\n")
    out.flush()
    return 1 if any(r.status == FAIL for r in results) else 0


# -- check: any node, as a Tailscale client -----------------------------------------------------


def _field(d: dict, name: str, default=None):
    if name in d:
        return d[name]
    low = name.lower()
    for k, v in d.items():
        if k.lower() == low:
            return v
    return default


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _resolve(host: str, family) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except OSError:
        return None
    return infos[0][4][0] if infos else None


def _addr(node: dict, fam: int) -> tuple[str | None, str]:
    """(address to use, why not) for IPv4 (4) or IPv6 (6), as the Go client picks it."""
    key = "IPv4" if fam == 4 else "IPv6"
    value = str(_field(node, key, "") or "")
    host = str(_field(node, "HostName", ""))
    if value:
        ok = _is_ipv4(value) if fam == 4 else _is_ipv6(value)
        return (value, "") if ok else (None, f"{key} is {value!r} (disabled)")
    if (fam == 4 and _is_ipv4(host)) or (fam == 6 and _is_ipv6(host)):
        return host, ""
    if _is_ipv4(host) or _is_ipv6(host):
        return None, f"HostName is an IPv{6 if fam == 4 else 4} address"
    found = _resolve(host, socket.AF_INET if fam == 4 else socket.AF_INET6)
    return (found, "") if found else (None, f"no {'A' if fam == 4 else 'AAAA'} record for {host}")


@dataclass
class CheckOptions:
    timeout: float = 3.0
    cafile: str | None = None
    idle_test: float = 0.0
    http_port: int = 80


def check_node(node: dict, opts: CheckOptions) -> list[Result]:
    host_name = str(_field(node, "HostName", ""))
    cert_name = str(_field(node, "CertName", "") or "")
    port = int(_field(node, "DERPPort", 0) or 443)
    stun_port = int(_field(node, "STUNPort", 0) or 0)
    stun_port = DEFAULT_STUN_PORT if stun_port == 0 else stun_port
    stun_only = bool(_field(node, "STUNOnly", False))
    can80 = bool(_field(node, "CanPort80", False))
    t = opts.timeout
    v4, why4 = _addr(node, 4)
    v6, why6 = _addr(node, 6)
    sni = None if (_is_ipv4(host_name) or _is_ipv6(host_name)) else host_name
    hh = _host_header(host_name, port, 443)
    results: list[Result] = []

    def stun_checks() -> list[tuple[str, Callable[[], Result]]]:
        out = []
        for fam, addr, why in ((4, v4, why4), (6, v6, why6)):
            name = f"stun{fam}"
            if stun_port < 0:
                out.append((name, lambda name=name: Result(name, SKIP, "STUNPort is -1 (disabled)")))
                continue
            if addr is None:
                out.append((name, lambda name=name, why=why: Result(name, SKIP, why)))
                continue

            def fn(name=name, addr=addr, fam=fam):
                try:
                    ip, p, rtt = stun_roundtrip(addr, stun_port, min(t, 3.0))
                except (CheckFailed, TimeoutError, OSError) as e:
                    msg = str(e) if isinstance(e, CheckFailed | TimeoutError) else _describe_error(e)
                    if fam == 6 and isinstance(e, OSError) and e.errno in (101, 113, 99):
                        raise CheckFailed(f"{msg} (this machine has no IPv6 route)", status=WARN) from None
                    raise CheckFailed(msg, f"STUN unreachable: allow UDP {stun_port} in the firewall/security "
                                      f"group and map it to derpbox (-stun-port); check that -stun is on") from None
                return Result(name, OK, f"{_host_header(addr, stun_port, -1)} answered in {rtt * 1000:.1f} ms "
                              f"(your address {ip}:{p})", data={"rtt_ms": round(rtt * 1000, 2)})
            out.append((name, fn))
        return out

    if stun_only:
        return run_checks(stun_checks(), deadline=t + 1)

    # TCP: every address family the node has, then the rest over the first that works.
    tcp_checks = []
    for fam, addr, why in ((4, v4, why4), (6, v6, why6)):
        name = f"tcp{fam}"
        if addr is None:
            tcp_checks.append((name, lambda name=name, why=why: Result(name, SKIP, why)))
            continue

        def tcp(name=name, addr=addr, fam=fam):
            start = time.monotonic()
            try:
                socket.create_connection((addr, port), timeout=min(t, 1.5)).close()
            except OSError as e:
                status = WARN if fam == 6 and e.errno in (101, 113, 99) else FAIL
                raise CheckFailed(f"{_host_header(addr, port, -1)}: {_describe_error(e)}", status=status) from None
            ms = (time.monotonic() - start) * 1000
            return Result(name, OK, f"connected to {_host_header(addr, port, -1)} in {ms:.1f} ms",
                          data={"address": addr, "rtt_ms": round(ms, 2)})
        tcp_checks.append((name, tcp))
    results += run_checks(tcp_checks, deadline=min(t, 1.5) + 0.5)
    dial = next((r.data["address"] for r in results if r.status == OK and "address" in r.data), None)
    derp_names = ["tls", "meta-cert", "upgrade", "relay", "fast-start", "latency-check"]
    if dial is None:
        results += [Result(n, SKIP, "no TCP connection") for n in derp_names]
        results += run_checks(stun_checks(), deadline=t + 1)
        return results

    # TLS with the CertName rules.
    info = None
    try:
        info = tls_handshake(dial, port, sni, t)
    except (SSL.Error, OSError, TimeoutError) as e:
        diag = []
        text = _describe_error(e)
        if isinstance(e, SSL.Error) and ("wrong version number" in text or "packet length too long" in text
                                         or "record layer failure" in text):
            diag.append(f"port {port} does not speak TLS (plain HTTP?): Tailscale clients need TLS; with derper flags "
                        "TLS is on only for port 443 or -certmode manual")
        if isinstance(e, TimeoutError | socket.timeout):
            diag.append(f"port {port} accepted TCP but never answered the TLS handshake: a plain-HTTP server "
                        "(derpbox -dev / -tls off, or -a on a port other than 443 without -certmode manual)?")
        results.append(Result("tls", FAIL, f"handshake failed: {text}", diag))
    if info is not None:
        status, detail, diag = check_cert_name_rules(info.chain, host_name, cert_name, sni, opts.cafile)
        leaf = next((c for c in info.chain if not is_meta_cert(c)), None)
        results.append(Result("tls", status, f"{info.version}, {detail}", diag,
                              {"version": info.version, "cert_names": cert_names(leaf) if leaf else [],
                               "sha256": leaf.fingerprint(hashes.SHA256()).hex() if leaf else None}))
        mkey = meta_key(info.chain)
        if mkey:
            results.append(Result("meta-cert", OK, f"present (key {mkey.hex()[:16]}…)", data={"key": mkey.hex()}))
        elif info.version == "TLSv1.3":
            results.append(Result("meta-cert", WARN, "no derpkey meta-certificate in the chain: clients cannot use "
                                  "fast start (a TLS-terminating proxy in front, or not a derper-compatible server)"))
        else:
            results.append(Result("meta-cert", SKIP, f"only used on TLS 1.3 (negotiated {info.version})"))
    else:
        mkey = None
        results.append(Result("meta-cert", SKIP, "no TLS"))

    # The rest concurrently: upgrade probe, relay (+fast start), latency-check, STUN, captive portal.
    checks: list[tuple[str, Callable[[], Result]]] = []
    if info is None:
        checks += [(n, lambda n=n: Result(n, SKIP, "no TLS")) for n in ("upgrade", "relay", "latency-check")]
    else:
        def upgrade():
            r = upgrade_probe(dial, port, tls=True, sni=sni, host_header=hh, timeout=t)
            if r.status != 101:
                raise CheckFailed(f"/derp answered HTTP {r.status} {r.reason}".rstrip(), *proxy_diagnosis(r),
                                  data={"http_status": r.status})
            return Result("upgrade", OK, "/derp answered 101 Switching Protocols", data={"http_status": 101})
        checks.append(("upgrade", upgrade))

        def relay():
            url = f"https://{_host_header(dial, port, -1)}/derp"
            try:
                facts = relay_test(url, sni=sni, timeout=t)
            except Exception as e:  # noqa: BLE001
                from .client import DERPClientError

                if isinstance(e, DERPClientError) and "answered HTTP" in str(e):
                    raise CheckFailed(str(e), "see the upgrade check") from None
                raise
            data = {"rtt_ms": round(facts["rtt"] * 1000, 2), "server_key": facts["server_key"].hex(),
                    "fast_start": facts["fast_start"]}
            return Result("relay", OK, f"packet relayed between two fresh keys, RTT {data['rtt_ms']:.1f} ms "
                          f"(server key {facts['server_key'].hex()[:16]}…)", data=data)
        checks.append(("relay", relay))

        def latency():
            start = time.monotonic()
            r = http_request(dial, port, "/derp/latency-check", tls=True, sni=sni, host_header=hh, timeout=t)
            ms = (time.monotonic() - start) * 1000
            if r.status > 299:
                raise CheckFailed(f"GET /derp/latency-check answered {r.status} (clients count > 299 as failure)")
            return Result("latency-check", OK, f"GET /derp/latency-check {r.status} in {ms:.1f} ms",
                          data={"rtt_ms": round(ms, 2)})
        checks.append(("latency-check", latency))
    checks += stun_checks()

    if not can80:
        checks.append(("captive-portal", lambda: Result("captive-portal", SKIP, "CanPort80 is false")))
    elif v4 is None or not _is_ipv4(str(_field(node, "IPv4", "") or "")):
        checks.append(("captive-portal", lambda: Result("captive-portal", SKIP,
                                                        "CanPort80 needs a literal IPv4 in the node")))
    else:
        def captive():
            challenge = f"ts_{v4}"
            hp = opts.http_port
            try:
                r = http_request(v4, hp, "/generate_204", tls=False, sni=None, host_header=_host_header(v4, hp, 80),
                                 timeout=min(t, 3.0), headers={"X-Tailscale-Challenge": challenge})
            except OSError as e:
                raise CheckFailed(f"http://{_host_header(v4, hp, 80)}/generate_204: {_describe_error(e)}",
                                  f"port {hp} is closed or filtered but the DERP map says CanPort80: open TCP {hp} "
                                  "to derpbox (-http-port) or set CanPort80 false (clients would see a captive "
                                  "portal)") from None
            if r.status != 204 or r.headers.get("x-tailscale-response") != f"response {challenge}":
                raise CheckFailed(f"/generate_204 answered {r.status} "
                                  f"{'without' if 'x-tailscale-response' not in r.headers else 'with a wrong'} challenge response",
                                  f"something else answers on port {hp}; clients will report a captive portal")
            return Result("captive-portal", OK, "/generate_204 answered 204 with the challenge response")
        checks.append(("captive-portal", captive))

    done = run_checks(checks, deadline=2 * t + 1)
    by_name = {r.name: r for r in done}
    for r in done:
        results.append(r)
        if r.name == "relay":
            results.append(_fast_start_result(info, mkey, r))
    if opts.idle_test > 0:
        if by_name.get("relay") and by_name["relay"].status == OK:
            results.append(idle_test(dial, port, sni, opts.idle_test, t))
        else:
            results.append(Result("idle", SKIP, "relay does not work"))
    return results


def _fast_start_result(info: TLSInfo | None, mkey: bytes | None, relay: Result) -> Result:
    if relay.status != OK:
        return Result("fast-start", SKIP, "relay failed")
    key = bytes.fromhex(relay.data["server_key"])
    if mkey is not None and mkey != key:
        return Result("fast-start", FAIL, "meta-certificate key differs from the ServerKey", [
            "the meta-certificate must carry the DERP key: several servers behind one address?"])
    if info and info.version == "TLSv1.3" and mkey is not None:
        if relay.data.get("fast_start"):
            return Result("fast-start", OK, "used (TLS 1.3, meta-certificate key equals the ServerKey)")
        return Result("fast-start", FAIL, "meta-certificate present but fast start was not used")
    return Result("fast-start", SKIP, "not available (needs TLS 1.3 and the meta-certificate)")


def idle_test(host: str, port: int, sni: str | None, seconds: float, timeout: float) -> Result:
    from .client import DERPClient

    c = DERPClient.connect(f"https://{_host_header(host, port, -1)}/derp", timeout=timeout, server_name=sni)
    start = time.monotonic()
    try:
        closed = c.is_closed_by_server(seconds)
    finally:
        c.close()
    held = time.monotonic() - start
    if closed:
        return Result("idle", FAIL, f"idle connection was cut after {held:.0f} s (asked to hold {seconds:g} s)", [
            f"an idle timeout of about {held:.0f} s is shorter than the {KEEPALIVE_SECONDS}-65 s DERP keepalive: "
            "raise the proxy/load balancer/firewall idle timeout to at least 70 s"])
    return Result("idle", OK, f"idle connection survived {seconds:g} s")


def load_targets(target: str, opts_args) -> list[dict]:
    """Regions [{RegionID, RegionCode, Nodes}] from a host, URL, map file or map URL."""
    text = None
    if os.path.exists(target):
        with open(target, encoding="utf-8") as f:
            text = f.read()
    else:
        parts = urlsplit(target if "://" in target else f"https://{target}")
        if parts.path not in ("", "/", "/derp"):
            with urllib.request.urlopen(target, timeout=opts_args.timeout) as resp:
                text = resp.read().decode("utf-8")
        else:
            if parts.scheme not in ("https", "wss"):
                raise ValueError(f"{target}: Tailscale clients only use https:// for DERP")
            host = parts.hostname or ""
            node = {"Name": host, "RegionID": 0, "HostName": host, "DERPPort": parts.port or 443,
                    "CertName": opts_args.cert_name or "", "STUNPort": opts_args.stun_port,
                    "CanPort80": opts_args.port80}
            if _is_ipv4(host):
                node["IPv4"] = host
            elif _is_ipv6(host):
                node["IPv6"] = host
            return [{"RegionID": 0, "RegionCode": "", "Nodes": [node]}]
    doc = json.loads(text)
    regions = _field(doc, "Regions")
    if not isinstance(regions, dict):
        raise ValueError(f"{target}: not a DERP map (no Regions object)")
    out = []
    for rid, region in sorted(regions.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if region is None:
            continue
        out.append({"RegionID": _field(region, "RegionID", rid), "RegionCode": _field(region, "RegionCode", ""),
                    "Nodes": _field(region, "Nodes", []) or []})
    return out


def check_main(argv: list[str], environ=os.environ, out=None) -> int:
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="derpbox check", description=(
        "Check DERP nodes as a Tailscale client does: TCP, TLS with the CertName rules, meta-certificate "
        "and fast start, a relayed packet, /derp/latency-check, STUN over IPv4/IPv6, the captive-portal "
        "check. TARGET is https://host[:port], host, or a DERP map (JSON file path or URL)."))
    p.add_argument("target")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--region", help="only this region (ID or RegionCode)")
    p.add_argument("--idle-test", type=float, default=0.0, metavar="SECONDS",
                   help="hold an idle DERP connection this long and report if it is cut (off by default)")
    p.add_argument("--ca-file", help="extra trusted CA certificates (PEM), for private CAs and tests")
    p.add_argument("--timeout", type=float, default=3.0, help="per-step timeout in seconds (default 3)")
    p.add_argument("--cert-name", default="", help="CertName for a single host (e.g. sha256-raw:<hex>)")
    p.add_argument("--stun-port", type=int, default=0, help="STUN port for a single host (0 = 3478, -1 = none)")
    p.add_argument("--port80", action="store_true", help="single host: check as CanPort80 true")
    p.add_argument("--http-port", type=int, default=80,
                   help="port for the captive-portal check (Tailscale uses 80; for port-forwarded tests)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    opts = CheckOptions(timeout=args.timeout, cafile=args.ca_file, idle_test=args.idle_test, http_port=args.http_port)
    try:
        regions = load_targets(args.target, args)
    except (OSError, ValueError) as e:
        out.write(f"derpbox check: {e}\n")
        return 2
    if args.region:
        regions = [r for r in regions if str(r["RegionID"]) == args.region or r["RegionCode"] == args.region]
        if not regions:
            out.write(f"derpbox check: no region {args.region!r} in {args.target}\n")
            return 2
    report = []
    failed = False
    for region in regions:
        for node in region["Nodes"]:
            results = check_node(node, opts)
            failed |= any(r.status == FAIL for r in results)
            entry = {"region_id": region["RegionID"], "region_code": region["RegionCode"],
                     "node": _field(node, "Name", ""), "host": _field(node, "HostName", ""),
                     "ok": not any(r.status == FAIL for r in results), "checks": results}
            report.append(entry)
            if not args.json:
                _print_node(entry, out)
    if args.json:
        doc = {"ok": not failed, "nodes": [{**e, "checks": [r.as_json() for r in e["checks"]]} for e in report]}
        out.write(json.dumps(doc, indent=2) + "\n")
    elif not report:
        out.write("no nodes to check\n")
    else:
        out.write(("all checks passed" if not failed else "some checks FAILED") + "\n")
    out.flush()
    return 1 if failed else 0


def _print_node(entry: dict, out) -> None:
    region = f"region {entry['region_id']}" + (f" ({entry['region_code']})" if entry["region_code"] else "")
    out.write(f"== {region} node {entry['node']} ({entry['host']})\n")
    for r in entry["checks"]:
        out.write("  " + r.line() + "\n")
        for d in r.diagnosis:
            out.write(f"       DIAGNOSIS: {d}\n")
