"""Shared fixtures: a real derpbox service on loopback, driven by pytest-twisted.

Tests run in the reactor (``@pytest_twisted.inlineCallbacks``); blocking clients
run in threads with ``deferToThread`` so the server keeps serving meanwhile.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from derpbox.config import load_settings

from .pebble import pebble, pebble_eab  # noqa: F401  (session fixtures: real ACME CAs on loopback)


@dataclass
class Server:
    service: object
    tmp: Path

    @property
    def relay(self):
        return self.service.relay

    @property
    def stats(self):
        return self.service.relay.stats

    @property
    def port(self) -> int:
        return self.service.derp_port

    @property
    def url(self) -> str:
        scheme = "https" if self.service.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/derp"


@pytest.fixture
def log_events():
    """Every log event emitted while the test runs (dicts, as twisted.logger makes them)."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def log_lines():
    """Formatted log messages emitted while the test runs (a live list)."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def start_server(tmp_path, request):
    """Start derpbox with derper-style flags; loopback and ephemeral ports by default."""

    def start(*flags: str, environ: dict | None = None, tls: bool = True):
        from derpbox.service import DerpboxService

        base = ["-a", "127.0.0.1:0", "-c", str(tmp_path / "derper.key"), "-stun-port", "0", "-http-port", "0"]
        if tls:
            base += ["-certmode", "manual", "-certdir", str(tmp_path / "certs"), "-hostname", "127.0.0.1"]
        else:
            base += ["-tls", "off"]
        settings = load_settings(base + list(flags), environ or {})
        service = DerpboxService(settings, reactor, environ or {})
        service.startService()
        request.addfinalizer(lambda: pytest_twisted.blockon(service.stopService()))
        return service.listening().addCallback(lambda s: Server(s, tmp_path))

    return start


@pytest.fixture
def serve_map(request):
    """Serve a DERP map over HTTP on loopback; returns its URL."""

    class MapResource(Resource):
        isLeaf = True

        def __init__(self, body: bytes):
            super().__init__()
            self.body = body

        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            return self.body

    def serve(the_map: dict) -> str:
        root = Resource()
        root.putChild(b"map.json", MapResource(json.dumps(the_map).encode()))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        request.addfinalizer(lambda: pytest_twisted.blockon(port.stopListening()))
        return f"http://127.0.0.1:{port.getHost().port}/map.json"

    return serve


def make_cert(directory: Path, name: str, *, days: int = 30) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for ``name`` (DNS name or IP): (ca, crt, key) paths.

    The leaf is written as ``<name>.crt``/``<name>.key`` (leaf + CA chain), the layout
    of derper's manual cert mode.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpbox test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    safe = "".join(c for c in name if c.isalnum() or c in ".-")
    crt = directory / f"{safe}.crt"
    crt.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path = directory / f"{safe}.key"
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, crt, key_path
