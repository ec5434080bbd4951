"""TLS: certificate sources, the meta-certificate, and real handshakes over loopback.

The server is Twisted's TLSMemoryBIOFactory driven by ServerTLS; the client is
pyOpenSSL on a blocking socket in a thread (it can report the whole peer chain
and can be told to offer TLS 1.1).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import stat
import struct
from dataclasses import dataclass

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory

from derpbox.tls.certs import (
    CertificateError,
    CertificateHolder,
    CertifiedKey,
    ManualCertificateSource,
    cert_paths,
    ensure_ip_self_signed,
    sanitize_hostname,
)
from derpbox.config import load_settings
from derpbox.derpmap import build_node
from derpbox.logs import LogThrottle
from derpbox.tls.context import ServerTLS
from derpbox.tls.metacert import make_meta_certificate

# Parsing the 71-character meta-certificate CN warns; that CN is intended.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")

NOW = datetime.datetime.now(datetime.timezone.utc)  # for test certificates; validity checks use a fresh now
DAY = datetime.timedelta(days=1)
DERP_KEY = bytes(range(32))
META_CN = "derpkey" + DERP_KEY.hex()


# --- certificate fixtures -------------------------------------------------------------


@dataclass
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _issue(subject_cn, public_key, issuer, signing_key, *, ca, sans=(), not_before=None, not_after=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_ca(cn, parent: Issuer | None = None) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = parent.key if parent else key
    return Issuer(_issue(cn, key.public_key(), parent, signer, ca=True), key)


def make_leaf(issuer: Issuer, cn, sans, key=None, **validity):
    key = key or ec.generate_private_key(ec.SECP256R1())
    return _issue(cn, key.public_key(), issuer, issuer.key, ca=False, sans=sans, **validity), key


@pytest.fixture(scope="module")
def root():
    return make_ca("derpbox test root")


@pytest.fixture(scope="module")
def intermediate(root):
    return make_ca("derpbox test intermediate", root)


@pytest.fixture(scope="module")
def dns_cert(intermediate) -> CertifiedKey:
    leaf, key = make_leaf(intermediate, "derp.test", [x509.DNSName("derp.test")])
    return CertifiedKey((leaf, intermediate.cert), key)


@pytest.fixture(scope="module")
def ip_cert(root) -> CertifiedKey:
    leaf, key = make_leaf(root, "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    return CertifiedKey((leaf,), key)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, fmt=serialization.PrivateFormat.PKCS8, encryption=None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption()
    )


def write_pair(certdir, hostname, chain, key, fmt=serialization.PrivateFormat.PKCS8):
    crt, keyfile = cert_paths(certdir, hostname)
    crt.write_bytes(b"".join(pem(c) for c in chain))
    keyfile.write_bytes(key_pem(key, fmt))
    return crt, keyfile


# --- Twisted server and pyOpenSSL client ----------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def listen():
    ports = []

    def start(server_tls: ServerTLS) -> int:
        factory = TLSMemoryBIOFactory(server_tls, False, Factory.forProtocol(Echo))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@dataclass
class Client:
    conn: SSL.Connection
    version: str
    alpn: bytes
    chain: list[x509.Certificate]

    def echo(self, data=b"ping") -> bytes:
        self.conn.sendall(data)
        return self.conn.recv(len(data))

    def close(self):
        self.conn.sock_shutdown(socket.SHUT_RDWR)
        self.conn.close()


def handshake(port, sni=None, alpn=None, max_version=None, keep=False) -> Client:
    """Blocking TLS handshake plus one echo round trip (so the server finished too)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # Let the client offer anything, so that refusals are the server's doing.
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if alpn:
        ctx.set_alpn_protos(alpn)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    if sni is not None:
        conn.set_tlsext_host_name(sni.encode())
    try:
        conn.do_handshake()
        client = Client(
            conn,
            conn.get_protocol_version_name(),
            conn.get_alpn_proto_negotiated(),
            conn.get_peer_cert_chain(as_cryptography=True),
        )
        assert client.echo() == b"ping"
    except BaseException:
        sock.close()
        raise
    if not keep:
        client.close()
    return client


def connect(port, **kwargs):
    return threads.deferToThread(handshake, port, **kwargs)


def recording_throttle():
    events = []
    return LogThrottle(Logger(observer=events.append)), events


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# --- meta-certificate -----------------------------------------------------------------


def test_meta_certificate_fields(recwarn):
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = make_meta_certificate(DERP_KEY)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert common_name(meta) == META_CN and len(META_CN) == 71
    assert meta.issuer == meta.subject
    assert meta.serial_number == 2
    assert isinstance(meta.public_key(), ed25519.Ed25519PublicKey)
    meta.verify_directly_issued_by(meta)
    assert abs(meta.not_valid_before_utc - (now - 30 * DAY)) < datetime.timedelta(minutes=1)
    assert abs(meta.not_valid_after_utc - (now + 30 * DAY)) < datetime.timedelta(minutes=1)
    assert meta.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_meta_certificate_needs_32_byte_key():
    with pytest.raises(ValueError, match="32 bytes"):
        make_meta_certificate(b"\x00" * 31)


# --- handshakes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, name", [(SSL.TLS1_2_VERSION, "TLSv1.2"), (SSL.TLS1_3_VERSION, "TLSv1.3")], ids=["tls12", "tls13"]
)
@pytest_twisted.ensureDeferred
async def test_chain_is_leaf_intermediate_then_meta_cert(listen, dns_cert, version, name):
    port = listen(ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY))
    client = await connect(port, sni="derp.test", max_version=version)
    assert client.version == name
    assert [der(c) for c in client.chain[:2]] == [der(c) for c in dns_cert.chain]
    assert len(client.chain) == 3
    meta = client.chain[-1]
    assert common_name(meta) == META_CN
    assert meta.serial_number == 2
    assert isinstance(meta.public_key(), ed25519.Ed25519PublicKey)


@pytest.mark.parametrize(
    "offered, selected",
    [(None, b""), ([b"h2", b"http/1.1"], b"http/1.1"), ([b"http/1.1"], b"http/1.1"), ([b"h2"], b"")],
)
@pytest_twisted.ensureDeferred
async def test_alpn(listen, dns_cert, offered, selected):
    port = listen(ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY))
    client = await connect(port, sni="derp.test", alpn=offered)
    assert client.alpn == selected


@pytest_twisted.ensureDeferred
async def test_tls_1_1_refused(listen, dns_cert):
    port = listen(ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY))
    with pytest.raises(SSL.Error, match="alert protocol version"):
        await connect(port, sni="derp.test", max_version=SSL.TLS1_1_VERSION)


def test_context_releases_idle_buffers(dns_cert):
    ctx = ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY).getContext()
    assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS  # set_mode returns the current mode


@pytest_twisted.ensureDeferred
async def test_sni_mismatch_fails_handshake_only_for_that_connection(listen, dns_cert):
    throttle, events = recording_throttle()
    port = listen(ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY, log_throttle=throttle))
    established = await connect(port, sni="derp.test", keep=True)

    with pytest.raises(SSL.Error, match="alert handshake failure"):
        await connect(port, sni="evil.test")
    [line] = [formatEvent(e) for e in events]
    assert "'evil.test'" in line and "'derp.test'" in line and "127.0.0.1" in line

    with pytest.raises(SSL.Error, match="alert handshake failure"):
        await connect(port)  # no SNI at all
    assert len(events) == 1  # aggregated, not one line per probe

    assert await threads.deferToThread(established.echo, b"still") == b"still"
    established.close()
    for sni in ("derp.test", "DERP.Test", "derp.test."):
        client = await connect(port, sni=sni)
        assert der(client.chain[0]) == der(dns_cert.leaf)


@pytest_twisted.ensureDeferred
async def test_sni_not_enforced_when_disabled(listen, dns_cert):
    port = listen(ServerTLS(CertificateHolder(dns_cert), "derp.test", DERP_KEY, strict_sni=False))
    for sni in ("other.test", None):
        client = await connect(port, sni=sni)
        assert der(client.chain[0]) == der(dns_cert.leaf)


@pytest_twisted.ensureDeferred
async def test_ip_hostname_accepts_any_or_no_sni(listen, ip_cert):
    port = listen(ServerTLS(CertificateHolder(ip_cert), "127.0.0.1", DERP_KEY))
    for sni in (None, "127.0.0.1", "whatever.test"):
        client = await connect(port, sni=sni)
        assert der(client.chain[0]) == der(ip_cert.leaf)


@pytest_twisted.ensureDeferred
async def test_no_certificate_yet_refuses_then_serves_once_published(listen, dns_cert):
    holder = CertificateHolder()
    throttle, events = recording_throttle()
    port = listen(ServerTLS(holder, "derp.test", DERP_KEY, log_throttle=throttle))
    with pytest.raises(SSL.Error):
        await connect(port, sni="derp.test")
    assert "no certificate available yet for derp.test" in formatEvent(events[0])
    holder.publish(dns_cert)
    await connect(port, sni="derp.test")


@pytest_twisted.ensureDeferred
async def test_certificate_swap_affects_only_new_handshakes(listen, dns_cert, intermediate):
    holder = CertificateHolder(dns_cert)
    port = listen(ServerTLS(holder, "derp.test", DERP_KEY))
    old = await connect(port, sni="derp.test", keep=True)

    leaf, key = make_leaf(intermediate, "derp.test", [x509.DNSName("derp.test")])
    holder.publish(CertifiedKey((leaf,), key))

    new = await connect(port, sni="derp.test")
    assert [der(c) for c in new.chain] == [der(leaf), der(new.chain[-1])]
    assert common_name(new.chain[-1]) == META_CN
    # The established connection keeps its context and still carries data.
    assert await threads.deferToThread(old.echo, b"after swap") == b"after swap"
    assert der(old.conn.get_peer_certificate(as_cryptography=True)) == der(dns_cert.leaf)
    old.close()


# --- IP self-signed certificates and sha256-raw pinning -------------------------------


def tailscale_pin_check(chain: list[x509.Certificate], cert_name: str) -> None:
    """What a Tailscale client does for CertName "sha256-raw:<hex>" (spec 8.2)."""
    others = [c for c in chain if not common_name(c).startswith("derpkey")]
    assert len(others) == 1, "multiple certs"
    cert = others[0]
    assert cert_name == "sha256-raw:" + hashlib.sha256(der(cert)).hexdigest()
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc) <= cert.not_valid_after_utc


@pytest_twisted.ensureDeferred
async def test_ip_self_signed_pin_matches_what_the_client_receives(listen, tmp_path):
    source = ManualCertificateSource(tmp_path, "127.0.0.1")
    cert = source.current()
    port = listen(ServerTLS(source, "127.0.0.1", DERP_KEY))
    client = await connect(port)  # Go sends no SNI to an IP literal
    assert der(client.chain[0]) == der(cert.leaf)
    assert hashlib.sha256(der(client.chain[0])).hexdigest() == cert.sha256_hex
    settings = load_settings(["-hostname", "127.0.0.1", "-certmode", "manual", "-certdir", str(tmp_path), "-c", "/k"],
                             {})
    tailscale_pin_check(client.chain, build_node(settings, cert)["CertName"])


def test_ip_self_signed_certificate_fields(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    ck = ensure_ip_self_signed(tmp_path / "certs", "192.0.2.7")
    leaf = ck.leaf
    assert common_name(leaf) == "192.0.2.7"
    assert leaf.issuer == leaf.subject
    leaf.verify_directly_issued_by(leaf)
    assert isinstance(ck.key, ec.EllipticCurvePrivateKey) and ck.key.curve.name == "secp256r1"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert san.get_values_for_type(x509.DNSName) == []
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert not (ku.key_cert_sign or ku.crl_sign or ku.content_commitment or ku.key_agreement)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=365) <= lifetime <= datetime.timedelta(days=366)
    assert abs(leaf.not_valid_before_utc - now) < datetime.timedelta(minutes=1)


def test_ip_self_signed_files_written_once_then_loaded(tmp_path):
    first = ensure_ip_self_signed(tmp_path, "2001:db8::1")
    crt, key = tmp_path / "2001db81.crt", tmp_path / "2001db81.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate(crt.read_bytes()) == first.leaf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2001db81.crt", "2001db81.key"]
    again = ensure_ip_self_signed(tmp_path, "2001:db8::1")
    assert again.sha256_hex == first.sha256_hex
    assert ManualCertificateSource(tmp_path, "2001:db8::1").current().sha256_hex == first.sha256_hex


def test_ip_self_signed_regenerated_when_a_file_is_missing(tmp_path):
    first = ensure_ip_self_signed(tmp_path, "192.0.2.7")
    (tmp_path / "192.0.2.7.crt").unlink()
    assert ensure_ip_self_signed(tmp_path, "192.0.2.7").sha256_hex != first.sha256_hex


def test_existing_ca_issued_ip_certificate_is_loaded_not_replaced(tmp_path, ip_cert):
    write_pair(tmp_path, "127.0.0.1", ip_cert.chain, ip_cert.key)
    assert ManualCertificateSource(tmp_path, "127.0.0.1").current().leaf == ip_cert.leaf


# --- manual certificate source --------------------------------------------------------


@pytest.mark.parametrize(
    "hostname, expected",
    [("derp.example.com", "derp.example.com"), ("2001:db8::1", "2001db81"), ("a_b/../c d", "ab..cd")],
)
def test_sanitize_hostname(hostname, expected):
    assert sanitize_hostname(hostname) == expected


@pytest.mark.parametrize(
    "make_key, fmt",
    [
        (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.TraditionalOpenSSL),  # PKCS#1
        (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8),
        (lambda: ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.TraditionalOpenSSL),  # SEC1
        (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
        (ed25519.Ed25519PrivateKey.generate, serialization.PrivateFormat.PKCS8),
    ],
)
def test_manual_source_loads_key_types(tmp_path, intermediate, make_key, fmt):
    leaf, key = make_leaf(intermediate, "derp.test", [x509.DNSName("derp.test")], key=make_key())
    write_pair(tmp_path, "derp.test", [leaf, intermediate.cert], key, fmt)
    source = ManualCertificateSource(tmp_path, "derp.test")
    ck = source.current()
    assert ck.chain == (leaf, intermediate.cert)
    assert ck.not_after == leaf.not_valid_after_utc
    # The loaded pair is usable by OpenSSL.
    ServerTLS(source, "derp.test", DERP_KEY).getContext()


def test_manual_source_accepts_wildcard(tmp_path, intermediate):
    leaf, key = make_leaf(intermediate, "*.example.test", [x509.DNSName("*.example.test")])
    write_pair(tmp_path, "derp.example.test", [leaf], key)
    assert ManualCertificateSource(tmp_path, "derp.example.test").current().leaf == leaf


def _expect_error(tmp_path, hostname, *fragments):
    with pytest.raises(CertificateError) as info:
        ManualCertificateSource(tmp_path, hostname)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_manual_missing_files(tmp_path, dns_cert):
    crt, key = cert_paths(tmp_path, "derp.test")
    _expect_error(tmp_path, "derp.test", str(crt), "certificate file not found")
    crt.write_bytes(pem(dns_cert.leaf))
    _expect_error(tmp_path, "derp.test", str(key), "private key file not found")


def test_manual_key_mismatch(tmp_path, dns_cert):
    crt, key = write_pair(tmp_path, "derp.test", dns_cert.chain, ec.generate_private_key(ec.SECP256R1()))
    _expect_error(tmp_path, "derp.test", str(key), "does not match", str(crt))


def test_manual_wrong_hostname(tmp_path, intermediate):
    leaf, key = make_leaf(intermediate, "derp.test", [x509.DNSName("other.test"), x509.DNSName("derp.test.evil")])
    crt, _ = write_pair(tmp_path, "derp.test", [leaf], key)
    _expect_error(
        tmp_path, "derp.test", str(crt), "not valid for 'derp.test'", "DNS:other.test, DNS:derp.test.evil"
    )


def test_manual_common_name_alone_is_not_enough(tmp_path, intermediate):
    leaf, key = make_leaf(intermediate, "derp.test", [])
    write_pair(tmp_path, "derp.test", [leaf], key)
    _expect_error(tmp_path, "derp.test", "not valid for 'derp.test'", "subjectAltName: none")


def test_manual_ip_certificate_for_other_ip(tmp_path, ip_cert):
    write_pair(tmp_path, "127.0.0.2", ip_cert.chain, ip_cert.key)
    _expect_error(tmp_path, "127.0.0.2", "not valid for '127.0.0.2'", "IP:127.0.0.1")


def test_manual_expired(tmp_path, intermediate):
    leaf, key = make_leaf(
        intermediate, "derp.test", [x509.DNSName("derp.test")], not_before=NOW - 10 * DAY, not_after=NOW - DAY
    )
    crt, _ = write_pair(tmp_path, "derp.test", [leaf], key)
    _expect_error(tmp_path, "derp.test", str(crt), "certificate expired at", f"{(NOW - DAY):%Y-%m-%d}")


def test_manual_not_yet_valid(tmp_path, intermediate):
    leaf, key = make_leaf(
        intermediate, "derp.test", [x509.DNSName("derp.test")], not_before=NOW + DAY, not_after=NOW + 9 * DAY
    )
    write_pair(tmp_path, "derp.test", [leaf], key)
    _expect_error(tmp_path, "derp.test", "not valid before")


def test_manual_garbage_certificate(tmp_path, dns_cert):
    crt, key = cert_paths(tmp_path, "derp.test")
    crt.write_bytes(b"this is not PEM\n")
    key.write_bytes(key_pem(dns_cert.key))
    _expect_error(tmp_path, "derp.test", str(crt), "no valid PEM certificate")
    crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    _expect_error(tmp_path, "derp.test", str(crt), "no valid PEM certificate")


def test_manual_garbage_key(tmp_path, dns_cert):
    crt, key = write_pair(tmp_path, "derp.test", dns_cert.chain, dns_cert.key)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    _expect_error(tmp_path, "derp.test", str(key), "no valid PEM private key")


def test_manual_encrypted_key(tmp_path, dns_cert):
    crt, key = write_pair(tmp_path, "derp.test", dns_cert.chain, dns_cert.key)
    key.write_bytes(
        key_pem(
            dns_cert.key,
            encryption=serialization.BestAvailableEncryption(b"secret"),
        )
    )
    _expect_error(tmp_path, "derp.test", str(key), "encrypted")


def test_manual_unreadable_file(tmp_path, dns_cert):
    crt, _ = write_pair(tmp_path, "derp.test", dns_cert.chain, dns_cert.key)
    crt.unlink()
    crt.mkdir()
    _expect_error(tmp_path, "derp.test", str(crt), "cannot read certificate file")


# --- log aggregation ------------------------------------------------------------------


def test_log_throttle_aggregates_per_key():
    events, now = [], [0.0]
    throttle = LogThrottle(Logger(observer=events.append), interval=60, clock=lambda: now[0])
    for t in (0, 1, 2, 59):
        now[0] = t
        throttle.warn("sni", "bad SNI {sni}", sni=t)
    throttle.warn("other", "other reason")
    now[0] = 61
    throttle.warn("sni", "bad SNI {sni}", sni="late")
    assert [formatEvent(e) for e in events] == [
        "bad SNI 0",
        "other reason",
        "bad SNI late (3 similar lines suppressed)",
    ]


# -- the expiry warning ---------------------------------------------------------------------


@pytest.mark.parametrize("self_signed_ip, days_before, expected", [
    (True, 40, None),
    (True, 20, "warn"),
    (False, 20, None),
    (False, 10, "warn"),
    (True, -1, "error"),
])
def test_the_log_warns_ahead_of_expiry(tmp_path, log_events, self_signed_ip, days_before, expected):
    from twisted.internet.task import Clock

    from derpbox.tls.expiry import ExpiryWatch

    holder = CertificateHolder(ensure_ip_self_signed(tmp_path, "192.0.2.7"))
    clock = Clock()
    clock.advance(holder.current().not_after.timestamp() - days_before * 86400)
    ExpiryWatch(holder, clock, self_signed_ip=self_signed_ip).check()
    found = [e for e in log_events if e.get("log_namespace") == "derpbox.tls"]
    if expected is None:
        assert found == []
        return
    [event] = found
    assert event["log_level"].name == expected
    text = formatEvent(event)
    if expected == "error":
        assert "expired at" in text and "clients refuse this relay" in text
    else:
        assert f"expires in {days_before} days" in text
        assert ("update the DERP map's pin" in text) == self_signed_ip
