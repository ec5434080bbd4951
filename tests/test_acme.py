"""ACME certificates against a real Pebble on loopback (HTTP-01, TLS-ALPN-01, renewal, retries).

derpbox's own port-80 site and TLS listener run on the ports Pebble's
validator dials (``pebble.http_port``, ``pebble.tls_port``); challtestsrv
resolves ``derp.test`` to 127.0.0.1. Clients are blocking (stdlib ssl and
pyOpenSSL) and run in threads.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from acme import messages
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory

from derpbox.tls.acme import (
    _ALPN_FILE,
    ACME_IDENTIFIER_OID,
    AcmeCertificateSource,
    AcmeFollower,
    _pem,
    _decode_eab_key,
    acme_cert_paths,
    challenge_name,
    default_directory,
    make_tls_alpn01_certificate,
)
from derpbox.tls.context import ServerTLS
from derpbox.web.port80 import build_port80_site

from . import support
from .certs import make_cert
from .pebble import Pebble

HOST = "derp.test"
DERP_KEY = bytes(range(32))

pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def wait_for(predicate, timeout=30.0):
    """ACME rounds take seconds: a longer default than the suite's."""
    return support.wait_for(predicate, timeout)


@pytest.fixture
def harness(tmp_path):
    """Makes sources and listeners; stops them all at the end of the test."""

    class Harness:
        def __init__(self):
            self.sources = []
            self.ports = []

        def source(self, pb: Pebble, certdir=None, hostname=HOST, **kw) -> AcmeCertificateSource:
            kw.setdefault("http01_available", True)
            src = AcmeCertificateSource(
                reactor,
                hostname=hostname,
                certdir=certdir or tmp_path / "certs",
                directory_url=pb.directory_url,
                ca_file=pb.ca_file,
                email="test@example.org",
                **kw,
            )
            self.sources.append(src)
            return src

        def port80(self, src, port):
            site = build_port80_site(challenge_responder=src.http01_response)
            self.ports.append(reactor.listenTCP(port, site, interface="127.0.0.1"))

        def tls(self, src, port=0) -> int:
            factory = TLSMemoryBIOFactory(ServerTLS(src, src.hostname, DERP_KEY), False, Factory.forProtocol(Echo))
            p = reactor.listenTCP(port, factory, interface="127.0.0.1")
            self.ports.append(p)
            return p.getHost().port

    h = Harness()
    yield h
    for src in h.sources:
        if src.running:
            _stop(src)
    for p in h.ports:
        pytest_twisted.blockon(p.stopListening())


def _stop(src):
    from twisted.internet.defer import maybeDeferred

    pytest_twisted.blockon(maybeDeferred(src.stopService))


def verified_leaf(port: int, root_pem: bytes, alpn=None, name=HOST) -> x509.Certificate:
    """Handshake trusting only Pebble's root, check the name (an IP: its iPAddress SAN), echo;
    the served leaf."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            t.sendall(b"ping")
            assert t.recv(4) == b"ping"
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True))


class Kept:
    """A TLS connection kept open (pyOpenSSL, blocking)."""

    def __init__(self, port: int):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        self.conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), sock)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(HOST.encode())
        self.conn.do_handshake()
        self.leaf = self.conn.get_peer_certificate(as_cryptography=True)
        assert self.echo() == b"ping"

    def echo(self, data=b"ping"):
        self.conn.sendall(data)
        return self.conn.recv(len(data))

    def close(self):
        self.conn.close()


def acme_tls_handshake(port: int) -> tuple[bytes, x509.Certificate]:
    """A validator-style handshake: SNI derp.test, ALPN only acme-tls/1."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_alpn_protos([b"acme-tls/1"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    conn.set_tlsext_host_name(HOST.encode())
    try:
        conn.do_handshake()
        return conn.get_alpn_proto_negotiated(), conn.get_peer_certificate(as_cryptography=True)
    finally:
        sock.close()


# --- units ------------------------------------------------------------------------------


def test_default_directories():
    assert default_directory("letsencrypt") == "https://acme-v02.api.letsencrypt.org/directory"
    assert default_directory("gcp") == "https://dv.acme-v02.api.pki.goog/directory"
    with pytest.raises(ValueError):
        default_directory("manual")


def test_eab_key_accepts_base64url_and_std_base64():
    raw = bytes(range(250, 256)) + b"\xfb\xff"
    import base64

    assert _decode_eab_key(base64.urlsafe_b64encode(raw).decode()) == _decode_eab_key(base64.b64encode(raw).decode())
    with pytest.raises(ValueError):
        _decode_eab_key("not base64 !!")


def test_tls_alpn01_certificate_is_rfc8737():
    import hashlib

    ck = make_tls_alpn01_certificate(HOST, "tok.thumb")
    ext = ck.leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    san = ck.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName(HOST)]


def test_empty_hostname_rejected(tmp_path):
    with pytest.raises(ValueError, match="need a hostname"):
        AcmeCertificateSource(reactor, hostname="", certdir=tmp_path, directory_url="https://x/")


def test_ip_identifier_names_rfc8738():
    # TLS-ALPN-01 for an IP: reverse-DNS SNI, the address in an iPAddress SAN (RFC 8738 section 6).
    assert challenge_name("127.0.0.1") == "1.0.0.127.in-addr.arpa"
    assert challenge_name("2001:db8::7") == "7.0.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.ip6.arpa"
    assert challenge_name("Derp.Test.") == "derp.test"
    ck = make_tls_alpn01_certificate("2001:db8::7", "tok.thumb")
    san = ck.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("2001:db8::7"))]
    assert ck.leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
    # derper's file names for IP certificates: an IPv6 address's colons become dots.
    assert acme_cert_paths("/c", "2001:db8::7") == (Path("/c/2001.db8..7.crt"), Path("/c/2001.db8..7.key"))
    assert acme_cert_paths("/c", "127.0.0.1") == (Path("/c/127.0.0.1.crt"), Path("/c/127.0.0.1.key"))


def test_profile_is_shortlived_for_ips_only_and_only_when_the_ca_lists_it(tmp_path, log_lines):
    def source(hostname, **kw):
        return AcmeCertificateSource(reactor, hostname=hostname, certdir=tmp_path, directory_url="https://ca/", **kw)

    def directory(profiles):
        return messages.Directory.from_json({"newOrder": "https://ca/new-order",
                                             **({"meta": {"profiles": profiles}} if profiles is not None else {})})

    lets_encrypt = directory({"classic": "90 days", "shortlived": "6 days", "tlsserver": "new"})
    assert source("127.0.0.1")._choose_profile(lets_encrypt) == "shortlived"
    assert source("2001:db8::7")._choose_profile(lets_encrypt) == "shortlived"
    assert source(HOST)._choose_profile(lets_encrypt) is None  # DNS names keep the CA's default
    assert source(HOST, profile="tlsserver")._choose_profile(lets_encrypt) == "tlsserver"
    assert source("127.0.0.1")._choose_profile(directory(None)) is None
    assert any("lists no profiles: ordering without the 'shortlived' profile for 127.0.0.1" in line
               for line in log_lines)
    assert source("127.0.0.1")._choose_profile(directory({"classic": "90 days"})) is None
    assert any("lists the profiles classic: ordering without the 'shortlived' profile" in line for line in log_lines)


def test_renewal_at_a_third_of_a_six_day_lifetime_and_expiry_flag(tmp_path, log_events):
    """A stored 6-day certificate (Let's Encrypt's shortlived: backdated 1 day, 5 left): renewal is
    due 2 days before expiry, the near-expiry flag (metric) and log at 1 day before."""
    from derpbox.metrics import declared, render
    from derpbox.tls.expiry import ExpiryWatch

    make_cert(tmp_path, "127.0.0.1", days=5)
    clock = Clock()
    clock.advance(time.time())
    src = AcmeCertificateSource(reactor, hostname="127.0.0.1", certdir=tmp_path, directory_url="https://ca/",
                                clock=clock)
    src.startService()
    ck = src.current()
    assert ck is not None and src.stats.orders == 0
    (call,) = clock.getDelayedCalls()
    renew_at = call.getTime()
    assert renew_at == pytest.approx(ck.not_after.timestamp() - 2 * 86400, abs=1)
    assert src.stats.next_check == pytest.approx(renew_at)
    # Stopped, so the renewal (to a CA that does not exist) is not attempted as time moves on.
    src.stopService()
    assert not clock.getDelayedCalls()
    watch = ExpiryWatch(src, clock, self_signed_ip=False)
    clock.advance(renew_at + 86400 - clock.seconds() - 1)
    watch.check()
    assert src.expiring == 0 and not [e for e in log_events if e.get("log_namespace") == "derpbox.tls"]
    clock.advance(2)
    watch.check()
    assert src.expiring == 1
    assert b"\nderpbox_acme_certificate_expiring 1\n" in render(declared(src, src.METRICS))
    (event,) = [e for e in log_events if e.get("log_namespace") == "derpbox.tls"]
    assert "expires in 1 days" in formatEvent(event) and "see why renewal fails" in formatEvent(event)


# --- against Pebble -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_http01_issues_certificate_served_with_verified_chain(pebble, harness, tmp_path):
    src = harness.source(pebble, challenge="http-01")
    harness.port80(src, pebble.http_port)
    port = harness.tls(src)
    src.startService()
    yield wait_for(lambda: src.current() is not None)
    assert (src.stats.orders, src.stats.issued, src.stats.accounts_created) == (1, 1, 1)
    assert not src.stats.failures
    crt, key = tmp_path / "certs" / "derp.test.crt", tmp_path / "certs" / "derp.test.key"
    assert len(x509.load_pem_x509_certificates(crt.read_bytes())) >= 2  # full chain
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs" / "acme-account.key").stat().st_mode) == 0o600
    assert src.stats.not_after == pytest.approx(src.current().not_after.timestamp())
    leaf = yield deferToThread(verified_leaf, port, pebble.root_pem())
    assert leaf.serial_number == src.current().leaf.serial_number
    # Challenges are withdrawn after the order.
    assert not src._http01 and src.tls_alpn_certificate(HOST) is None


@pytest_twisted.inlineCallbacks
def test_tls_alpn01_without_port80(pebble, harness, log_lines):
    src = harness.source(pebble, challenge="auto", http01_available=False)
    port = harness.tls(src, pebble.tls_port)  # Pebble's validator dials this; nothing on port 80
    src.startService()
    yield wait_for(lambda: src.current() is not None)
    assert src.stats.issued == 1 and not src.stats.failures
    assert any("answering tls-alpn-01" in line for line in log_lines)
    assert any("ACME tls-alpn-01 handshake for derp.test" in line for line in log_lines)
    root = pebble.root_pem()
    leaf = yield deferToThread(verified_leaf, port, root)
    assert leaf.serial_number == src.current().leaf.serial_number
    leaf = yield deferToThread(verified_leaf, port, root, ["http/1.1"])
    assert leaf.serial_number == src.current().leaf.serial_number
    # No pending challenge any more: acme-tls/1 gets the normal certificate and no ALPN.
    proto, leaf = yield deferToThread(acme_tls_handshake, port)
    assert proto == b"" and leaf.serial_number == src.current().leaf.serial_number


@pytest_twisted.inlineCallbacks
def test_restart_reuses_stored_certificate_and_account(pebble, harness, tmp_path):
    first = harness.source(pebble)
    harness.port80(first, pebble.http_port)
    first.startService()
    yield wait_for(lambda: first.current() is not None)
    yield first.stopService()
    account_key = (tmp_path / "certs" / "acme-account.key").read_bytes()
    for p in harness.ports:
        yield p.stopListening()
    harness.ports.clear()

    second = harness.source(pebble)
    harness.port80(second, pebble.http_port)
    second.startService()
    # Published at once, with no order.
    assert second.current() is not None
    assert second.current().leaf.serial_number == first.current().leaf.serial_number
    yield deferLater(reactor, 0.5, lambda: None)
    assert second.stats.orders == 0
    assert second.stats.next_check > time.time() + 1000  # renewal timer at 2/3 of the lifetime

    # An order now uses the stored account: no new registration.
    yield second.renew_now()
    assert (second.stats.orders, second.stats.issued, second.stats.renewals) == (1, 1, 1)
    assert second.stats.accounts_created == 0
    assert (tmp_path / "certs" / "acme-account.key").read_bytes() == account_key
    assert second.current().leaf.serial_number != first.current().leaf.serial_number


@pytest_twisted.inlineCallbacks
def test_renewal_timer_swaps_certificate_and_keeps_connections(pebble, harness, tmp_path):
    first = harness.source(pebble, http01_available=False)
    port = harness.tls(first, pebble.tls_port)
    first.startService()
    yield wait_for(lambda: first.current() is not None)
    yield first.stopService()
    for p in harness.ports:
        yield p.stopListening()
    harness.ports.clear()

    old = first.current()
    lifetime = (old.not_after - old.leaf.not_valid_before_utc).total_seconds()
    # Due for renewal 2 s from now.
    fraction = (old.not_after.timestamp() - (time.time() + 2)) / lifetime
    src = harness.source(pebble, http01_available=False, renew_fraction=fraction)
    port = harness.tls(src, pebble.tls_port)
    src.startService()
    assert src.current().leaf.serial_number == old.leaf.serial_number
    kept = yield deferToThread(Kept, port)
    try:
        assert kept.leaf.serial_number == old.leaf.serial_number
        assert src.stats.orders == 0
        yield wait_for(lambda: src.stats.renewals == 1)
        new_serial = src.current().leaf.serial_number
        assert new_serial != old.leaf.serial_number
        # The connection made before the swap is still served...
        assert (yield deferToThread(kept.echo, b"still here")) == b"still here"
        # ...and new handshakes get the new certificate.
        leaf = yield deferToThread(verified_leaf, port, pebble.root_pem())
        assert leaf.serial_number == new_serial
    finally:
        kept.close()


@pytest_twisted.inlineCallbacks
def test_failed_challenge_is_logged_with_ca_detail_and_retried(pebble, harness, log_lines):
    # http-01 with nothing listening on Pebble's httpPort: the CA's validation fails.
    src = harness.source(pebble, challenge="http-01", retry_min=60)
    src.startService()
    yield wait_for(lambda: src.stats.failures)
    assert src.stats.failures == {"challenge": 1}
    assert src.current() is None
    assert "urn:ietf:params:acme:error:connection" in src.stats.last_error
    assert any("could not obtain a certificate for derp.test" in line and "retrying in 60s" in line for line in log_lines)
    assert src.stats.next_check == pytest.approx(time.time() + 60, abs=5)


@pytest_twisted.inlineCallbacks
def test_acme_server_down_at_start_retries_until_up(tmp_path_factory, harness, log_lines):
    pb = Pebble(tmp_path_factory.mktemp("pebble-late"))
    try:
        src = harness.source(pb, retry_min=0.2, retry_max=0.5)
        harness.port80(src, pb.http_port)
        port = harness.tls(src)
        src.startService()
        yield wait_for(lambda: src.stats.failures["directory"] >= 3)
        assert src.current() is None
        assert any("cannot fetch ACME directory" in line and pb.directory_url in line for line in log_lines)
        yield deferToThread(pb.start)
        yield wait_for(lambda: src.current() is not None)
        assert src.stats.issued == 1
        leaf = yield deferToThread(verified_leaf, port, pb.root_pem())
        assert leaf.serial_number == src.current().leaf.serial_number
    finally:
        yield deferToThread(pb.close)


def test_a_follower_serves_what_the_ordering_worker_wrote(tmp_path):
    """The other workers of a node in an ACME mode: certificate and HTTP-01 answers from files."""
    clock = Clock()
    shared = tmp_path / "challenges"
    follower = AcmeFollower(clock, hostname="derp.test", certdir=tmp_path / "certs", shared_challenges=shared)
    follower.startService()
    assert follower.current() is None  # nothing ordered yet
    make_cert(tmp_path / "certs", "derp.test")
    clock.advance(1)
    assert follower.current() is not None
    assert follower.current().leaf.subject.rfc4514_string() == "CN=derp.test"
    shared.mkdir()
    (shared / "tok3n").write_bytes(b"tok3n.keyauth")
    assert follower.http01_response("tok3n") == b"tok3n.keyauth"
    assert follower.http01_response("missing") is None
    assert follower.http01_response("../certs/derp.test.key") is None
    # The ordering worker's TLS-ALPN-01 certificate, for the name it is for only.
    assert follower.tls_alpn_certificate("derp.test") is None
    alpn = make_tls_alpn01_certificate("derp.test", "tok3n.keyauth")
    (shared / _ALPN_FILE).write_bytes(_pem(alpn))
    served = follower.tls_alpn_certificate("DERP.test.")
    assert served.leaf == alpn.leaf and served.key.private_numbers() == alpn.key.private_numbers()
    assert follower.tls_alpn_certificate("other.test") is None
    follower.stopService()
    # For an IP -hostname: derper's file names, the validation's reverse-DNS SNI.
    ip_follower = AcmeFollower(clock, hostname="2001:db8::7", certdir=tmp_path / "ip", shared_challenges=shared)
    ip_follower.startService()
    _, crt, key = make_cert(tmp_path / "made", "2001:db8::7")
    (tmp_path / "ip").mkdir()
    crt.rename(tmp_path / "ip" / "2001.db8..7.crt")
    key.rename(tmp_path / "ip" / "2001.db8..7.key")
    clock.advance(1)
    assert ip_follower.current() is not None
    (shared / _ALPN_FILE).write_bytes(_pem(make_tls_alpn01_certificate("2001:db8::7", "tok3n.keyauth")))
    assert ip_follower.tls_alpn_certificate(challenge_name("2001:db8::7")) is not None
    assert ip_follower.tls_alpn_certificate("2001:db8::7") is None
    ip_follower.stopService()


@pytest_twisted.inlineCallbacks
def test_ip_certificate_over_tls_alpn01_first_and_on_renewal(pebble, harness, tmp_path, log_lines):
    """RFC 8738: the order has an ip identifier; Pebble's validator sends the reverse-DNS SNI and
    gets the address in an iPAddress SAN, before any certificate exists and with one served."""
    src = harness.source(pebble, hostname="127.0.0.1", challenge="tls-alpn-01")
    port = harness.tls(src, pebble.tls_port)
    src.startService()
    yield wait_for(lambda: src.current() is not None or src.stats.failures)
    assert src.current() is not None, "\n".join(log_lines[-10:])
    assert any("ACME tls-alpn-01 handshake for 1.0.0.127.in-addr.arpa from 127.0.0.1" in line for line in log_lines)
    leaf = yield deferToThread(verified_leaf, port, pebble.root_pem(), name="127.0.0.1")
    assert leaf.serial_number == src.current().leaf.serial_number
    yield src.stopService()
    for p in harness.ports:
        yield p.stopListening()
    harness.ports.clear()

    # Renewal while that certificate is served: the stored files, a new account (so Pebble
    # cannot reuse the first account's valid authorization and asks for the challenge again).
    certs2 = tmp_path / "certs2"
    certs2.mkdir()
    for name in ("127.0.0.1.crt", "127.0.0.1.key"):
        (certs2 / name).write_bytes((tmp_path / "certs" / name).read_bytes())
    renewing = harness.source(pebble, certdir=certs2, hostname="127.0.0.1", challenge="tls-alpn-01")
    port = harness.tls(renewing, pebble.tls_port)
    renewing.startService()
    assert renewing.current().leaf.serial_number == src.current().leaf.serial_number

    def validations():
        return sum("ACME tls-alpn-01 handshake for 1.0.0.127.in-addr.arpa" in line for line in log_lines)

    before = validations()
    yield renewing.renew_now()
    assert renewing.stats.renewals == 1 and renewing.stats.accounts_created == 1, "\n".join(log_lines[-10:])
    assert validations() > before
    leaf = yield deferToThread(verified_leaf, port, pebble.root_pem(), name="127.0.0.1")
    assert leaf.serial_number == renewing.current().leaf.serial_number != src.current().leaf.serial_number
