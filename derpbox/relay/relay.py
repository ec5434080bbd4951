"""The registry of connected clients and the routing of packets between them.

Spec sections 1.5-1.10: routing by node key, "last writer is active" for duplicate
keys, PeerGone to those a departed key sent to, PeerGone(NotHere) for disco packets
to unknown keys, and the mesh frames (WatchConns, ForwardPacket, ClosePeer).

Peers enqueue output and ask for a flush (``needs_flush``); the peer that read the
input calls ``flush`` once per read, so all frames for one destination produced by
one read go out in a single write.
"""

from __future__ import annotations

from nacl.public import PrivateKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..keys import health_key
from ..logs import LogThrottle
from ..netaddr import ip16
from ..protocol.frames import (
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    KEEP_ALIVE_FRAME,
    KEY_LEN,
    PRESENT_BEFORE_LINK,
    RECV_HEADER,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    peer_gone_frame,
    peer_present_frame,
    restarting_frame,
)
from ..protocol.handshake import ServerHandshake, mesh_key_matches
from .clients import ClientSet
from .keepalive import KeepAliveWheel
from .peer import ACTIVE, Peer
from .receive_limit import RateConfig, RateLimits
from .stats import RelayStats

log = Logger()

_recv_header = RECV_HEADER.pack
_RECV = FrameType.RECV_PACKET
_DISCO_FIRST = DISCO_MAGIC[0]
MESH_WRITE_TIMEOUT = 30.0
# Restarting frame values: reconnect soon, keep trying through a container restart.
RESTART_RECONNECT_MS = 500
RESTART_TRY_FOR_MS = 30_000


def _worker_forwarder(record: ClientSet):
    return next((f for f in record.forwarders if f.is_worker), None)


def _on_another_worker(record: ClientSet) -> bool:
    return _worker_forwarder(record) is not None


class Relay:
    def __init__(
        self,
        private_key: PrivateKey,
        clock: IReactorTime,
        *,
        queue_depth: int = 32,
        write_timeout: float = 2.0,
        mesh_key: bytes | None = None,
        admission=None,
        worker_mesh_key: bytes | None = None,
    ):
        self.handshake = ServerHandshake(private_key)
        self.public_key = self.handshake.public_key
        self.clock = clock
        self.queue_depth = queue_depth
        self.write_timeout = write_timeout
        self.mesh_key = mesh_key
        # The key the workers of this node mesh with (derpbox.workers), trusted like the mesh key.
        self._worker_mesh_key = worker_mesh_key
        # Presented by `derpbox healthcheck` clients: skips admission, grants nothing else.
        self._health_key = health_key(private_key)
        # Client verification (derpbox.admission.Admission), None when not configured.
        self.admission = admission
        self.stats = RelayStats()
        # -rate-config's limits (derpbox.relay.receive_limit), None without the flag.
        self.rate_limits: RateLimits | None = None
        # Per-connection failure lines, folded when a reason repeats (scanners).
        self.noise = LogThrottle(Logger("derpbox.relay.peer"))
        self._dirty: list[Peer] = []
        self._clients: dict[bytes, ClientSet] = {}
        # derp_clients_local/_remote, kept up to date so a scrape costs the same at any size.
        self._counts = {"local": 0, "remote": 0}
        self._watchers: list[Peer] = []
        self._restarting = False
        self.keepalives = KeepAliveWheel(clock, self._keepalives_due)

    def _keepalives_due(self, peers: list[Peer]) -> None:
        for peer in peers:
            peer.send_control(KEEP_ALIVE_FRAME)
        self.flush()

    # -- admission and registration --------------------------------------

    def is_mesh_key(self, offered: bytes | None) -> bool:
        return mesh_key_matches(self.mesh_key, offered) or self.is_worker_key(offered)

    def is_worker_key(self, offered: bytes | None) -> bool:
        """The key another worker of this node presents (derpbox.workers)."""
        return mesh_key_matches(self._worker_mesh_key, offered)

    def admission_check(self, key: bytes, ip: str, offered_key: bytes | None) -> Deferred | None:
        """The pending admission decision for a new client, or None when it is admitted
        without one: no verification configured, or it presented the mesh or health key."""
        admission = self.admission
        if admission is None or not admission.enabled:
            return None
        if self.is_mesh_key(offered_key) or mesh_key_matches(self._health_key, offered_key):
            return None
        return admission.check(key, ip)

    def set_rate_limits(self, config: RateConfig) -> None:
        """Apply -rate-config: every connected client but the mesh peers gets a new, full bucket."""
        if self.rate_limits is None:
            self.rate_limits = RateLimits(config)
        else:
            self.rate_limits.config = config.applied()
        now = self.clock.seconds()
        for peer in self.peers():
            if not peer.is_mesh:
                peer.set_bucket(self.rate_limits.new_bucket(now))

    def write_timeout_for(self, peer: Peer) -> float:
        return MESH_WRITE_TIMEOUT if peer.is_mesh else self.write_timeout

    def register(self, peer: Peer) -> None:
        stats = self.stats
        key = peer.key
        stats.current_connections += 1
        if peer.not_ideal:
            stats.current_notideal_connections += 1
        record = self._clients.get(key)
        if record is None:
            record = self._clients[key] = ClientSet()
        before = record.counted_as()
        record.add(peer)
        self._recount(before, record)
        n = len(record.conns)
        if n > 1:
            stats.total_dup_client_conns += 1
            stats.current_dup_client_conns += 2 if n == 2 else 1
            if n == 2:
                stats.current_dup_client_keys += 1
        self._announce(peer)

    def note_activity(self, peer: Peer) -> None:
        """A duplicate connection that speaks becomes the active one (spec 1.8)."""
        record = self._clients.get(peer.key)
        if record is not None and (record.senders is not None or record.superseded):
            was_superseded = record.superseded
            before = record.counted_as()
            record.note_sender(peer)
            self._recount(before, record)
            if was_superseded:
                # Ours spoke last: the other workers step back for it.
                self._tell_workers(self._presence(peer))

    def unregister(self, peer: Peer) -> None:
        stats = self.stats
        key = peer.key
        stats.current_connections -= 1
        if peer.not_ideal:
            stats.current_notideal_connections -= 1
        if peer.preferred:
            stats.current_home_connections -= 1
        if peer in self._watchers:
            self._watchers.remove(peer)
            stats.watchers -= 1
        peer.drop_queued()
        clients = self._clients
        for src_key in peer.heard_from or ():
            src = clients.get(src_key)
            if src is not None:
                src.receivers.pop(peer, None)
        record = clients[key]
        n = len(record.conns)
        before = record.counted_as()
        record.remove(peer)
        self._recount(before, record)
        if n > 1:
            if n == 2:
                stats.current_dup_client_keys -= 1
                stats.current_dup_client_conns -= 2
            else:
                stats.current_dup_client_conns -= 1
            return
        if not record.forwarders:
            del clients[key]
            self._gone_from_region(key, record)
        if not self._restarting and self._watchers:
            # The other workers hear of every local departure. Another node hears of it unless
            # the key is still on this node, on another worker.
            on_node = _on_another_worker(record)
            frame = peer_gone_frame(key, PeerGoneReason.DISCONNECTED)
            for watcher in self._watchers:
                if watcher.is_worker or not on_node:
                    watcher.send_mesh_update(frame)

    def _gone_from_region(self, key: bytes, record: ClientSet) -> None:
        """``key`` has neither a local connection nor a forwarder: tell those that heard from it."""
        receivers, record.receivers = record.receivers, {}
        for dst in receivers:
            dst.forget_heard_from(key)
            if dst.state == ACTIVE and not self._restarting:
                dst.send_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # -- routing (the hot path) ------------------------------------------

    def send_packet(self, src: Peer, payload: memoryview) -> None:
        stats = self.stats
        dst_key = payload[:KEY_LEN].tobytes()
        size = len(payload) - KEY_LEN
        # The first byte alone rules out a WireGuard packet (type 1-4) before any slice.
        disco = (size >= DISCO_MIN_LEN and payload[KEY_LEN] == _DISCO_FIRST
                 and payload[KEY_LEN : KEY_LEN + 6] == DISCO_MAGIC)
        stats.packets_received += 1
        stats.bytes_received += size
        if disco:
            stats.packets_received_disco += 1
        clients = self._clients
        record = clients.get(dst_key)
        dst = record.active if record is not None else None
        if dst is None:
            self._no_local_route(src, record, dst_key, payload, disco, size)
            return
        if dst.state != ACTIVE:
            stats.drop("gone_disconnected", disco, size)
            return
        src_key = src.key
        receivers = clients[src_key].receivers
        if dst not in receivers:
            receivers[dst] = None
            dst.note_heard_from(src_key)
        dst.enqueue_packet(_recv_header(_RECV, len(payload), src_key) + payload[KEY_LEN:], disco)

    def _no_local_route(self, src: Peer, record: ClientSet | None, dst_key: bytes, payload: memoryview,
                        disco: bool, size: int) -> None:
        """No active local connection for the destination: forward through the mesh, or drop."""
        stats = self.stats
        if record is not None:
            forwarder = _worker_forwarder(record) if record.superseded else None
            if record.conns and forwarder is None:
                # Duplicates of which none has spoken since the active one left.
                stats.drop("dup_client", disco, size)
                return
            stats.packets_forwarded_out += 1
            (forwarder or record.forwarders[0]).forward_packet(src.key, dst_key, payload[KEY_LEN:], disco, src)
            return
        stats.drop("unknown_dest", disco, size)
        if disco and src.not_here_allowed():
            src.send_peer_gone(dst_key, PeerGoneReason.NOT_HERE)

    def needs_flush(self, peer: Peer) -> None:
        """``peer`` has output queued; it is written at the next ``flush``."""
        self._dirty.append(peer)

    def flush(self) -> None:
        dirty = self._dirty
        while dirty:
            dirty.pop().flush_if_writable()

    def restart(self, reconnect_in_ms: int = RESTART_RECONNECT_MS, try_for_ms: int = RESTART_TRY_FOR_MS) -> int:
        """Tell every client the server is restarting (a Restarting frame), then close
        each connection after what is queued for it is written. Returns how many."""
        frame = restarting_frame(reconnect_in_ms, try_for_ms)
        # Everyone is leaving: no PeerGone among those being closed.
        self._restarting = True
        peers = list(self.peers())
        for peer in peers:
            peer.send_control(frame)
        for peer in peers:
            peer.close()
        return len(peers)

    # -- mesh ------------------------------------------------------------

    def mesh_frame(self, peer: Peer, ftype: int, payload: memoryview) -> None:
        """WatchConns or ClosePeer from a mesh peer (ForwardPacket goes to ``forward_in``)."""
        if ftype == FrameType.WATCH_CONNS:
            self._watch(peer)
        elif ftype == FrameType.CLOSE_PEER:
            self._close_peer(payload.tobytes())

    def forward_in(self, mesh_peer: Peer, payload: memoryview) -> None:
        """A ForwardPacket from a mesh peer (the hot path of a node's workers, too)."""
        stats = self.stats
        src_key = payload[:KEY_LEN].tobytes()
        dst_key = payload[KEY_LEN : 2 * KEY_LEN].tobytes()
        packet = payload[2 * KEY_LEN :]
        disco = len(packet) >= DISCO_MIN_LEN and packet[0] == _DISCO_FIRST and packet[:6] == DISCO_MAGIC
        stats.packets_forwarded_in += 1
        clients = self._clients
        record = clients.get(dst_key)
        dst = record.active if record is not None else None
        if dst is None and record is not None and record.superseded and mesh_peer.is_worker:
            # The other worker sent it before it learned ours spoke again: deliver, not bounce.
            dst = record.conns[-1]
        if dst is None or dst.state != ACTIVE:
            if record is not None and len(record.conns) > 1:
                stats.drop("dup_client", disco, len(packet))
                return
            if record is not None and not mesh_peer.is_worker and not record.conns:
                # From another node, for a client on another worker of this one: one more,
                # internal, hop (another worker only ever delivers locally, so no loop).
                worker = _worker_forwarder(record)
                if worker is not None:
                    stats.packets_forwarded_out += 1
                    worker.forward_packet(src_key, dst_key, packet, disco, mesh_peer)
                    return
            stats.drop("unknown_dest_on_fwd", disco, len(packet))
            # NotHere goes to the mesh peer that forwarded it, which drops its stale forwarder.
            if disco and mesh_peer.not_here_allowed():
                mesh_peer.send_peer_gone(dst_key, PeerGoneReason.NOT_HERE)
            return
        # Forwarded packets count too: the receiver hears when the sender leaves the region.
        src = clients.get(src_key)
        if src is not None and dst not in src.receivers:
            src.receivers[dst] = None
            dst.note_heard_from(src_key)
        dst.enqueue_packet(_recv_header(_RECV, KEY_LEN + len(packet), src_key) + packet, disco)

    # -- forwarders: keys reachable through mesh peers ----------------------

    def add_forwarder(self, key: bytes, forwarder, before_link: bool = False) -> None:
        """A mesh peer announced ``key`` (PeerPresent); the first one to announce it is used.

        From another worker, the announcement is of a newer connection (last writer is active
        across workers), unless it was there before the workers' link came up: then neither is
        known to be newer, and the lower-numbered worker keeps its connection until one speaks.
        """
        record = self._clients.get(key)
        if record is None:
            record = self._clients[key] = ClientSet()
        before = record.counted_as()
        forwarders = record.forwarders
        if forwarder.is_worker and (not before_link or forwarder.precedes):
            record.supersede()
        if forwarder in forwarders:
            self._recount(before, record)
            return
        newly_on_node = forwarder.is_worker and not record.conns and not _on_another_worker(record)
        forwarders.append(forwarder)
        self._recount(before, record)
        if len(forwarders) == 2:
            self.stats.multiforwarder_created += 1
        if newly_on_node:
            # A client of another worker is a client of this node for other nodes.
            self._tell_other_nodes(peer_present_frame(key, bytes(16), 0, PeerPresentFlags.IS_REGULAR))

    def remove_forwarder(self, key: bytes, forwarder) -> None:
        """A mesh peer no longer has ``key`` (PeerGone, or its link broke)."""
        record = self._clients.get(key)
        if record is None or forwarder not in record.forwarders:
            # A stale or repeated notice: harmless, counted as derper does.
            self.stats.packet_forwarder_delete_other_value += 1
            return
        forwarders = record.forwarders
        before = record.counted_as()
        forwarders.remove(forwarder)
        if len(forwarders) == 1:
            self.stats.multiforwarder_deleted += 1
        if forwarder.is_worker and not _on_another_worker(record):
            record.reinstate()
        self._recount(before, record)
        if forwarder.is_worker and not record.conns and not _on_another_worker(record) and not self._restarting:
            self._tell_other_nodes(peer_gone_frame(key, PeerGoneReason.DISCONNECTED))
        if not forwarders and not record.conns:
            del self._clients[key]
            self._gone_from_region(key, record)

    def _tell_workers(self, frame: bytes) -> None:
        """A mesh update for the other workers of this node only."""
        for watcher in self._watchers:
            if watcher.is_worker:
                watcher.send_mesh_update(frame)

    def _tell_other_nodes(self, frame: bytes) -> None:
        """A mesh update for the watchers that are other nodes (not this node's workers)."""
        for watcher in self._watchers:
            if not watcher.is_worker:
                watcher.send_mesh_update(frame)

    def _watch(self, peer: Peer) -> None:
        if peer.key == self.public_key or peer in self._watchers:
            return
        self._watchers.append(peer)
        self.stats.watchers += 1
        before_link = PRESENT_BEFORE_LINK if peer.is_worker else 0
        for key, record in self._clients.items():
            if record.active is not None:
                peer.send_mesh_update(self._presence(record.active, before_link))
            elif not peer.is_worker and not record.conns and _on_another_worker(record):
                peer.send_mesh_update(peer_present_frame(key, bytes(16), 0, PeerPresentFlags.IS_REGULAR))

    def _announce(self, peer: Peer) -> None:
        if self._watchers:
            frame = self._presence(peer)
            for watcher in self._watchers:
                watcher.send_mesh_update(frame)

    @staticmethod
    def _presence(peer: Peer, extra_flags: int = 0) -> bytes:
        flags = 0
        if peer.is_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if peer.info is not None and peer.info.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if peer.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        return peer_present_frame(peer.key, ip16(peer.remote[0]), peer.remote[1],
                                  (flags or PeerPresentFlags.IS_REGULAR) | extra_flags)

    def _close_peer(self, key: bytes) -> None:
        record = self._clients.get(key)
        if record is None:
            log.info("ClosePeer for unknown key {key}", key=key.hex())
            return
        for peer in list(record.conns):
            peer.close()

    # -- introspection ----------------------------------------------------

    def connections(self, key: bytes) -> list[Peer]:
        record = self._clients.get(key)
        return list(record.conns) if record is not None else []

    def active(self, key: bytes) -> Peer | None:
        record = self._clients.get(key)
        return record.active if record is not None else None

    def forwarders(self, key: bytes) -> list:
        record = self._clients.get(key)
        return list(record.forwarders) if record is not None else []

    def client_counts(self) -> tuple[int, int]:
        """(keys connected here, keys reachable only through other nodes), as derper counts
        them (``ClientSet.counted_as``); the node's view adds up the workers."""
        return self._counts["local"], self._counts["remote"]

    def _recount(self, before: str | None, record: ClientSet) -> None:
        after = record.counted_as()
        if after != before:
            if before is not None:
                self._counts[before] -= 1
            if after is not None:
                self._counts[after] += 1

    def peers(self):
        for record in self._clients.values():
            yield from record.conns

    def check_consistency(self) -> list[str]:
        """Problems in the registry's invariants; empty when consistent."""
        problems = []
        stats = self.stats
        conns_total = sum(len(r.conns) for r in self._clients.values())
        for key, record in self._clients.items():
            for receiver in record.receivers:
                if receiver.state == ACTIVE and key not in (receiver.heard_from or ()):
                    problems.append(f"{receiver!r} receives PeerGone for {key.hex()[:8]} but does not know it")
        if conns_total != stats.current_connections:
            problems.append(f"current_connections={stats.current_connections} but {conns_total} registered")
        dup_keys = [r for r in self._clients.values() if r.duplicated]
        if len(dup_keys) != stats.current_dup_client_keys:
            problems.append(f"current_dup_client_keys={stats.current_dup_client_keys} but {len(dup_keys)} duplicated")
        dup_conns = sum(len(r.conns) for r in dup_keys)
        if dup_conns != stats.current_dup_client_conns:
            problems.append(f"current_dup_client_conns={stats.current_dup_client_conns} but {dup_conns} registered")
        for key, record in self._clients.items():
            problems += record.problems(key)
        kinds = [record.counted_as() for record in self._clients.values()]
        counted = {"local": kinds.count("local"), "remote": kinds.count("remote")}
        if counted != self._counts:
            problems.append(f"client counts {self._counts} but the records say {counted}")
        return problems
