"""derpbox in letsencrypt mode against a real ACME CA (Pebble) on loopback."""

from __future__ import annotations

import ssl
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward

from derpbox.client import DERPClient

from .tailcat import Tailcat, needs_tailcat, ping
from .support import SteadyPair, wait_for

HOST = "derp.test"


def acme_flags(pebble, tmp_path, *extra):
    return ("-certmode", "letsencrypt", "-hostname", HOST, "-tls", "on", "-certdir", str(tmp_path / "acme"),
            "-acme-directory", pebble.directory_url, "-acme-ca-file", str(pebble.ca_file), *extra)


def verified_version(port: int, root_pem: bytes) -> str:
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=HOST) as t:
            return t.version()


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_tls_alpn01_without_port80_and_real_clients_verify_the_chain(start_server, pebble, serve_map, tmp_path):
    # Pebble's validator dials its tlsPort: derpbox's TLS listener is there, and port 80 is off.
    server = yield start_server(*acme_flags(pebble, tmp_path, "-a", f"127.0.0.1:{pebble.tls_port}",
                                            "-http-port", "-1"))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    assert source.stats.issued == 1
    root = pebble.root_pem()
    assert (yield deferToThread(verified_version, server.port, root)) == "TLSv1.3"
    # A Go client that trusts Pebble's root (SSL_CERT_FILE), with a normal map: no
    # InsecureForTests, no pin; the chain is verified for derp.test.
    (tmp_path / "pebble-root.pem").write_bytes(root)
    the_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "acme", "RegionName": "acme", "Nodes": [
        {"Name": "900a", "RegionID": 900, "HostName": HOST, "IPv4": "127.0.0.1", "IPv6": "none",
         "DERPPort": server.port, "STUNPort": server.service.stun_port}]}}}
    tc = Tailcat(tmp_path / "tc", serve_map(the_map), extra_env={"SSL_CERT_FILE": str(tmp_path / "pebble-root.pem")})
    out = yield deferToThread(ping, tc)
    assert "via DERP(acme)" in out, out
    assert server.stats.fast_start_upgrades >= 2


@pytest_twisted.inlineCallbacks
def test_http01_through_the_port80_listener(start_server, pebble, tmp_path):
    server = yield start_server(*acme_flags(pebble, tmp_path, "-http-port", str(pebble.http_port),
                                            "-acme-challenge", "http-01"))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    root = pebble.root_pem()
    (tmp_path / "root.pem").write_bytes(root)
    assert (yield deferToThread(verified_version, server.port, root)) == "TLSv1.3"

    def relay():
        a = DERPClient.connect(server.url, server_name=HOST, cafile=str(tmp_path / "root.pem"))
        b = DERPClient.connect(server.url, server_name=HOST, cafile=str(tmp_path / "root.pem"))
        a.send_packet(b.public_key, b"over an ACME certificate")
        got = b.recv_packet()
        a.close()
        b.close()
        return got[1]

    assert (yield deferToThread(relay)) == b"over an ACME certificate"


def served_serial(port: int, root_pem: bytes) -> int:
    from cryptography import x509

    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=HOST) as t:
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number


def varz(port: int, root_pem: bytes) -> str:
    """GET /debug/varz over TLS with SNI derp.test (the relay refuses other names)."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=HOST) as t:
            t.sendall(b"GET /debug/varz HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


@pytest_twisted.inlineCallbacks
def test_renewal_swaps_the_certificate_under_live_derp_connections(start_server, pebble, tmp_path):
    import time


    server = yield start_server(*acme_flags(pebble, tmp_path, "-http-port", str(pebble.http_port),
                                            "-acme-challenge", "http-01"))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    first = source.current().leaf.serial_number
    root = pebble.root_pem()
    (tmp_path / "root.pem").write_bytes(root)
    pair = yield deferToThread(SteadyPair, server.url, server_name=HOST, cafile=str(tmp_path / "root.pem"))
    yield source.renew_now()
    yield wait_for(lambda: source.current().leaf.serial_number != first, timeout=60)
    yield deferToThread(time.sleep, 0.3)
    sent, received = yield deferToThread(pair.stop)
    # The pair opened before the swap kept relaying, nothing lost.
    assert sent > 20 and received == list(range(len(received))) and len(received) >= sent - 1
    assert (yield deferToThread(served_serial, server.port, root)) == source.current().leaf.serial_number != first
    text = yield deferToThread(varz, server.port, root)
    assert "derpbox_acme_issued 2" in text
    assert 'derpbox_acme_failures{kind="challenge"} 0' in text
    not_after = int(source.current().not_after.timestamp())
    assert f"derpbox_tls_certificate_not_after_seconds {not_after}" in text


@pytest_twisted.inlineCallbacks
def test_gcp_mode_with_external_account_binding(start_server, pebble_eab, tmp_path, log_lines):
    """-certmode gcp: EAB is required; a wrong key is refused with the CA's message, the right one works."""
    from .pebble import EAB_KEY, EAB_KID

    def flags(certdir, key):
        return ("-certmode", "gcp", "-hostname", HOST, "-tls", "on", "-certdir", str(tmp_path / certdir),
                "-acme-directory", pebble_eab.directory_url, "-acme-ca-file", str(pebble_eab.ca_file),
                "-acme-email", "ops@derp.test", "-acme-eab-kid", EAB_KID, "-acme-eab-key", key,
                "-http-port", str(pebble_eab.http_port), "-acme-challenge", "http-01")

    wrong = yield start_server(*flags("wrong", "A" * 64))
    source = wrong.service.cert_source
    yield wait_for(lambda: sum(source.stats.failures.values()) >= 1, timeout=30)
    assert source.current() is None and source.stats.issued == 0
    assert any("urn:ietf:params:acme:error" in line for line in log_lines), log_lines[-5:]
    # With no certificate, STUN and the port-80 listener still serve.
    stun_port, http_port = wrong.service.stun_port, wrong.service.http_port

    def other_work():
        import os

        from derpbox.protocol import stun

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(3)
            txid = os.urandom(12)
            u.sendto(stun.build_binding_request(txid), ("127.0.0.1", stun_port))
            stun_ok = stun.parse_binding_response(u.recv(100))[0] == txid
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as t:
            t.sendall(b"GET /generate_204 HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n")
            status = t.recv(100).split(b"\r\n")[0]
        return stun_ok, status

    stun_ok, status = yield deferToThread(other_work)
    assert stun_ok and status == b"HTTP/1.1 204 No Content"
    yield wrong.service.stopService()

    right = yield start_server(*flags("right", EAB_KEY))
    source = right.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    assert source.stats.accounts_created == 1 and source.stats.issued == 1


# --- -acme-ip-certs: a CA-signed certificate for the IP -hostname (RFC 8738) ------------------------

IP = "127.0.0.1"


def ip_flags(pebble, tmp_path, *extra):
    return ("-certmode", "letsencrypt", "-hostname", IP, "-acme-ip-certs", "-tls", "on",
            "-certdir", str(tmp_path / "acme"), "-acme-directory", pebble.directory_url,
            "-acme-ca-file", str(pebble.ca_file), *extra)


def ip_verified_leaf(port: int, root_pem: bytes):
    """A handshake trusting only Pebble's root, the certificate checked for the IP (no SNI sent)."""
    from cryptography import x509

    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=IP) as t:
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True))


def assert_ip_certificate(leaf, source):
    import ipaddress

    from cryptography import x509

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(IP)]
    assert leaf.serial_number == source.current().leaf.serial_number
    assert len(source.current().chain) >= 2  # CA-issued: leaf and intermediate


def announced_node(log_events, log_lines):
    (node,) = [e["derp_map_node"] for e in log_events if "derp_map_node" in e]
    assert any("CA-signed IP certificate (ACME, -acme-ip-certs): clients verify it normally" in line
               for line in log_lines)
    return node


@pytest_twisted.inlineCallbacks
def test_ip_certificate_over_http01(start_server, pebble, tmp_path, log_events, log_lines):
    server = yield start_server(*ip_flags(pebble, tmp_path, "-http-port", str(pebble.http_port),
                                          "-acme-challenge", "http-01"))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    assert source.stats.issued == 1 and not source.stats.failures
    # Debian's Pebble (2.4) lists no profiles, so the order carries none.
    assert source.stats.profile == ""
    assert (tmp_path / "acme" / "127.0.0.1.crt").exists()
    leaf = yield deferToThread(ip_verified_leaf, server.port, pebble.root_pem())
    assert_ip_certificate(leaf, source)
    node = announced_node(log_events, log_lines)
    assert node["HostName"] == IP and node["IPv4"] == IP and "CertName" not in node
    # Renewals replace the certificate but not the map: no "pin changed" line.
    yield source.renew_now()
    assert source.stats.renewals == 1
    assert not any("pin changed" in line for line in log_lines)


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_ip_certificate_over_tls_alpn01_and_a_go_client_verifies_it_without_a_pin(
        start_server, pebble, serve_map, tmp_path, log_events, log_lines):
    server = yield start_server(*ip_flags(pebble, tmp_path, "-a", f"127.0.0.1:{pebble.tls_port}",
                                          "-http-port", "-1"))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    # Pebble's validator named the address by its reverse-DNS name (RFC 8738 section 6).
    assert any("ACME tls-alpn-01 handshake for 1.0.0.127.in-addr.arpa" in line for line in log_lines)
    root = pebble.root_pem()
    leaf = yield deferToThread(ip_verified_leaf, server.port, root)
    assert_ip_certificate(leaf, source)
    node = announced_node(log_events, log_lines)
    assert "CertName" not in node
    # Tailscale's Go client with the node as logged (no pin, no InsecureForTests), trusting Pebble's root.
    (tmp_path / "pebble-root.pem").write_bytes(root)
    the_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "ip", "RegionName": "ip",
                                   "Nodes": [dict(node, IPv6="none")]}}}
    tc = Tailcat(tmp_path / "tc", serve_map(the_map), extra_env={"SSL_CERT_FILE": str(tmp_path / "pebble-root.pem")})
    out = yield deferToThread(ping, tc)
    assert "via DERP(ip)" in out, out


class _ProxyV1Client(portforward.ProxyClient):
    """Opens the forwarded connection with a PROXY v1 line, as Nginx stream does."""

    def connectionMade(self):
        src, dst = self.peer.transport.getPeer(), self.peer.transport.getHost()
        self.transport.write(f"PROXY TCP4 {src.host} {dst.host} {src.port} {dst.port}\r\n".encode())
        super().connectionMade()


class _ProxyV1ClientFactory(portforward.ProxyClientFactory):
    protocol = _ProxyV1Client


class _ProxyV1Server(portforward.ProxyServer):
    clientProtocolFactory = _ProxyV1ClientFactory


@pytest_twisted.inlineCallbacks
def test_ip_certificate_behind_a_proxy_protocol_proxy(start_server, pebble, tmp_path, request):
    """The CA's validation reaches derpbox through the proxy (a PROXY header first): the
    certificate is for the address dialled, whatever source the header names."""
    from twisted.internet import reactor

    server = yield start_server(*ip_flags(pebble, tmp_path, "-http-port", "-1", "-acme-challenge", "tls-alpn-01",
                                          "-proxy-protocol", "v1", "-trusted-proxies", "127.0.0.1"))
    factory = portforward.ProxyFactory("127.0.0.1", server.port)
    factory.protocol = _ProxyV1Server
    proxy = reactor.listenTCP(pebble.tls_port, factory, interface="127.0.0.1")
    request.addfinalizer(lambda: pytest_twisted.blockon(proxy.stopListening()))
    source = server.service.cert_source
    yield wait_for(lambda: source.current() is not None, timeout=60)
    assert source.stats.issued == 1 and not source.stats.failures
    leaf = yield deferToThread(ip_verified_leaf, pebble.tls_port, pebble.root_pem())
    assert_ip_certificate(leaf, source)
