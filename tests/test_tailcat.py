"""The real Tailscale client relays through derpbox (spec 8; testing-infra 7)."""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from .tailcat import Tailcat, derp_map, needs_tailcat, ping, transfer

pytestmark = needs_tailcat


@pytest.fixture
def serve_map(request):
    """Serve a DERP map over HTTP on loopback; returns its URL."""

    def serve(the_map: dict) -> str:
        root = Resource()
        root.putChild(b"map.json", Data(json.dumps(the_map).encode(), "application/json"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        request.addfinalizer(lambda: pytest_twisted.blockon(port.stopListening()))
        return f"http://127.0.0.1:{port.getHost().port}/map.json"

    return serve


@pytest_twisted.inlineCallbacks
def test_tailcat_relays_10mb_over_tls_with_fast_start_and_stun(start_server, serve_map, tmp_path):
    server = yield start_server()
    url = serve_map(derp_map(server.port, server.service.stun_port))
    tc = Tailcat(tmp_path / "tc", url)
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(10 * 1024 * 1024 + 12345))
    out = tmp_path / "out.bin"
    yield deferToThread(transfer, tc, payload, out)
    assert out.read_bytes() == payload.read_bytes()
    stats = server.stats
    assert stats.bytes_sent >= 10 * 1024 * 1024
    # Go clients took the fast-start path (meta-certificate on TLS 1.3) ...
    assert stats.fast_start_upgrades >= 2
    assert stats.fast_start_upgrades == stats.accepts
    # ... and their netcheck got STUN answers from derpbox.
    assert server.service.stun_stats.requests["success"] > 0
    out_ping = yield deferToThread(ping, tc)
    assert "via DERP(dbx)" in out_ping, out_ping
