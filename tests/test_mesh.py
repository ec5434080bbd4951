"""The DERP mesh between derpbox nodes on loopback: real TLS, real mesh links, real clients.

Nodes share a test CA and the name derp.test (tests/meshnet.py), or pin each
other's self-signed IP certificates.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from types import SimpleNamespace

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from derpbox.checks.healthcheck import healthcheck
from derpbox.checks.results import OK, WARN
from derpbox.client import DERPClient
from derpbox.mesh.link import MeshLink
from derpbox.mesh import peers as mesh_peers
from derpbox.protocol import frames as F
from derpbox.protocol.frames import FrameType
from derpbox.relay.peer import Peer
from derpbox.relay.receive_limit import RateConfig
from derpbox.relay.relay import Relay
from derpbox.relay.stats import RelayStats

from .meshnet import HOST, MESH_KEY, connect, exchange, knows, meshed, peer_of
from .support import unused_port, wait_for
from .test_relay import connect as relay_connect
from .test_relay import pub
from .tailcat import Tailcat, derp_map, needs_tailcat

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

    got_b, got_a = yield deferToThread(exchange, ca_, cb, b"a to b across the mesh", b"b to a across the mesh")
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
    # b's link watches a: the PeerPresent batches written to it are in derper's histograms.
    batches = varz["derp_mesh_update_batch_size"]
    assert batches["count"] >= 2 and batches["sum"] >= 2 and batches["bucket,le=+Inf"] == batches["count"]
    assert varz["derp_mesh_update_loop_count"]["count"] == batches["count"]
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


def region_map(*servers) -> dict:
    """One DERP region with the nodes of ``servers`` (anything with .port and .service.stun_port)."""
    nodes = []
    for server, suffix in zip(servers, "abc"):
        node = derp_map(server.port, server.service.stun_port, host=HOST)["Regions"]["900"]["Nodes"][0]
        node["Name"] = f"900{suffix}"
        nodes.append(node)
    return {"Regions": {"900": {"RegionID": 900, "RegionCode": "dbx", "RegionName": "derpbox", "Nodes": nodes}}}


def ping_until_via_derp(tc: Tailcat, addr: str, deadline_s: float) -> tuple[str, float]:
    """Ping ``addr`` until a pong comes via DERP; (output, seconds it took)."""
    start = time.monotonic()
    out = ""
    while time.monotonic() - start < deadline_s:
        result = tc.run_client("ping", "--timeout=5s", addr, timeout=30)
        out = result.stdout.decode() + result.stderr.decode()
        if "via DERP(dbx)" in out:
            return out, time.monotonic() - start
    raise AssertionError(f"no pong via DERP within {deadline_s} s: {out[-2000:]}")


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_real_clients_on_two_nodes_relay_through_the_mesh_and_outlive_a_node(region, serve_map, tmp_path):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    # Each client homes on a different node. This tailcat does not always take a region's
    # first node, so each map lists only the client's own node.
    on_a = Tailcat(tmp_path / "tc-a", serve_map(region_map(a)))
    on_b = Tailcat(tmp_path / "tc-b", serve_map(region_map(b)))
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(5 * 1024 * 1024 + 999))
    out = tmp_path / "out.bin"

    def send_across():
        with open(out, "wb") as sink:
            server, addr = on_a.start_server(stdout=sink)
            try:
                with open(payload, "rb") as src:
                    result = on_b.run_client(addr, stdin=src, timeout=120)
                assert result.returncode == 0, result.stderr.decode()[-2000:]
                server.wait(timeout=60)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()

    yield deferToThread(send_across)
    assert out.read_bytes() == payload.read_bytes()
    assert a.stats.packets_forwarded_in > 1000 and b.stats.packets_forwarded_out > 1000
    assert a.stats.packets_forwarded_out > 0 and b.stats.packets_forwarded_in > 0
    pong = yield deferToThread(ping_once, on_a, on_b)
    assert "via DERP(dbx)" in pong, pong

    # A node goes away. This tailcat picks one node of the region when it starts and
    # redials only that one, so a running client waits for its node to come back;
    # a client started meanwhile, with both nodes in its map, takes the surviving one.
    server, addr = yield deferToThread(on_a.start_server, "serve", "9")
    try:
        yield deferToThread(ping_until_via_derp, on_b, addr, 60)
        a_port = a.port
        yield a.service.stopService()
        dead_first = Tailcat(tmp_path / "tc-dead-first", serve_map(region_map(a_stopped(a_port, a), b)))
        fresh, fresh_addr = yield deferToThread(on_b.start_server, "serve", "9")
        try:
            _, took = yield deferToThread(ping_until_via_derp, dead_first, fresh_addr, 60)
            print(f"a client started after node a stopped reached node b in {took:.1f} s")
        finally:
            fresh.terminate()
            fresh.wait(timeout=10)
        a2 = yield region.restart(a)
        yield wait_for(lambda: meshed([a2, b]), timeout=30)
        _, took = yield deferToThread(ping_until_via_derp, on_b, addr, 90)
        print(f"pings to the client of the restarted node resumed {took:.1f} s after it came back")
    finally:
        server.terminate()
        server.wait(timeout=10)


def a_stopped(port, server):
    """The map entry of a node that is no longer running (its port, its STUN off)."""
    return SimpleNamespace(port=port, service=SimpleNamespace(stun_port=None))


def ping_once(server_side: Tailcat, client_side: Tailcat) -> str:
    server, addr = server_side.start_server("serve", "9")
    try:
        result = client_side.run_client("ping", "--timeout=10s", addr, timeout=40)
        return result.stdout.decode() + result.stderr.decode()
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest_twisted.inlineCallbacks
def test_healthcheck_reports_each_mesh_peer(region):
    a, b = yield region(2)
    yield wait_for(lambda: meshed([a, b]))
    cb = yield deferToThread(connect, b)
    yield wait_for(lambda: knows(a, cb.public_key))
    results = yield deferToThread(healthcheck, a.service.settings, 2.0)
    lines = {r.name: r for r in results}
    to_b = lines[f"mesh {HOST}:{b.port}/127.0.0.1"]
    assert to_b.status == OK and "2 keys learned" in to_b.detail
    assert lines[f"mesh {HOST}:{a.port}/127.0.0.1"].detail == "this node (self-connect), not dialled"
    b_port, link = b.port, peer_of(a, b)
    yield deferToThread(cb.close)
    yield b.service.stopService()
    yield wait_for(lambda: link.stats.failures[link.name] >= 2)
    results = yield deferToThread(healthcheck, a.service.settings, 2.0)
    to_b = {r.name: r for r in results}[f"mesh {HOST}:{b_port}/127.0.0.1"]
    assert to_b.status == WARN and "Connection refused" in to_b.detail


def relay_with_a_link(**relay_args):
    """A relay reaching the key ``REMOTE`` through a MeshLink over a StringTransport,
    registered as its transport's producer as connectionMade does."""
    clock = relay_args.pop("clock", Clock())
    relay = Relay(PrivateKey.generate(), clock, queue_depth=1000, **relay_args)
    lost = []
    peer = SimpleNamespace(clock=clock, relay=relay, link_failed=lambda link, reason: lost.append(reason),
                           link_lost=lambda link, reason: lost.append(reason))
    link = MeshLink(peer, None)
    link.transport = StringTransport()
    link.transport.registerProducer(link, True)
    link.ready = True
    relay.add_forwarder(REMOTE, SimpleNamespace(is_worker=False, forward_packet=link.forward))
    return relay, link


REMOTE = bytes([9]) * 32


def forwarded(link) -> list[bytes]:
    """The packets of the ForwardPacket frames the link wrote, in order."""
    frames = F.FrameReader(F.CLIENT_FRAME_BOUNDS).feed(link.transport.value())
    link.transport.clear()
    assert {ftype for ftype, _ in frames} <= {FrameType.FORWARD_PACKET}
    return [bytes(payload[2 * F.KEY_LEN:]) for _, payload in frames]


def test_a_full_link_holds_its_senders_until_it_drains():
    """As Go's sender blocks on its mesh write: a client whose packet waits for a link the peer
    does not read is not read on (its socket backs up to it) until the link drains, and
    nothing it sent is dropped or reordered; other clients keep being served."""
    relay, link = relay_with_a_link()
    a, conn_a, _ = relay_connect(relay)
    b, conn_b, key_b = relay_connect(relay)
    c, conn_c, _ = relay_connect(relay)
    packets = [bytes([i]) * 100 for i in range(6)]
    a.feed(F.send_packet_frame(REMOTE, packets[0]))
    relay.flush()
    assert forwarded(link) == packets[:1] and conn_a.reading
    link.pauseProducing()
    # One read: two packets for the mesh, then one for a local client. The first waits for
    # the link and holds the sender; the rest of the read waits with it.
    a.feed(b"".join([F.send_packet_frame(REMOTE, packets[1]), F.send_packet_frame(REMOTE, packets[2]),
                     F.send_packet_frame(pub(key_b), b"local")]))
    relay.flush()
    assert not conn_a.reading and relay.stats.mesh_forward_holds == 1
    assert relay.stats.packets_forwarded_out == 2 and conn_b.take() == []
    # What a TLS layer decrypted before the pause took effect waits too.
    a.feed(F.send_packet_frame(REMOTE, packets[3]))
    relay.clock.advance(1)
    assert relay.stats.packets_forwarded_out == 2
    # Another client is served meanwhile; its packet for the mesh waits, and holds it too.
    c.feed(F.send_packet_frame(pub(key_b), b"from c") + F.send_packet_frame(REMOTE, packets[4]))
    relay.flush()
    assert [p[F.KEY_LEN:] for _, p in conn_b.take()] == [b"from c"]
    assert not conn_c.reading and relay.stats.mesh_forward_holds == 2
    assert link.transport.value() == b""
    link.resumeProducing()
    assert forwarded(link) == [packets[1], packets[4], packets[2], packets[3]]
    assert [p[F.KEY_LEN:] for _, p in conn_b.take()] == [b"local"]
    assert conn_a.reading and conn_c.reading and not a.link_held
    assert relay.stats.total_dropped() == 0
    a.feed(F.send_packet_frame(REMOTE, packets[5]))
    relay.flush()
    assert forwarded(link) == packets[5:] and conn_a.reading


def test_a_lost_link_releases_its_senders():
    relay, link = relay_with_a_link()
    a, conn_a, _ = relay_connect(relay)
    link.pauseProducing()
    a.feed(F.send_packet_frame(REMOTE, b"x") + F.send_packet_frame(REMOTE, b"y"))
    assert not conn_a.reading
    relay.remove_forwarder(REMOTE, relay.forwarders(REMOTE)[0])
    link.connectionLost(None)
    # Read again; the packet that waited has no route now and is counted, not lost silently.
    assert conn_a.reading and not a.link_held
    assert relay.stats.dropped_packets[("unknown_dest", "other")] == 1


def test_a_held_sender_under_a_rate_limit_is_charged_once_per_frame():
    clock = Clock()
    relay, link = relay_with_a_link(clock=clock)
    relay.set_rate_limits(RateConfig(10_000, 0))
    a, conn_a, _ = relay_connect(relay)
    burst = a.bucket.burst
    link.pauseProducing()
    sizes = [3000, 3000, 3000]
    a.feed(b"".join(F.send_packet_frame(REMOTE, bytes(n)) for n in sizes))
    assert a.link_held and relay.stats.packets_forwarded_out == 1
    link.resumeProducing()
    assert [len(p) for p in forwarded(link)] == sizes
    # Charged when first read (all three fit the burst), not again when the held two were handled.
    assert a.bucket.tokens == pytest.approx(burst - sum(n + F.KEY_LEN for n in sizes))
    assert relay.rate_limits.waited == 0


def test_a_forward_write_stalled_for_5_s_closes_the_link():
    """Twisted pauses the link (the peer does not read): 5 s later it is closed, as Go's mesh client."""
    clock = Clock()
    reasons = []
    peer = SimpleNamespace(clock=clock, link_failed=lambda link, reason: reasons.append(reason),
                           relay=SimpleNamespace(stats=RelayStats(), needs_flush=lambda link: None))
    # A link past its handshake, registered as its transport's producer as connectionMade does.
    link = MeshLink(peer, None)
    transport = StringTransport()
    link.transport = transport
    transport.registerProducer(link, True)
    link.ready = True
    link.pauseProducing()
    link.forward(bytes(32), bytes(32), b"x" * 100, False)
    clock.advance(4.9)
    assert not transport.disconnecting and reasons == []
    clock.advance(0.2)
    assert reasons == ["ForwardPacket writes stalled for 5 s"] and transport.disconnecting
    # Resumed in time, the timer is gone and what waited is written.
    link2 = MeshLink(peer, None)
    link2.transport = StringTransport()
    link2.transport.registerProducer(link2, True)
    link2.ready = True
    link2.pauseProducing()
    link2.forward(bytes(32), bytes(32), b"y" * 10, False)
    clock.advance(3)
    link2.resumeProducing()
    clock.advance(10)
    assert len(reasons) == 1 and link2.transport.value().endswith(b"y" * 10)
