"""Manual-mode certificate hot reload: the files are watched, SIGHUP reloads.

Real TLS over loopback against an in-process derpbox; certificates are
replaced on disk and new handshakes are inspected with the package client.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient

from .conftest import make_cert
from .support import SteadyPair, wait_for

HOST = "derp.test"
REFUSED = "TLS certificate reload refused"


class Issued:
    """One make_cert result: its CA file and the leaf's crt/key, in a directory of its own."""

    _n = 0

    def __init__(self, tmp: Path, name: str, **kw):
        Issued._n += 1
        self.dir = tmp / f"issued{Issued._n}"
        self.ca, self.crt, self.key = make_cert(self.dir, name, **kw)
        self.leaf = x509.load_pem_x509_certificates(self.crt.read_bytes())[0]

    @property
    def serial(self) -> int:
        return self.leaf.serial_number


def install(certdir: Path, name: str, crt_bytes: bytes, key_bytes: bytes) -> None:
    """Replace ``<name>.crt``/``.key`` atomically (write elsewhere, rename over)."""
    for suffix, data in ((".crt", crt_bytes), (".key", key_bytes)):
        tmp = certdir / f".{name}{suffix}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, certdir / f"{name}{suffix}")


def install_issued(certdir: Path, name: str, issued: Issued) -> None:
    install(certdir, name, issued.crt.read_bytes(), issued.key.read_bytes())


def leaf_serial(url: str, cafile, server_name: str | None = HOST) -> int:
    """Handshake anew (verifying against *cafile*) and return the served leaf's serial."""
    client = DERPClient.connect(url, server_name=server_name, cafile=str(cafile) if cafile else None, timeout=5)
    try:
        return client.connected.peer_chain[0].to_cryptography().serial_number
    finally:
        client.close()


def leaf_sha256(url: str) -> str:
    client = DERPClient.connect(url, timeout=5)
    try:
        return client.connected.peer_chain[0].to_cryptography().fingerprint(hashes.SHA256()).hex()
    finally:
        client.close()


def refusals(lines) -> list[str]:
    return [line for line in lines if REFUSED in line]


@pytest.fixture
def dns_server(start_server, tmp_path):
    """derpbox for derp.test with a first certificate (``.first``) in tmp_path/certs."""

    @pytest_twisted.inlineCallbacks
    def start():
        certdir = tmp_path / "certs"
        first = Issued(tmp_path, HOST)
        certdir.mkdir()
        shutil.copy(first.crt, certdir / f"{HOST}.crt")
        shutil.copy(first.key, certdir / f"{HOST}.key")
        server = yield start_server("-hostname", HOST, "-certmode", "manual")
        server.first = first
        server.certdir = certdir
        server.source = server.service.cert_source
        assert server.source.watching
        serial = yield deferToThread(leaf_serial, server.url, first.ca)
        assert serial == first.serial
        return server

    return start


@pytest_twisted.inlineCallbacks
def test_replacing_ip_certificate_while_relaying_loses_nothing(start_server, tmp_path, log_lines):
    # IP hostname: derpbox creates a self-signed certificate; the operator replaces it.
    server = yield start_server()
    source = server.service.cert_source
    before = yield deferToThread(leaf_sha256, server.url)
    assert before == source.current().sha256_hex
    pair = yield deferToThread(SteadyPair, server.url)
    try:
        yield wait_for(lambda: len(pair.received) > 20)
        replacement = Issued(tmp_path, "127.0.0.1")
        # Leaf alone, as a self-signed replacement would be (a chain gets no pin).
        leaf_pem = replacement.leaf.public_bytes(serialization.Encoding.PEM)
        install(tmp_path / "certs", "127.0.0.1", leaf_pem, replacement.key.read_bytes())
        new_sha = replacement.leaf.fingerprint(hashes.SHA256()).hex()
        yield wait_for(lambda: source.reloads == 1, timeout=5)
        after = yield deferToThread(leaf_sha256, server.url)
        assert after == new_sha != before
        # The pinned DERP map node changes with the certificate: derpbox says so.
        assert any("pin changed" in line and f"sha256-raw:{new_sha}" in line for line in log_lines)
        count = len(pair.received)
        yield wait_for(lambda: len(pair.received) > count + 20)
    finally:
        sent, received = yield deferToThread(pair.stop)
    assert received == list(range(len(received)))
    assert len(received) >= sent - 1
    assert source.reload_failures == 0 and not refusals(log_lines)


@pytest_twisted.inlineCallbacks
def test_new_handshakes_get_the_new_certificate(dns_server, tmp_path, log_lines):
    server = yield dns_server()
    # An established connection made with the old certificate stays up.
    old = yield deferToThread(DERPClient.connect, server.url, server_name=HOST, cafile=str(server.first.ca))
    second = Issued(tmp_path, HOST)
    install_issued(server.certdir, HOST, second)
    yield wait_for(lambda: server.source.reloads == 1, timeout=5)
    serial = yield deferToThread(leaf_serial, server.url, second.ca)
    assert serial == second.serial != server.first.serial
    assert any("TLS certificate reloaded" in line and f"serial {second.serial:x}" in line for line in log_lines)

    def still_works():
        peer = DERPClient.connect(server.url, server_name=HOST, cafile=str(second.ca))
        try:
            peer.send_packet(old.public_key, b"after the swap")
            return old.recv_packet(timeout=5)
        finally:
            peer.close()
            old.close()

    src, data = yield deferToThread(still_works)
    assert data == b"after the swap"
    assert server.source.reload_failures == 0 and server.source.last_error is None


def _garbage(tmp_path, certdir):
    return b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", (
        certdir / f"{HOST}.key"
    ).read_bytes(), f"{HOST}.crt", "no valid PEM certificate"


def _mismatch(tmp_path, certdir):
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fresh = Issued(tmp_path, HOST)
    return fresh.crt.read_bytes(), other_key, f"{HOST}.key", "private key does not match"


def _expired(tmp_path, certdir):
    old = Issued(tmp_path, HOST, days=-1)
    return old.crt.read_bytes(), old.key.read_bytes(), f"{HOST}.crt", "certificate expired at"


def _other_host(tmp_path, certdir):
    other = Issued(tmp_path, "other.test")
    return other.crt.read_bytes(), other.key.read_bytes(), f"{HOST}.crt", "is not valid for 'derp.test'"


@pytest.mark.parametrize("broken", [_garbage, _mismatch, _expired, _other_host], ids=lambda f: f.__name__[1:])
@pytest_twisted.inlineCallbacks
def test_broken_replacement_is_refused_and_old_certificate_kept(dns_server, tmp_path, log_lines, broken):
    server = yield dns_server()
    source = server.source
    source.settle_time = 1.0  # the mismatch case waits this long for a missing key
    crt, key, named_file, problem = broken(tmp_path, server.certdir)
    install(server.certdir, HOST, crt, key)
    yield wait_for(lambda: source.reload_failures == 1, timeout=6)
    lines = refusals(log_lines)
    assert len(lines) == 1
    assert str(server.certdir / named_file) in lines[0] and problem in lines[0]
    assert f"serial {server.first.serial:x}" in lines[0]  # the certificate still served
    assert problem in source.last_error and source.reloads == 0
    # Old certificate still served to new handshakes, and the same broken files
    # are not logged again on every poll.
    serial = yield deferToThread(leaf_serial, server.url, server.first.ca)
    assert serial == server.first.serial
    yield deferLater(reactor, 2.5, lambda: None)
    assert len(refusals(log_lines)) == 1 and source.reload_failures == 1
    # Fixed files are taken.
    fixed = Issued(tmp_path, HOST)
    install_issued(server.certdir, HOST, fixed)
    yield wait_for(lambda: source.reloads == 1, timeout=5)
    serial = yield deferToThread(leaf_serial, server.url, fixed.ca)
    assert serial == fixed.serial
    assert source.last_error is None


@pytest_twisted.inlineCallbacks
def test_non_atomic_replacement_is_taken_without_a_refusal(dns_server, tmp_path, log_lines):
    server = yield dns_server()
    source = server.source
    second = Issued(tmp_path, HOST)
    # The certificate first, written in place ...
    (server.certdir / f"{HOST}.crt").write_bytes(second.crt.read_bytes())
    source.poll()  # a poll sees the half-replaced pair (new crt, old key)
    assert source.reloads == 0
    yield deferLater(reactor, 0.5, lambda: None)
    # ... and the key half a second later.
    (server.certdir / f"{HOST}.key").write_bytes(second.key.read_bytes())
    yield wait_for(lambda: source.reloads == 1, timeout=5)
    serial = yield deferToThread(leaf_serial, server.url, second.ca)
    assert serial == second.serial
    assert not refusals(log_lines) and source.reload_failures == 0


@pytest_twisted.inlineCallbacks
def test_sighup_reloads_at_once(dns_server, tmp_path, log_lines):
    server = yield dns_server()
    source = server.source
    source.stop_watching()  # only the signal can pick the change up now
    second = Issued(tmp_path, HOST)
    install_issued(server.certdir, HOST, second)
    yield deferLater(reactor, 1.5, lambda: None)
    assert source.reloads == 0
    serial = yield deferToThread(leaf_serial, server.url, server.first.ca)
    assert serial == server.first.serial
    os.kill(os.getpid(), signal.SIGHUP)
    yield wait_for(lambda: source.reloads == 1, timeout=1)
    serial = yield deferToThread(leaf_serial, server.url, second.ca)
    assert serial == second.serial
    assert any("SIGHUP received" in line for line in log_lines)


@pytest_twisted.inlineCallbacks
def test_sighup_handler_is_shared_and_restored(dns_server, start_server, tmp_path):
    from derpbox.service import SIGHUP_RELOAD

    before = signal.getsignal(signal.SIGHUP)
    server = yield dns_server()
    assert signal.getsignal(signal.SIGHUP) == SIGHUP_RELOAD._on_signal
    assert server.source in SIGHUP_RELOAD.sources
    yield server.service.stopService()
    assert server.source not in SIGHUP_RELOAD.sources and not server.source.watching
    assert signal.getsignal(signal.SIGHUP) == before
