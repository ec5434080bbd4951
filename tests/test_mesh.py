"""The DERP mesh between derpbox nodes on loopback: real TLS, real mesh links, real clients.

Nodes share a test CA and the name derp.test (tests/meshnet.py), or pin each
other's self-signed IP certificates.
"""

from __future__ import annotations

import gc
import os
import signal

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.mesh import peers as mesh_peers
from derpbox.protocol import frames as F
from derpbox.protocol.frames import FrameType
from derpbox.relay.peer import Peer

from .meshnet import HOST, MESH_KEY, connect, knows, meshed, peer_of
from .support import unused_port, wait_for

pytestmark = pytest.mark.usefixtures("quick_redial")

@pytest_twisted.inlineCallbacks
def test_two_nodes_relay_both_ways_and_peer_gone_crosses_the_mesh(region):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    # Listing yourself is normal: that entry is recognised and left alone.
    assert [p.state for p in a.service.mesh.peers.values()].count(mesh_peers.SELF) == 1
    ca_ = yield deferToThread(connect, a)
    cb = yield deferToThread(connect, b)
    yield wait_for(lambda: knows(a, cb.public_key) and knows(b, ca_.public_key))

    def exchange():
        ca_.send_packet(cb.public_key, b"a to b across the mesh")
        got_b = cb.recv_packet()
        cb.send_packet(ca_.public_key, b"b to a across the mesh")
        got_a = ca_.recv_packet()
        return got_a, got_b

    got_a, got_b = yield deferToThread(exchange)
    assert got_b == (ca_.public_key, b"a to b across the mesh")
    assert got_a == (cb.public_key, b"b to a across the mesh")
    assert a.stats.packets_forwarded_out == 1 and b.stats.packets_forwarded_in == 1
    assert b.stats.packets_forwarded_out == 1 and a.stats.packets_forwarded_in == 1
    varz = a.service.metrics.vars()
    # As derper counts: b's mesh link is a local client of a, and a's own key is
    # reachable through b (b announces a's link to it).
    assert (varz["derp_clients_local"], varz["derp_clients_remote"], varz["derp_clients_total"]) == (2, 2, 4)
    assert varz["derpbox_mesh_peer_up"][f"peer={HOST}:{b.port}/127.0.0.1"] == 1
    assert varz["derpbox_mesh_peer_keys"][f"peer={HOST}:{b.port}/127.0.0.1"] == 2
    # b leaves the region: a, which heard from it through the mesh, is told.
    yield deferToThread(cb.close)
    gone = yield deferToThread(ca_.recv_until, FrameType.PEER_GONE)
    assert gone.payload == cb.public_key + b"\x00"
    yield wait_for(lambda: not knows(a, cb.public_key))
    assert a.service.consistency_problems() == [] and b.service.consistency_problems() == []
    yield deferToThread(ca_.close)


@pytest_twisted.inlineCallbacks
def test_a_restarted_peer_is_forgotten_then_relearned(region, start_server, tmp_path):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    cb = yield deferToThread(connect, b)
    yield wait_for(lambda: knows(a, cb.public_key))
    link = peer_of(a, b)
    connects = link.stats.connects[link.name]
    b_port = b.port
    # The client reads and hangs up when told, as a real one does, so b's shutdown is quick.
    def hang_up_when_closed():
        closed = cb.is_closed_by_server(10)
        cb.close()
        return closed

    closed = deferToThread(hang_up_when_closed)
    yield b.service.stopService()
    assert (yield closed)
    # The link broke: everything learned from b is forgotten at once.
    yield wait_for(lambda: not knows(a, cb.public_key) and link.state != mesh_peers.UP)
    # b's own link to a closes too.
    yield wait_for(lambda: a.relay.client_counts() == (0, 0))
    b2 = yield start_server("-a", f"127.0.0.1:{b_port}", "-hostname", HOST, "-mesh-with",
                            f"{HOST}:{a.port}/127.0.0.1", "-mesh-key", MESH_KEY,
                            "-mesh-ca-file", str(tmp_path / "ca" / "ca.pem"), home="node1")
    cb2 = yield deferToThread(connect, b2)
    yield wait_for(lambda: knows(a, cb2.public_key), timeout=10)
    assert link.state == mesh_peers.UP and link.stats.connects[link.name] == connects + 1
    assert link.stats.failures[link.name] >= 1
    yield deferToThread(cb2.close)


@pytest_twisted.inlineCallbacks
def test_not_here_removes_a_stale_forwarder(region):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    ca_ = yield deferToThread(connect, a)
    stale = bytes(PrivateKey.generate().public_key)
    link = peer_of(a, b)
    # As if b's PeerGone for this key had been lost: a believes b has it.
    link.present(stale)
    assert a.relay.forwarders(stale) == [link]
    disco = F.DISCO_MAGIC + bytes(56)
    yield deferToThread(ca_.send_packet, stale, disco)
    yield wait_for(lambda: not a.relay.forwarders(stale))
    assert b.stats.dropped_packets[("unknown_dest_on_fwd", "disco")] == 1
    assert b.stats.peer_gone_not_here_frames == 1
    assert stale not in link.keys and a.service.consistency_problems() == []
    yield deferToThread(ca_.close)


@pytest_twisted.inlineCallbacks
def test_wrong_mesh_key_is_named_and_retried(region, log_lines):
    ports = [unused_port(), unused_port()]
    entries = [f"{HOST}:{p}/127.0.0.1" for p in ports]
    a, = yield region(1, ports=ports[:1], entries=entries)
    b, = yield region(1, ports=ports[1:], entries=entries, mesh_key="cd" * 32)
    link = peer_of(a, b)
    yield wait_for(lambda: link.stats.failures[link.name] >= 2)
    assert link.state != mesh_peers.UP and not a.relay.client_counts()[1]
    assert any("is the mesh key the same on both nodes?" in line for line in log_lines)


@pytest_twisted.inlineCallbacks
def test_an_unverifiable_peer_certificate_is_refused(region, log_lines):
    a, b = yield region(2, with_ca=False)
    link = peer_of(a, b)
    yield wait_for(lambda: link.stats.failures[link.name] >= 1)
    assert link.state != mesh_peers.UP
    assert any("certificate verify failed" in line and link.name in line for line in log_lines)


@pytest_twisted.inlineCallbacks
def test_ip_only_nodes_pin_each_other(start_server, tmp_path):
    pa, pb = unused_port(), unused_port()
    # Each node makes its self-signed IP certificate on first start; the pins come from those.
    first = yield start_server("-a", f"127.0.0.1:{pa}", home="ip0")
    second = yield start_server("-a", f"127.0.0.1:{pb}", home="ip1")
    pins = {s.port: "sha256-raw:" + s.service.cert_source.current().sha256_hex for s in (first, second)}
    yield first.service.stopService()
    yield second.service.stopService()
    names = ",".join(f"127.0.0.1:{p}={pin}" for p, pin in pins.items())
    entries = f"127.0.0.1:{pa},127.0.0.1:{pb}"
    a = yield start_server("-a", f"127.0.0.1:{pa}", "-mesh-with", entries, "-mesh-key", MESH_KEY,
                           "-mesh-cert-names", names, home="ip0")
    b = yield start_server("-a", f"127.0.0.1:{pb}", "-mesh-with", entries, "-mesh-key", MESH_KEY,
                           "-mesh-cert-names", names, home="ip1")
    yield wait_for(lambda: meshed([a, b]))
    cb = yield deferToThread(DERPClient.connect, b.url)
    yield wait_for(lambda: knows(a, cb.public_key))
    yield deferToThread(cb.close)


@pytest_twisted.inlineCallbacks
def test_peers_file_and_sighup_change_membership_without_a_restart(region, start_server, tmp_path, log_lines):
    b, = yield region(1, entries=[])
    peers_file = tmp_path / "peers"
    peers_file.write_text("# mesh peers\n")
    a = yield start_server("-a", f"127.0.0.1:{unused_port()}", "-hostname", HOST, "-mesh-peers-file",
                           str(peers_file), "-mesh-key", MESH_KEY, "-mesh-ca-file", str(region.ca),
                           "-certdir", str(b.tmp / "certs"), home="fileside")
    # b meshes back only once it lists a; a's own view comes from its file alone.
    cb = yield deferToThread(connect, b)
    assert a.service.mesh.peers == {}
    peers_file.write_text(f"{HOST}:{b.port}/127.0.0.1  # node b\n")
    yield wait_for(lambda: knows(a, cb.public_key), timeout=10)
    # Removed and SIGHUP: the peer's keys are forgotten at once.
    peers_file.write_text("")
    os.kill(os.getpid(), signal.SIGHUP)
    yield wait_for(lambda: not knows(a, cb.public_key))
    assert a.service.mesh.peers == {} and a.service.consistency_problems() == []
    # A broken file keeps the peers there are.
    peers_file.write_text(f"{HOST}:{b.port}/127.0.0.1\n")
    yield wait_for(lambda: knows(a, cb.public_key), timeout=10)
    peers_file.write_text("this/is/not an entry at all\n")
    os.kill(os.getpid(), signal.SIGHUP)
    yield wait_for(lambda: any("keeping the current peers" in line for line in log_lines))
    assert knows(a, cb.public_key) and len(a.service.mesh.peers) == 1
    yield deferToThread(cb.close)


def live_peers() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, Peer))


@pytest_twisted.inlineCallbacks
def test_churn_on_one_node_while_the_other_forwards(region):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    sender = yield deferToThread(connect, a)
    receiver = yield deferToThread(connect, b)
    yield wait_for(lambda: knows(a, receiver.public_key))
    gc.collect()
    baseline = live_peers()
    counts = a.relay.client_counts(), b.relay.client_counts()

    def churn(n=1000):
        got = 0
        for i in range(n):
            c = connect(b)
            sender.send_packet(receiver.public_key, i.to_bytes(4, "big"))
            c.close()
        while got < n:
            src, data = receiver.recv_packet()
            got += 1
        return got

    got = yield deferToThread(churn)
    assert got == 1000
    yield wait_for(lambda: (a.relay.client_counts(), b.relay.client_counts()) == counts)
    assert a.service.consistency_problems() == [] and b.service.consistency_problems() == []
    gc.collect()
    assert live_peers() <= baseline
    yield deferToThread(sender.close)
    yield deferToThread(receiver.close)
