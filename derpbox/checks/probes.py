"""The network steps of the checks, each bounded by a timeout. TCP, TLS and the
/derp upgrade go through derpbox.client, so a check sends what the client sends."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from cryptography import x509
from nacl.public import PrivateKey
from OpenSSL import SSL

from ..client import DERPClient, open_tcp, parse_response_head, read_response_head, start_tls, upgrade_request
from ..protocol import stun
from .results import CheckFailed

# The Go client's User-Agent, so that whatever sits in front of the server sees a real client's upgrade.
GO_USER_AGENT = "Go-http-client/1.1"
MAX_BODY = 8192
MAX_ERROR_BODY = 512


def host_header(host: str, port: int, default: int) -> str:
    """``host:port`` (IPv6 in brackets), the port left out when it is ``default``."""
    h = f"[{host}]" if ":" in host else host
    return h if port == default else f"{h}:{port}"


@dataclass
class TLSInfo:
    version: str
    chain: list[x509.Certificate]  # as presented, meta-certificate included


@dataclass
class HTTPResponse:
    status: int
    reason: str
    headers: dict
    body: bytes


def tls_handshake(host: str, port: int, sni: str | None, timeout: float, preamble: bytes = b"") -> TLSInfo:
    """A TLS handshake that accepts any certificate (verification is done afterwards)."""
    stream = _open(host, port, True, sni, timeout, preamble)
    try:
        return TLSInfo(stream.version, [c.to_cryptography() for c in stream.peer_chain])
    finally:
        stream.close()


def _open(host: str, port: int, tls: bool, sni: str | None, timeout: float, preamble: bytes = b""):
    """A plain socket or a TLS stream that accepts any certificate; both time out reads after ``timeout``.

    ``preamble`` (a PROXY LOCAL header) goes first when the local checker's address is
    one of derpbox's trusted proxies."""
    sock = open_tcp(host, port, timeout, preamble=preamble)
    if not tls:
        return sock
    try:
        return start_tls(sock, sni, timeout)
    except BaseException:
        sock.close()
        raise


def _read_more(stream, data: bytes, limit: int) -> bytes:
    """``data`` plus what arrives until ``limit`` bytes, the end of the stream, or a read error or timeout."""
    try:
        while len(data) < limit:
            chunk = stream.recv(MAX_BODY)
            if not chunk:
                break
            data += chunk
    except (OSError, SSL.Error):
        pass
    return data


def http_request(host: str, port: int, path: str, *, tls: bool, sni: str | None, host_header: str,
                 timeout: float, method: str = "GET", headers: dict | None = None,
                 body: bytes = b"", read_body: bool = True, preamble: bytes = b"") -> HTTPResponse:
    stream = _open(host, port, tls, sni, timeout, preamble)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}", "User-Agent: derpbox-check",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        stream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head, rest = read_response_head(stream)
        status, reason, hdrs = parse_response_head(head)
        if read_body and method != "HEAD":
            want = int(hdrs.get("content-length", str(MAX_BODY)) or 0)
            rest = _read_more(stream, rest, min(want, MAX_BODY))
        return HTTPResponse(status, reason, hdrs, rest[:MAX_BODY])
    finally:
        stream.close()


def upgrade_probe(host: str, port: int, *, tls: bool, sni: str | None, host_header: str,
                  timeout: float) -> HTTPResponse:
    """Send the Go client's /derp upgrade request (no fast start) and read the answer head,
    and the start of the body when it is not 101."""
    stream = _open(host, port, tls, sni, timeout)
    try:
        stream.sendall(upgrade_request(host_header, user_agent=GO_USER_AGENT))
        head, rest = read_response_head(stream)
        status, reason, hdrs = parse_response_head(head)
        if status != 101:
            stream.settimeout(min(timeout, 0.3))
            rest = _read_more(stream, rest, MAX_ERROR_BODY)
        return HTTPResponse(status, reason, hdrs, rest[:MAX_ERROR_BODY])
    finally:
        stream.close()


def stun_roundtrip(host: str, port: int, timeout: float) -> tuple[str, int, float]:
    """Send Tailscale's Binding Request (retransmitting every 100 ms); (mapped ip, port, rtt)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    txid = os.urandom(stun.TXID_LEN)
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
                raise TimeoutError(f"no answer from {host_header(host, port, -1)} within {timeout:g} s")
            if now - sent >= 0.1:
                s.send(req)
                sent = now
            s.settimeout(min(deadline, sent + 0.1) - now)
            try:
                data = s.recv(2048)
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                raise CheckFailed(f"{host_header(host, port, -1)} answered ICMP port unreachable "
                                  f"(nothing listens on UDP {port})") from None
            try:
                got_txid, ip, mport = stun.parse_binding_response(data)
            except stun.STUNError:
                continue
            if got_txid == txid:
                return ip, mport, time.monotonic() - start


def relay_test(url: str, *, sni: str | None, timeout: float, mesh_key: bytes | None = None,
               preamble: bytes = b"") -> dict:
    """Two fresh keys; A sends B one packet; returns facts about the connection and the RTT."""
    kw = dict(timeout=timeout, server_name=sni, mesh_key=mesh_key, is_prober=True, preamble=preamble)
    a = DERPClient.connect(url, PrivateKey.generate(), **kw)
    try:
        b = DERPClient.connect(url, PrivateKey.generate(), **kw)
        try:
            rtt = _relay_one_packet(a, b, timeout)
            c = a.connected
            return {"rtt": rtt, "server_key": c.server_key, "fast_start": c.fast_start,
                    "tls_version": c.tls_version, "http_status": c.http_status}
        finally:
            b.close()
    finally:
        a.close()


def _relay_one_packet(a: DERPClient, b: DERPClient, timeout: float) -> float:
    """Seconds until a packet from ``a`` reaches ``b``, resending it every 250 ms."""
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
            return time.monotonic() - start


def idle_connection(host: str, port: int, sni: str | None, seconds: float, timeout: float) -> tuple[bool, float]:
    """Hold an idle DERP connection for ``seconds``: (whether the server side cut it, seconds held)."""
    c = DERPClient.connect(f"https://{host_header(host, port, -1)}/derp", timeout=timeout, server_name=sni)
    start = time.monotonic()
    try:
        closed = c.is_closed_by_server(seconds)
    finally:
        c.close()
    return closed, time.monotonic() - start
