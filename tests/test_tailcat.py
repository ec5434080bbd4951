"""The real Tailscale client relays through derpbox (spec 8; testing-infra 7)."""

from __future__ import annotations

import hashlib
import os

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.threads import deferToThread

from .tailcat import Tailcat, derp_map, needs_tailcat, ping, transfer

pytestmark = needs_tailcat


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


@pytest_twisted.inlineCallbacks
def test_tailcat_verifies_pinned_ip_certificate(start_server, serve_map, tmp_path, log_events):
    """IP-only host: the node derpbox logs, pasted as is, works without InsecureForTests."""
    server = yield start_server()
    (node,) = [e["derp_map_node"] for e in log_events if "derp_map_node" in e]
    leaf = x509.load_pem_x509_certificate((tmp_path / "certs" / "127.0.0.1.crt").read_bytes())
    assert node["CertName"] == "sha256-raw:" + hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    assert "InsecureForTests" not in node
    node.update(Name="900a", DERPPort=server.port, STUNPort=server.service.stun_port)
    the_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "dbx", "RegionName": "derpbox", "Nodes": [node]}}}
    tc = Tailcat(tmp_path / "tc", serve_map(the_map))
    out = yield deferToThread(ping, tc)
    assert "via DERP(dbx)" in out, out
    assert server.stats.accepts >= 2


@pytest_twisted.inlineCallbacks
def test_tailcat_rejects_wrong_pin(start_server, serve_map, tmp_path):
    server = yield start_server()
    node = derp_map(server.port, server.service.stun_port)["Regions"]["900"]["Nodes"][0]
    del node["InsecureForTests"]
    node["CertName"] = "sha256-raw:" + "00" * 32
    the_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "dbx", "RegionName": "derpbox", "Nodes": [node]}}}
    tc = Tailcat(tmp_path / "tc", serve_map(the_map))
    out = yield deferToThread(ping, tc, 8)
    assert "via DERP" not in out
    # The client refused the certificate, so no DERP upgrade ever reached derpbox.
    assert server.stats.accepts == 0
