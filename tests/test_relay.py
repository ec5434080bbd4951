"""The relay core without sockets: routing, duplicates, PeerGone, queues, timers."""

import gc
import sys

import pytest
from nacl.public import PrivateKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from derpbox.admission import Decision
from derpbox.keys import health_key
from derpbox.protocol import frames as F
from derpbox.protocol.frames import FrameReader, FrameType
from derpbox.protocol.handshake import client_info_frame, open_server_info
from derpbox.relay.peer import FRAMES_PER_PASS, HANDSHAKE_CLIENT_INFO_MAX, Peer
from derpbox.relay.relay import Relay

DISCO = F.DISCO_MAGIC + bytes(56)


class MemConn:
    """Records what the peer writes, split into frames."""

    def __init__(self):
        self.reader = FrameReader(F.SERVER_FRAME_BOUNDS)
        self.frames = []
        self.writes = 0
        self.aborted = self.closed = False
        self.reading = True

    def write(self, data):
        self.writes += 1
        self.frames += [(t, bytes(p)) for t, p in self.reader.feed(data)]

    def abort(self):
        self.aborted = True

    def close(self):
        self.closed = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def take(self, ftype=None):
        got = [(t, p) for t, p in self.frames if ftype is None or t == ftype]
        self.frames = [(t, p) for t, p in self.frames if not (ftype is None or t == ftype)]
        return got


@pytest.fixture
def relay():
    return Relay(PrivateKey.generate(), Clock(), write_timeout=2.0)


def connect(relay, key=None, info=None):
    key = key or PrivateKey.generate()
    conn = MemConn()
    peer = Peer(relay, conn, ("192.0.2.1", 4242))
    peer.start()
    peer.feed(client_info_frame(key, relay.public_key, info or {"version": 2, "CanAckPings": True}))
    relay.flush()
    assert [t for t, _ in conn.frames] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO]
    assert open_server_info(key, relay.public_key, conn.frames[1][1]) == {"version": 2}
    conn.frames.clear()
    return peer, conn, key


def pub(key):
    return bytes(key.public_key)


def send(peer, dst, data):
    peer.feed(F.send_packet_frame(dst, data))


def test_relay_packet_with_source_key(relay):
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    send(a, pub(kb), b"hello")
    assert cb.take() == [(FrameType.RECV_PACKET, pub(ka) + b"hello")]
    s = relay.stats
    assert (s.packets_received, s.packets_sent, s.bytes_received, s.bytes_sent) == (1, 1, 5, 5)
    assert s.packets_received_other == 1 and s.current_connections == 2


def test_one_read_one_write_per_destination(relay):
    a, _, _ = connect(relay)
    b, cb, kb = connect(relay)
    cb.writes = 0
    a.feed(b"".join(F.send_packet_frame(pub(kb), bytes([i]) * 100) for i in range(20)))
    assert cb.writes == 1
    assert [p[32:] for _, p in cb.take()] == [bytes([i]) * 100 for i in range(20)]


def test_unknown_dest_counts_and_not_here_only_for_disco(relay):
    a, ca, _ = connect(relay)
    nobody = bytes(32)
    send(a, nobody, b"wireguard data")
    assert ca.take() == []
    assert relay.stats.dropped_packets[("unknown_dest", "other")] == 1
    send(a, nobody, DISCO)
    assert ca.take() == [(FrameType.PEER_GONE, nobody + b"\x01")]
    assert relay.stats.dropped_packets[("unknown_dest", "disco")] == 1
    assert relay.stats.peer_gone_not_here_frames == 1


def test_not_here_rate_limit_burst_3_then_1_per_second(relay):
    a, ca, _ = connect(relay)
    for _ in range(10):
        send(a, bytes(32), DISCO)
    assert len(ca.take(FrameType.PEER_GONE)) == 3
    relay.clock.advance(1.0)
    for _ in range(5):
        send(a, bytes(32), DISCO)
    assert len(ca.take(FrameType.PEER_GONE)) == 1
    assert relay.stats.dropped_packets[("unknown_dest", "disco")] == 15


@pytest.mark.parametrize(
    "packet, kind",
    [
        (DISCO, "disco"),
        (DISCO[:-1], "other"),  # one byte short of magic + key + nonce
        (b"x" + DISCO[1:], "other"),  # wrong magic
    ],
)
def test_disco_classification(relay, packet, kind):
    a, ca, _ = connect(relay)
    send(a, pub(PrivateKey.generate()), packet)
    assert relay.stats.dropped_packets[("unknown_dest", kind)] == 1
    assert (relay.stats.packets_received_disco, relay.stats.packets_received_other) == (
        (1, 0) if kind == "disco" else (0, 1)
    )


def test_peer_gone_disconnected_to_those_who_received(relay):
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    c, cc, kc = connect(relay)
    send(a, pub(kb), b"x")
    cb.take()
    a.connection_lost()
    assert cb.take() == [(FrameType.PEER_GONE, pub(ka) + b"\x00")]
    assert cc.take() == []  # c never heard from a
    assert relay.stats.peer_gone_disconnected_frames == 1
    assert relay.stats.current_connections == 2


def test_duplicate_keys_last_writer_is_active(relay):
    key = PrivateKey.generate()
    old, c_old, _ = connect(relay, key)
    new, c_new, _ = connect(relay, key)
    s, cs, _ = connect(relay)
    assert (relay.stats.current_dup_client_keys, relay.stats.current_dup_client_conns) == (1, 2)
    assert relay.stats.total_dup_client_conns == 1
    send(s, pub(key), b"1")
    assert c_new.take() and not c_old.take()  # newest is active
    old.feed(F.ping_frame(b"12345678"))  # any frame makes it active
    c_old.take()
    send(s, pub(key), b"2")
    assert c_old.take(FrameType.RECV_PACKET) and not c_new.take()
    # The active one leaves; the only other connection never sent: no active one.
    third, c3, _ = connect(relay, key)
    assert relay.stats.current_dup_client_conns == 3
    third.connection_lost()
    send(s, pub(key), b"3")
    assert c_old.take(FrameType.RECV_PACKET)  # old spoke since the set formed: it takes over
    old.connection_lost()
    # Back to one connection: a plain, enabled client again, no PeerGone sent.
    assert (relay.stats.current_dup_client_keys, relay.stats.current_dup_client_conns) == (0, 0)
    send(s, pub(key), b"4")
    assert c_new.take(FrameType.RECV_PACKET)
    assert not cs.take(FrameType.PEER_GONE)
    assert relay.check_consistency() == []


def test_duplicates_with_no_sender_drop_as_dup_client(relay):
    key = PrivateKey.generate()
    p1, c1, _ = connect(relay, key)
    p2, c2, _ = connect(relay, key)
    p3, c3, _ = connect(relay, key)
    s, _, _ = connect(relay)
    p3.connection_lost()  # the active one leaves, nobody in the set has sent
    send(s, pub(key), b"lost")
    assert relay.stats.dropped_packets[("dup_client", "other")] == 1
    assert not c1.take() and not c2.take()
    p1.feed(F.note_preferred_frame(True))
    send(s, pub(key), b"found")
    assert c1.take(FrameType.RECV_PACKET)


def test_queue_overflow_drops_oldest_and_counts(relay):
    a, _, _ = connect(relay)
    b, cb, kb = connect(relay)
    b.pauseProducing()  # b's transport buffer is full
    for i in range(40):
        send(a, pub(kb), i.to_bytes(2, "big") + bytes(10))
    assert relay.stats.dropped_packets[("queue_head", "other")] == 8
    assert relay.stats.dropped_bytes[("queue_head", "other")] == 8 * 12
    for i in range(40):
        send(a, pub(kb), DISCO)
    assert relay.stats.dropped_packets[("queue_head", "disco")] == 8
    b.resumeProducing()
    got = cb.take(FrameType.RECV_PACKET)
    assert len(got) == 64
    assert [int.from_bytes(p[32:34], "big") for _, p in got if not p[32:].startswith(F.DISCO_MAGIC)] == list(range(8, 40))


def test_write_timeout_closes_stuck_client(relay):
    a, _, _ = connect(relay)
    b, cb, kb = connect(relay)
    b.pauseProducing()
    send(a, pub(kb), b"stuck")
    relay.clock.advance(1.9)
    assert not cb.aborted
    relay.clock.advance(0.2)
    assert cb.aborted and relay.stats.sclient_write_timeouts == 1
    assert relay.stats.dropped_packets[("gone_disconnected", "other")] == 1
    assert relay.stats.current_connections == 1


def test_resume_cancels_write_timeout(relay):
    b, cb, _ = connect(relay)
    b.pauseProducing()
    relay.clock.advance(1.5)
    b.resumeProducing()
    relay.clock.advance(5)
    assert not cb.aborted


def test_ping_pong_one_slot(relay):
    a, ca, _ = connect(relay)
    a.feed(F.ping_frame(b"abcdefgh" + b"ignored"))
    assert ca.take() == [(FrameType.PONG, b"abcdefgh")]
    a.pauseProducing()
    a.feed(F.ping_frame(b"11111111") + F.ping_frame(b"22222222"))
    a.resumeProducing()
    assert ca.take() == [(FrameType.PONG, b"11111111")]
    assert (relay.stats.got_ping, relay.stats.sent_pong) == (3, 2)


def test_keepalive_on_the_period_the_connection_picked(relay, monkeypatch):
    monkeypatch.setattr("derpbox.relay.peer.keepalive_ticks", lambda: 63)
    a, ca, _ = connect(relay)
    relay.clock.advance(62.999)
    assert ca.take() == []
    relay.clock.advance(0.002)
    assert ca.take() == [(FrameType.KEEP_ALIVE, b"")]
    relay.clock.advance(62.99)
    assert ca.take() == []
    relay.clock.advance(0.02)
    assert ca.take() == [(FrameType.KEEP_ALIVE, b"")]


def test_keepalives_stop_when_the_connection_closes(relay, monkeypatch):
    monkeypatch.setattr("derpbox.relay.peer.keepalive_ticks", lambda: 61)
    a, ca, _ = connect(relay)
    b, cb, _ = connect(relay)
    a.connection_lost()
    relay.clock.advance(61)
    assert ca.take() == [] and cb.take() == [(FrameType.KEEP_ALIVE, b"")]
    b.connection_lost()
    assert len(relay.keepalives) == 0 and relay.clock.getDelayedCalls() == []


def test_handshake_deadline(relay):
    conn = MemConn()
    peer = Peer(relay, conn, ("192.0.2.9", 1))
    peer.start()
    relay.clock.advance(9.9)
    assert not conn.aborted
    relay.clock.advance(0.2)
    assert conn.aborted and relay.stats.handshake_failures == 1


def test_note_preferred_bookkeeping(relay):
    a, _, _ = connect(relay)
    a.feed(F.note_preferred_frame(True))
    assert relay.stats.current_home_connections == 1 and relay.stats.home_moves_in == 0
    relay.clock.advance(6)
    a.feed(F.note_preferred_frame(False))
    a.feed(F.note_preferred_frame(True))
    assert (relay.stats.home_moves_out, relay.stats.home_moves_in) == (1, 1)
    a.connection_lost()
    assert relay.stats.current_home_connections == 0


def test_mesh_frames_need_mesh_key(relay):
    for frame in (F.WATCH_CONNS_FRAME, F.close_peer_frame(bytes(32)), F.forward_packet_frame(bytes(32), bytes(32), b"")):
        a, ca, _ = connect(relay)
        a.feed(frame)
        assert ca.aborted
    assert relay.stats.protocol_errors == 3


def test_mesh_watch_forward_close_peer():
    mesh_key = bytes(range(32))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh_key)
    a, ca, ka = connect(relay)
    m, cm, _ = connect(relay, info={"meshKey": mesh_key.hex()})
    m.feed(F.WATCH_CONNS_FRAME)
    present = cm.take(FrameType.PEER_PRESENT)
    keys = {F.parse_peer_present(p)[0] for _, p in present}
    assert pub(ka) in keys and len(present) == 2
    b, cb, kb = connect(relay)
    (_, p), = cm.take(FrameType.PEER_PRESENT)
    key, ip16, port, flags = F.parse_peer_present(p)
    assert (key, ip16[-4:], port, flags) == (pub(kb), bytes([192, 0, 2, 1]), 4242, F.PeerPresentFlags.IS_REGULAR)
    m.feed(F.forward_packet_frame(b"S" * 32, pub(kb), b"fwd"))
    assert cb.take() == [(FrameType.RECV_PACKET, b"S" * 32 + b"fwd")]
    m.feed(F.forward_packet_frame(b"S" * 32, bytes(32), DISCO))
    assert cm.take(FrameType.PEER_GONE) == [(FrameType.PEER_GONE, bytes(32) + b"\x01")]
    assert relay.stats.dropped_packets[("unknown_dest_on_fwd", "disco")] == 1
    m.feed(F.close_peer_frame(pub(kb)))
    assert cb.closed
    assert cm.take(FrameType.PEER_GONE) == [(FrameType.PEER_GONE, pub(kb) + b"\x00")]


class PendingAdmission:
    """Admission whose decisions the test hands out by hand."""

    enabled = True

    def __init__(self):
        self.pending = []

    def check(self, key, source_ip):
        d = Deferred()
        self.pending.append((key, source_ip, d))
        return d


def decision(allow):
    return Decision(allow=allow, check="url", reason="test")


def start_pending(relay, extra=b""):
    key = PrivateKey.generate()
    conn = MemConn()
    peer = Peer(relay, conn, ("198.51.100.7", 1234))
    peer.start()
    peer.feed(client_info_frame(key, relay.public_key, {"version": 2}) + extra)
    return peer, conn, key


def test_admission_pending_holds_packets_until_allowed(gated):
    relay = gated
    b, cb, kb = connect_admitted(relay)
    a, ca, ka = start_pending(relay, F.send_packet_frame(pub(kb), b"early") + F.send_packet_frame(pub(kb), b"x"))
    (key, ip, d2) = relay.admission.pending[1]
    assert (key, ip) == (pub(ka), "198.51.100.7")
    assert [t for t, _ in ca.frames] == [FrameType.SERVER_KEY] and not ca.reading
    a.feed(F.send_packet_frame(pub(kb), b"late"))  # TLS may still deliver decrypted bytes
    assert cb.take() == [] and relay.stats.current_connections == 1
    d2.callback(decision(True))
    assert [t for t, _ in ca.frames] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO] and ca.reading
    assert [p[32:] for _, p in cb.take()] == [b"early", b"x", b"late"]


@pytest.fixture
def gated():
    """A relay whose admission decisions the test hands out."""
    return Relay(PrivateKey.generate(), Clock(), write_timeout=2.0, admission=PendingAdmission())


def connect_admitted(relay):
    peer, conn, key = start_pending(relay)
    relay.admission.pending[-1][2].callback(decision(True))
    conn.frames.clear()
    return peer, conn, key


def test_admission_reject_closes_before_server_info(gated):
    relay = gated
    b, cb, kb = connect_admitted(relay)
    a, ca, _ = start_pending(relay, F.send_packet_frame(pub(kb), b"never"))
    relay.admission.pending[-1][2].callback(decision(False))
    assert ca.aborted and [t for t, _ in ca.frames] == [FrameType.SERVER_KEY]
    assert cb.take() == [] and relay.stats.admission_rejections == 1
    assert relay.stats.current_connections == 1 and relay.stats.packets_received == 0


def test_mesh_key_skips_admission():
    mesh = bytes(range(32))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh, admission=PendingAdmission())
    connect(relay, info={"meshKey": mesh.hex()})
    assert relay.admission.pending == []


def test_decision_after_disconnect_is_ignored(gated):
    relay = gated
    a, ca, _ = start_pending(relay)
    a.connection_lost()
    relay.admission.pending[-1][2].callback(decision(True))
    assert [t for t, _ in ca.frames] == [FrameType.SERVER_KEY]
    assert relay.stats.current_connections == 0


def test_handshake_deadline_covers_pending_admission(gated):
    relay = gated
    a, ca, _ = start_pending(relay)
    relay.clock.advance(10.1)
    assert ca.aborted and relay.stats.handshake_failures == 1


def test_health_key_skips_admission_and_grants_nothing_else():
    private = PrivateKey.generate()
    mesh_key = bytes(range(32))
    relay = Relay(private, Clock(), write_timeout=2.0, mesh_key=mesh_key, admission=PendingAdmission())
    watcher, cw, _ = connect(relay, info={"meshKey": mesh_key.hex()})
    watcher.feed(F.WATCH_CONNS_FRAME)
    relay.flush()
    cw.take()
    health, ch, kh = connect(relay, info={"meshKey": health_key(private).hex()})
    assert relay.admission.pending == []
    # Announced to mesh watchers as a regular client, not as a mesh peer.
    (_, payload), = cw.take(FrameType.PEER_PRESENT)
    assert F.parse_peer_present(payload)[0] == pub(kh)
    assert F.parse_peer_present(payload)[3] == F.PeerPresentFlags.IS_REGULAR
    assert not health.is_mesh and relay.write_timeout_for(health) == 2.0
    connect_admitted(relay)  # any other key still goes through admission
    assert len(relay.admission.pending) == 1
    assert health_key(PrivateKey.generate()) != health_key(private)


@pytest.mark.parametrize(
    "frame",
    [F.WATCH_CONNS_FRAME, F.forward_packet_frame(bytes(32), bytes(32), b"x"), F.close_peer_frame(bytes(32))],
    ids=["WatchConns", "ForwardPacket", "ClosePeer"],
)
def test_health_key_may_not_send_mesh_frames(frame):
    private = PrivateKey.generate()
    relay = Relay(private, Clock(), mesh_key=bytes(range(32)))
    health, ch, _ = connect(relay, info={"meshKey": health_key(private).hex()})
    health.feed(frame)
    assert ch.aborted and relay.stats.protocol_errors == 1
    assert relay.stats.current_connections == 0


def test_restart_sends_restarting_then_closes_everyone(relay):
    a, ca, _ = connect(relay)
    b, cb, kb = connect(relay)
    b.pauseProducing()
    send(a, pub(kb), b"queued before the restart")
    b.resumeProducing()
    cb.take()
    assert relay.restart(500, 30000) == 2
    for conn in (ca, cb):
        assert conn.take() == [(FrameType.RESTARTING, (500).to_bytes(4, "big") + (30000).to_bytes(4, "big"))]
        assert conn.closed
    assert relay.stats.current_connections == 0 and list(relay.peers()) == []


def test_watcher_hears_of_a_later_client_at_once():
    mesh_key = bytes(range(32))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh_key)
    m, cm, _ = connect(relay, info={"meshKey": mesh_key.hex()})
    m.feed(F.WATCH_CONNS_FRAME)
    cm.take()
    later = PrivateKey.generate()
    peer = Peer(relay, MemConn(), ("192.0.2.2", 1))
    peer.start()
    # Only the handshake: no explicit flush afterwards, as on a real connection.
    peer.feed(client_info_frame(later, relay.public_key, {}))
    (_, payload), = cm.take(FrameType.PEER_PRESENT)
    assert F.parse_peer_present(payload)[0] == pub(later)


class RecordingForwarder:
    """A mesh link as the relay sees it: records what it is asked to forward."""

    is_worker = False

    def __init__(self, name):
        self.name = name
        self.forwarded = []

    def forward_packet(self, src, dst, packet, disco, sender=None):
        self.forwarded.append((src, dst, bytes(packet), disco))


def test_forward_to_a_key_known_only_through_the_mesh(relay):
    a, ca, ka = connect(relay)
    remote = pub(PrivateKey.generate())
    m1, m2 = RecordingForwarder("m1"), RecordingForwarder("m2")
    relay.add_forwarder(remote, m1)
    relay.add_forwarder(remote, m2)
    assert relay.stats.multiforwarder_created == 1
    send(a, remote, b"via the mesh")
    send(a, remote, DISCO)
    assert m1.forwarded == [(pub(ka), remote, b"via the mesh", False), (pub(ka), remote, DISCO, True)]
    assert m2.forwarded == [] and relay.stats.packets_forwarded_out == 2
    assert relay.client_counts() == (1, 1)
    # The first forwarder goes: the other one takes over.
    relay.remove_forwarder(remote, m1)
    assert relay.stats.multiforwarder_deleted == 1
    send(a, remote, b"second")
    assert m2.forwarded == [(pub(ka), remote, b"second", False)]
    relay.remove_forwarder(remote, m1)
    assert relay.stats.packet_forwarder_delete_other_value == 1
    relay.remove_forwarder(remote, m2)
    send(a, remote, b"nowhere")
    assert relay.stats.dropped_packets[("unknown_dest", "other")] == 1
    assert relay.client_counts() == (1, 0) and relay.check_consistency() == []


def test_a_local_connection_wins_over_a_forwarder(relay):
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    fwd = RecordingForwarder("m")
    relay.add_forwarder(pub(kb), fwd)
    send(a, pub(kb), b"local")
    assert cb.take() == [(FrameType.RECV_PACKET, pub(ka) + b"local")] and fwd.forwarded == []
    send(b, pub(ka), b"reply")
    assert ca.take() == [(FrameType.RECV_PACKET, pub(kb) + b"reply")]
    # b leaves this node but is still in the region: a is not told it is gone.
    b.connection_lost()
    send(a, pub(kb), b"remote now")
    assert fwd.forwarded == [(pub(ka), pub(kb), b"remote now", False)]
    relay.flush()
    assert ca.take(FrameType.PEER_GONE) == []
    relay.remove_forwarder(pub(kb), fwd)
    relay.flush()
    assert ca.take(FrameType.PEER_GONE) == [(FrameType.PEER_GONE, pub(kb) + b"\x00")]
    assert relay.check_consistency() == []


def mesh_peer(relay, mesh_key):
    m, cm, km = connect(relay, info={"meshKey": mesh_key.hex()})
    return m, cm


def test_forwarded_in_sender_leaving_the_region_sends_peer_gone():
    mesh_key = bytes(range(32))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh_key)
    m, cm = mesh_peer(relay, mesh_key)
    c, cc, kc = connect(relay)
    remote = pub(PrivateKey.generate())
    link = RecordingForwarder("peer")
    relay.add_forwarder(remote, link)
    m.feed(F.forward_packet_frame(remote, pub(kc), b"from afar"))
    assert cc.take() == [(FrameType.RECV_PACKET, remote + b"from afar")]
    relay.remove_forwarder(remote, link)
    relay.flush()
    assert cc.take() == [(FrameType.PEER_GONE, remote + b"\x00")]
    assert relay.stats.peer_gone_disconnected_frames == 1


def test_forwarded_in_to_duplicates_without_an_active_one_is_dup_client():
    mesh_key = bytes(range(32))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh_key)
    m, cm = mesh_peer(relay, mesh_key)
    key = PrivateKey.generate()
    first, _, _ = connect(relay, key)
    second, _, _ = connect(relay, key)
    third, _, _ = connect(relay, key)
    third.connection_lost()  # the active one leaves; neither of the others has spoken
    m.feed(F.forward_packet_frame(bytes(32), pub(key), DISCO))
    assert relay.stats.dropped_packets[("dup_client", "disco")] == 1
    assert cm.take(FrameType.PEER_GONE) == []


def test_a_closed_receiver_is_not_kept_by_the_sender_record(relay):
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    send(a, pub(kb), b"hello")
    b.connection_lost()
    gc.collect()
    # Nothing but this test's frame refers to the closed connection.
    assert [r for r in gc.get_referrers(b) if r is not sys._getframe()] == []
    assert relay.check_consistency() == []


class WorkerForwarder(RecordingForwarder):
    is_worker = True

    def __init__(self, name, precedes=False):
        super().__init__(name)
        self.precedes = precedes  # a lower-numbered worker than the relay's own


def test_other_nodes_see_one_node_across_workers():
    mesh_key, worker_key = bytes(range(32)), bytes(range(1, 33))
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=mesh_key, worker_mesh_key=worker_key)
    other_node, c_node, _ = connect(relay, info={"meshKey": mesh_key.hex()})
    other_worker, c_worker, _ = connect(relay, info={"meshKey": worker_key.hex()})
    for watcher in (other_node, other_worker):
        watcher.feed(F.WATCH_CONNS_FRAME)
    relay.flush()
    c_node.take()
    c_worker.take()
    on_worker = pub(PrivateKey.generate())
    fwd = WorkerForwarder("worker1")
    relay.add_forwarder(on_worker, fwd)
    relay.flush()
    # Another node learns the other worker's client from this worker; the other workers do not.
    (_, present), = c_node.take(FrameType.PEER_PRESENT)
    assert F.parse_peer_present(present)[0] == on_worker
    assert c_worker.take(FrameType.PEER_PRESENT) == []
    # Its packets for that client take one internal hop.
    other_node.feed(F.forward_packet_frame(bytes(32), on_worker, b"via this worker"))
    assert fwd.forwarded == [(bytes(32), on_worker, b"via this worker", False)]
    # When it leaves the other worker, it has left this node.
    relay.remove_forwarder(on_worker, fwd)
    relay.flush()
    assert c_node.take(FrameType.PEER_GONE) == [(FrameType.PEER_GONE, on_worker + b"\x00")]
    # A packet from another worker is never passed on (one internal hop at most).
    relay.add_forwarder(on_worker, fwd)
    other_worker.feed(F.forward_packet_frame(bytes(32), on_worker, b"no loop"))
    assert len(fwd.forwarded) == 1
    assert relay.stats.dropped_packets[("unknown_dest_on_fwd", "other")] == 1


def test_a_superseded_key_whose_connection_left_forgets_it_when_the_other_worker_does():
    """The key's newer connection is on another worker; ours closes, then the other worker's
    goes too (at shutdown, both at once): the record goes, and nothing is reinstated."""
    relay = Relay(PrivateKey.generate(), Clock(), worker_mesh_key=bytes(range(1, 33)))
    key = PrivateKey.generate()
    mine, _, _ = connect(relay, key)
    fwd = WorkerForwarder("worker1")
    relay.add_forwarder(pub(key), fwd)
    mine.connection_lost()
    assert relay.check_consistency() == []
    relay.remove_forwarder(pub(key), fwd)
    assert relay.check_consistency() == [] and relay.connections(pub(key)) == []
    # A new connection of the key here is active again.
    again, c_again, _ = connect(relay, key)
    sender, _, _ = connect(relay)
    send(sender, pub(key), b"to the new one")
    assert [p[32:] for _, p in c_again.take(FrameType.RECV_PACKET)] == [b"to the new one"]


def test_a_workers_link_that_comes_up_announces_connections_as_older():
    worker_key = bytes(range(1, 33))
    relay = Relay(PrivateKey.generate(), Clock(), worker_mesh_key=worker_key)
    key = PrivateKey.generate()
    connect(relay, key)
    other_worker, c_worker, _ = connect(relay, info={"meshKey": worker_key.hex()})
    other_worker.feed(F.WATCH_CONNS_FRAME)
    relay.flush()
    flags = {F.parse_peer_present(p)[0]: F.parse_peer_present(p)[3] for _, p in c_worker.take(FrameType.PEER_PRESENT)}
    assert flags[pub(key)] == F.PeerPresentFlags.IS_REGULAR | F.PRESENT_BEFORE_LINK
    # A later connection is announced as new.
    later = PrivateKey.generate()
    connect(relay, later)
    relay.flush()
    (_, payload), = c_worker.take(FrameType.PEER_PRESENT)
    assert F.parse_peer_present(payload)[3] == F.PeerPresentFlags.IS_REGULAR


@pytest.mark.parametrize("precedes", [False, True])
def test_duplicates_from_before_the_workers_link_keep_one_active(precedes):
    """Both workers had the key before their link came up: neither connection is known to be
    newer, so the lower-numbered worker keeps its own and the other steps back, until one
    speaks. Exactly one worker counts the key."""
    relay = Relay(PrivateKey.generate(), Clock(), worker_mesh_key=bytes(range(1, 33)))
    key = PrivateKey.generate()
    mine, c_mine, _ = connect(relay, key)
    sender, _, k_sender = connect(relay)
    other = WorkerForwarder("worker", precedes=precedes)
    relay.add_forwarder(pub(key), other, before_link=True)
    send(sender, pub(key), b"which one?")
    if precedes:
        assert other.forwarded == [(pub(k_sender), pub(key), b"which one?", False)] and c_mine.take() == []
        assert relay.client_counts() == (1, 0)  # the sender; the key is the other worker's to count
    else:
        assert c_mine.take() == [(FrameType.RECV_PACKET, pub(k_sender) + b"which one?")] and other.forwarded == []
        assert relay.client_counts() == (2, 0)
    # A connection the other worker announces later is newer, whatever the order of the workers.
    relay.add_forwarder(pub(key), other)
    send(sender, pub(key), b"newest")
    assert other.forwarded[-1][2] == b"newest" and relay.client_counts() == (1, 0)
    # Ours speaks: it is the last writer again, and counted here.
    send(mine, pub(k_sender), b"me again")
    send(sender, pub(key), b"back to you")
    assert c_mine.take(FrameType.RECV_PACKET)[-1] == (FrameType.RECV_PACKET, pub(k_sender) + b"back to you")
    assert relay.client_counts() == (2, 0) and relay.check_consistency() == []


def test_a_key_on_another_worker_and_another_node_is_not_remote():
    relay = Relay(PrivateKey.generate(), Clock(), mesh_key=bytes(range(32)), worker_mesh_key=bytes(range(1, 33)))
    key = pub(PrivateKey.generate())
    relay.add_forwarder(key, RecordingForwarder("another node"))
    assert relay.client_counts() == (0, 1)
    relay.add_forwarder(key, WorkerForwarder("worker1"))
    assert relay.client_counts() == (0, 0)  # the other worker counts it as the node's own


def test_a_connection_is_logged_when_it_comes_and_goes(relay, log_lines):
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    send(a, pub(kb), b"x" * 100)
    relay.flush()
    relay.clock.advance(2.5)
    a.connection_lost("connection lost: reset by peer")
    b.close()
    [came] = [line for line in log_lines if line.endswith(" connected") and pub(ka).hex()[:8] in line]
    assert came == f"client {pub(ka).hex()[:8]} from 192.0.2.1:4242 connected"
    gone = [line for line in log_lines if "disconnected" in line]
    # ClientInfo and the SendPacket frame in (a's 137 = 5 + 32 + 100 bytes of frame, plus its handshake).
    assert gone[0].startswith(f"client {pub(ka).hex()[:8]} from 192.0.2.1:4242 disconnected after 2.5 s, ")
    assert gone[0].endswith(" out: connection lost: reset by peer")
    assert f", {a.bytes_in} bytes in, {a.bytes_out} out" in gone[0] and a.bytes_in > 137
    assert gone[1].endswith(": closed by the server") and b.bytes_out >= 5 + 32 + 100


def test_the_traffic_summary_says_what_happened_and_stays_quiet_when_idle(relay):
    from derpbox.relay.summary import TrafficSummary

    summary = TrafficSummary(relay.stats, relay.clock)
    assert summary.line() is None  # nothing connected, nothing happened
    a, ca, ka = connect(relay)
    b, cb, kb = connect(relay)
    for _ in range(3):
        send(a, pub(kb), b"hello")
    send(a, pub(PrivateKey.generate()), b"nowhere")
    relay.flush()
    relay.clock.advance(60)
    assert summary.line() == ("last 60 s: 2 connections (0 new), 4 packets received, 3 sent, "
                              "0 forwarded out, 0 in; dropped 1 (unknown_dest 1)")
    relay.clock.advance(60)
    assert summary.line() == ("last 60 s: 2 connections (0 new), 0 packets received, 0 sent, "
                              "0 forwarded out, 0 in; none dropped")
    a.connection_lost()
    b.connection_lost()
    relay.clock.advance(60)
    assert summary.line() is None


def test_a_scrape_does_not_walk_the_clients(relay, monkeypatch):
    """The client counts are kept up to date, so /debug/varz costs the same at any size."""
    from derpbox.metrics import Metrics
    from derpbox.relay.clients import ClientSet

    for _ in range(20):
        connect(relay)
    assert relay.client_counts() == (20, 0)
    walked = []
    monkeypatch.setattr(ClientSet, "counted_as", lambda self: walked.append(self))
    monkeypatch.setattr(Relay, "peers", lambda self: walked.append(self) or iter(()))
    text = Metrics(relay).exposition()
    assert b"derp_clients_local 20" in text and walked == []


def test_a_flood_of_tiny_frames_is_handled_a_pass_at_a_time(relay):
    a, conn_a, _ = connect(relay)
    b, conn_b, key_b = connect(relay)
    count = 3 * FRAMES_PER_PASS + 7
    a.feed(b"".join(F.send_packet_frame(pub(key_b), b"%d" % i) for i in range(count)))
    relay.flush()
    first = conn_b.take(FrameType.RECV_PACKET)
    assert len(first) == FRAMES_PER_PASS and not conn_a.reading
    # The rest in later reactor passes (timed calls, so other connections are served between).
    assert len(relay.clock.getDelayedCalls()) >= 1
    relay.clock.advance(0)
    rest = conn_b.take(FrameType.RECV_PACKET)
    assert [bytes(p[32:]) for _, p in first + rest] == [b"%d" % i for i in range(count)]
    assert conn_a.reading


def test_frames_arriving_while_a_pass_waits_queue_behind(relay):
    a, conn_a, _ = connect(relay)
    b, conn_b, key_b = connect(relay)
    frames = [F.send_packet_frame(pub(key_b), b"%d" % i) for i in range(FRAMES_PER_PASS + 10)]
    a.feed(b"".join(frames[:FRAMES_PER_PASS + 5]))
    a.feed(b"".join(frames[FRAMES_PER_PASS + 5:]))  # decrypted before the pause took effect
    relay.flush()
    assert len(conn_b.take(FrameType.RECV_PACKET)) == FRAMES_PER_PASS
    relay.clock.advance(0)
    assert [bytes(p[32:]) for _, p in conn_b.take(FrameType.RECV_PACKET)] == [
        b"%d" % i for i in range(FRAMES_PER_PASS, FRAMES_PER_PASS + 10)]


def test_client_info_over_the_handshake_budget_is_refused(relay):
    conn = MemConn()
    peer = Peer(relay, conn, ("192.0.2.1", 4242))
    peer.start()
    peer.feed(F.pack_header(FrameType.CLIENT_INFO, HANDSHAKE_CLIENT_INFO_MAX + 1))
    assert conn.aborted
    assert relay.stats.handshake_failures == 1


def test_client_info_trickled_a_byte_at_a_time(relay):
    key = PrivateKey.generate()
    conn = MemConn()
    peer = Peer(relay, conn, ("192.0.2.1", 4242))
    peer.start()
    info = client_info_frame(key, relay.public_key, {"version": 2})
    for i in range(len(info)):
        peer.feed(info[i : i + 1])
    relay.flush()
    assert [t for t, _ in conn.frames] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO]
