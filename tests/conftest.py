"""Shared fixtures: a real derpbox service on loopback, driven by pytest-twisted.

Tests run in the reactor (``@pytest_twisted.inlineCallbacks``); blocking clients
run in threads with ``deferToThread`` so the server keeps serving meanwhile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from derpbox.config import load_settings
from derpbox.service import DerpboxService

from .certs import make_cert  # noqa: F401  (tests import it from here)
from .meshnet import quick_redial, region  # noqa: F401  (fixtures: meshed derpbox nodes)
from .pebble import pebble, pebble_eab  # noqa: F401  (session fixtures: real ACME CAs on loopback)
from .workernode import node  # noqa: F401  (fixture: derpbox -workers N as a process)


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
def headscale(request):
    """Start fake Headscale /verify servers (tests/fakes) that stop with the test."""
    from .fakes.headscale import FakeHeadscale

    def make(nodes=()):
        fake = FakeHeadscale(nodes).start()
        request.addfinalizer(lambda: pytest_twisted.blockon(fake.stop()))
        return fake

    return make


@pytest.fixture
def start_server(tmp_path, request):
    """Start derpbox with derper-style flags; loopback and ephemeral ports by default."""

    def start(*flags: str, environ: dict | None = None, tls: bool = True, home: str = "", dns_resolver=None):
        """``home`` names a directory of its own (key, certificates) for a second node in one test;
        ``dns_resolver`` resolves the bootstrap DNS names (a loopback DNS server's)."""
        base_dir = tmp_path / home if home else tmp_path
        base = ["-a", "127.0.0.1:0", "-c", str(base_dir / "derper.key"), "-stun-port", "0", "-http-port", "0"]
        if tls:
            base += ["-certmode", "manual", "-certdir", str(base_dir / "certs"), "-hostname", "127.0.0.1"]
        else:
            base += ["-tls", "off"]
        settings = load_settings(base + list(flags), environ or {})
        service = DerpboxService(settings, reactor, environ or {}, dns_resolver=dns_resolver)
        service.startService()
        request.addfinalizer(lambda: pytest_twisted.blockon(service.stopService()) if service.running else None)
        return service.listening().addCallback(lambda s: Server(s, base_dir))

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
