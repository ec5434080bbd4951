"""derpbox in one region with Tailscale's own derper: the mesh protocol in both directions.

derper dials derpbox (its -mesh-with lists derpbox) and derpbox dials derper; a
client on each node reaches the other, PeerPresent and PeerGone cross both ways,
and both sides count the same remote clients. Then a region of two derpbox nodes
and one derper, where every pair of clients reaches each other.
"""

from __future__ import annotations

import itertools
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from derpbox.protocol.frames import FrameType

from .derper import Derper, needs_derper
from .meshnet import HOST, MESH_KEY, connect, exchange, knows, meshed
from .support import unused_port, wait_for

pytestmark = [needs_derper, pytest.mark.usefixtures("quick_redial")]


@pytest.fixture
def derper(tmp_path, region, request):
    """``derper(port, mesh_with)``: a running derper in the region's CA and mesh key."""
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text(MESH_KEY + "\n")

    def start(port: int, mesh_with: str) -> Derper:
        d = Derper(tmp_path / f"derper{port}", port, hostname=HOST, crt=region.crt, key=region.key, ca=region.ca,
                   mesh_key_file=mesh_key, mesh_with=mesh_with)
        request.addfinalizer(d.stop)
        return d.start()

    return start


def entry(port: int) -> str:
    return f"{HOST}:{port}/127.0.0.1"


@pytest_twisted.inlineCallbacks
def test_derpbox_and_derper_mesh_both_ways(region, derper):
    pa, pd = unused_port(), unused_port()
    entries = ",".join((entry(pa), entry(pd)))
    a, = yield region(1, ports=[pa], entries=entries.split(","))
    d = yield deferToThread(derper, pd, entries)
    [link] = [p for p in a.service.mesh.peers.values() if p.spec.port == pd]
    yield wait_for(lambda: link.state == "up", timeout=15)
    # derper dialled derpbox too: its link is a watcher here.
    yield wait_for(lambda: a.stats.watchers == 1, timeout=15)
    # derper recognises its own entry the way derpbox does.
    yield wait_for(lambda: "detected self-connect" in d.log_text(), timeout=15)
    ca_ = yield deferToThread(connect, a)
    cd = yield deferToThread(connect, d)
    yield wait_for(lambda: knows(a, cd.public_key), timeout=10)
    # derper learned derpbox's client through its own mesh client.
    yield wait_for(lambda: d.varz().get("derp_clients_remote") == 2, timeout=10)

    got_d, got_a = yield deferToThread(exchange, ca_, cd, b"derpbox to derper", b"derper to derpbox")
    assert got_d == (ca_.public_key, b"derpbox to derper")
    assert got_a == (cd.public_key, b"derper to derpbox")
    assert a.stats.packets_forwarded_out == 1 and a.stats.packets_forwarded_in == 1
    dv = d.varz()
    assert dv["derp_packets_forwarded_out"] == 1 and dv["derp_packets_forwarded_in"] == 1
    # Both sides count alike: one client of its own plus the other node's mesh link locally,
    # the other node's client and its own key (announced back) remotely.
    av = a.service.metrics.vars()
    assert (av["derp_clients_local"], av["derp_clients_remote"]) == (dv["derp_clients_local"], dv["derp_clients_remote"]) == (2, 2)
    # PeerGone crosses derper -> derpbox ...
    yield deferToThread(cd.close)
    gone = yield deferToThread(ca_.recv_until, FrameType.PEER_GONE)
    assert gone.payload == cd.public_key + b"\x00"
    yield wait_for(lambda: not knows(a, cd.public_key))
    # ... and derpbox -> derper.
    cd2 = yield deferToThread(connect, d)
    yield wait_for(lambda: knows(a, cd2.public_key), timeout=10)
    yield deferToThread(cd2.send_packet, ca_.public_key, b"hello again")
    yield deferToThread(ca_.recv_packet)
    yield deferToThread(ca_.send_packet, cd2.public_key, b"reply")
    yield deferToThread(cd2.recv_packet)
    yield deferToThread(ca_.close)
    gone = yield deferToThread(cd2.recv_until, FrameType.PEER_GONE)
    assert gone.payload == ca_.public_key + b"\x00"
    assert a.service.consistency_problems() == []
    yield deferToThread(cd2.close)


@pytest_twisted.inlineCallbacks
def test_three_node_region_of_two_derpbox_and_one_derper(region, derper):
    pa, pb, pd = unused_port(), unused_port(), unused_port()
    entries = [entry(pa), entry(pb), entry(pd)]
    a, b = yield region(2, ports=[pa, pb], entries=entries)
    d = yield deferToThread(derper, pd, ",".join(entries))
    yield wait_for(lambda: meshed([a, b]), timeout=15)
    yield wait_for(lambda: a.stats.watchers == 2 and b.stats.watchers == 2, timeout=15)
    clients = {}
    for name, node in (("a", a), ("b", b), ("d", d)):
        clients[name] = yield deferToThread(connect, node)
    everyone = [c.public_key for c in clients.values()]
    yield wait_for(lambda: all(knows(n, k) for n in (a, b) for k in everyone), timeout=10)
    yield wait_for(lambda: d.varz().get("derp_clients_total", 0) >= 3 + 2, timeout=10)

    def every_pair():
        got = []
        for src, dst in itertools.permutations(clients, 2):
            message = f"{src} to {dst}".encode()
            clients[src].send_packet(clients[dst].public_key, message)
            got.append((clients[dst].recv_packet(), (clients[src].public_key, message)))
        return got

    got = yield deferToThread(every_pair)
    assert len(got) == 6 and all(received == expected for received, expected in got)
    for c in clients.values():
        yield deferToThread(c.close)
    assert a.service.consistency_problems() == [] and b.service.consistency_problems() == []


def test_a_derper_client_reaches_clients_on_both_workers_of_a_derpbox_node(region, derper, node, tmp_path):
    """A node of 2 workers meshed internally and with an external derper at the same time."""
    pa, pd = unused_port(), unused_port()
    entries = ",".join((entry(pa), entry(pd)))
    certs = tmp_path / "workers-certs"
    certs.mkdir()
    (certs / f"{HOST}.crt").write_bytes(region.crt.read_bytes())
    (certs / f"{HOST}.key").write_bytes(region.key.read_bytes())
    n = node(2, "-hostname", HOST, "-certmode", "manual", "-certdir", str(certs), "-mesh-with", entries,
             "-mesh-key", MESH_KEY, "-mesh-ca-file", str(region.ca), port=pa,
             tls={"server_name": HOST, "cafile": str(region.ca)})
    d = derper(pd, entries)
    n.wait_for_log(r"mesh\(derp.test:\d+/127.0.0.1\): connected to", count=2)  # each worker's link to derper
    on_workers = [n.connect_on(0), n.connect_on(1)]
    cd = connect(d)
    for i, c in enumerate(on_workers):
        # Until derper has learned the client (PeerPresent travels while we start), its packets
        # are dropped: send again until one arrives.
        deadline = time.monotonic() + 15
        while True:
            cd.send_packet(c.public_key, b"from derper to worker %d" % i)
            try:
                got = c.recv_packet(timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, f"derper never reached the client on worker {i}"
        assert got == (cd.public_key, b"from derper to worker %d" % i)
        c.send_packet(cd.public_key, b"from worker %d to derper" % i)
        assert cd.recv_packet() == (c.public_key, b"from worker %d to derper" % i)
    for c in (*on_workers, cd):
        c.close()
