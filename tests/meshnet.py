"""Meshed derpbox nodes for the mesh tests: a region fixture and helpers.

Nodes share a test CA and the name derp.test (dialled at 127.0.0.1, the dialhost
form of -mesh-with); clients verify against the same CA.
"""

from __future__ import annotations

import shutil

import pytest
from twisted.internet.defer import gatherResults

from derpbox.client import DERPClient
from derpbox.mesh import peers as mesh_peers

from .certs import make_cert
from .support import unused_port

MESH_KEY = "ab" * 32
HOST = "derp.test"


@pytest.fixture
def quick_redial(monkeypatch):
    """Redial after a fraction of a second instead of derper's 5 s, so tests stay short."""
    monkeypatch.setattr(mesh_peers, "RETRY_INTERVAL", 0.2)
    monkeypatch.setattr(mesh_peers, "RETRY_JITTER", 0.1)


@pytest.fixture
def region(tmp_path, start_server):
    """Start derpbox nodes meshed with each other: ``region(n)`` -> list of Servers."""
    ca, crt, key = make_cert(tmp_path / "ca", HOST)
    started = []
    # Each node's start_server arguments by its home directory, for restart().
    args_of: dict = {}

    def start(n, *flags, mesh_key=MESH_KEY, ports=None, with_ca=True, entries=None):
        ports = ports or [unused_port() for _ in range(n)]
        if entries is None:
            entries = [f"{HOST}:{p}/127.0.0.1" for p in ports]
        servers = []
        for port in ports:
            i = len(started)
            started.append(port)
            certs = tmp_path / f"node{i}" / "certs"
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copy(crt, certs / f"{HOST}.crt")
            shutil.copy(key, certs / f"{HOST}.key")
            mesh = ["-mesh-key", mesh_key] + (["-mesh-with", ",".join(entries)] if entries else [])
            if with_ca:
                mesh += ["-mesh-ca-file", str(ca)]
            args = ("-a", f"127.0.0.1:{port}", "-hostname", HOST, *mesh, *flags)
            args_of[f"node{i}"] = args
            servers.append(start_server(*args, home=f"node{i}"))
        return gatherResults(servers, consumeErrors=True)

    def restart(server):
        """The same node again (key, certificate, port, flags) after it was stopped."""
        home = server.tmp.name
        return start_server(*args_of[home], home=home)

    start.restart = restart

    start.ca = ca
    start.crt = crt
    start.key = key
    return start


def peer_of(server, other):
    """The MeshPeer on ``server`` that dials ``other``."""
    [peer] = [p for p in server.service.mesh.peers.values() if p.spec.port == other.port]
    return peer


def connect(server, key=None):
    """A client of a region node (derpbox, or derper with ``url`` and ``ca``)."""
    ca = getattr(server, "ca", None) or server.tmp.parent / "ca" / "ca.pem"
    return DERPClient.connect(server.url, key, server_name=HOST, cafile=str(ca))


def meshed(servers):
    """Every node's link to every other node is up."""
    return all(
        peer_of(a, b).state == mesh_peers.UP for a in servers for b in servers if a is not b
    )


def knows(server, key: bytes) -> bool:
    return bool(server.relay.forwarders(key)) or bool(server.relay.connections(key))


def exchange(one, other, there: bytes, back: bytes):
    """``one`` sends ``there`` to ``other``, which answers ``back``: what each received."""
    one.send_packet(other.public_key, there)
    got_other = other.recv_packet()
    other.send_packet(one.public_key, back)
    got_one = one.recv_packet()
    return got_other, got_one
