"""The registry of connected clients and the routing of packets between them.

Spec sections 1.5-1.10: routing by node key, "last writer is active" for duplicate
keys, PeerGone to those a departed key sent to, PeerGone(NotHere) for disco packets
to unknown keys, and the mesh frames (WatchConns, ForwardPacket, ClosePeer).

Peers enqueue output and mark themselves dirty; the adapter calls ``flush`` once
per read, so all frames for one destination produced by one read go out in a
single write.
"""

from __future__ import annotations

import ipaddress
import struct

from nacl.public import PrivateKey
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..protocol.frames import (
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    KEY_LEN,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    peer_present_frame,
    restarting_frame,
)
from ..keys import health_key
from ..logs import LogThrottle
from ..protocol.handshake import ServerHandshake, mesh_key_matches
from .metrics import RelayStats
from .peer import ACTIVE, Peer

log = Logger()

_recv_prefix = struct.Struct(">BI32s").pack
_RECV = FrameType.RECV_PACKET
MESH_WRITE_TIMEOUT = 30.0
# Restarting frame values: reconnect soon, keep trying through a container restart.
RESTART_RECONNECT_MS = 500
RESTART_TRY_FOR_MS = 30_000


def _ip16(ip: str) -> bytes:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return bytes(16)
    if addr.version == 4:
        return bytes(10) + b"\xff\xff" + addr.packed
    return addr.packed


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
    ):
        self.handshake = ServerHandshake(private_key)
        self.public_key = self.handshake.public_key
        self.clock = clock
        self.queue_depth = queue_depth
        self.write_timeout = write_timeout
        self.mesh_key = mesh_key
        self.health_key = health_key(private_key)
        # Client verification (derpbox.admission.Admission), None when not configured.
        self.admission = admission
        self.stats = RelayStats()
        # Per-connection failure lines, folded when a reason repeats (scanners).
        self.noise = LogThrottle(Logger("derpbox.relay.peer"))
        self.dirty: list[Peer] = []
        # key -> the connection that receives its traffic; absent while duplicates
        # of a key exist and none of them has spoken since the active one left.
        self._active: dict[bytes, Peer] = {}
        # key -> every connection of that key, oldest first.
        self._conns: dict[bytes, list[Peer]] = {}
        # duplicate keys -> connections that have sent since, most recent last.
        self._history: dict[bytes, list[Peer]] = {}
        # source key -> {destination key: destination connection} it has sent to.
        self._sent_to: dict[bytes, dict[bytes, Peer]] = {}
        self._watchers: list[Peer] = []
        self._restarting = False
        self._next_conn_id = 0

    # -- admission and registration --------------------------------------

    def is_mesh_key(self, offered: bytes | None) -> bool:
        return mesh_key_matches(self.mesh_key, offered) or mesh_key_matches(self.health_key, offered)

    def write_timeout_for(self, peer: Peer) -> float:
        return MESH_WRITE_TIMEOUT if peer.is_mesh else self.write_timeout

    def register(self, peer: Peer) -> None:
        stats = self.stats
        key = peer.key
        self._next_conn_id += 1
        peer.conn_id = self._next_conn_id
        peer.sent_to = self._sent_to.setdefault(key, {})
        stats.current_connections += 1
        if peer.not_ideal:
            stats.current_notideal_connections += 1
        conns = self._conns.setdefault(key, [])
        conns.append(peer)
        if len(conns) == 2:
            stats.current_dup_client_keys += 1
            stats.current_dup_client_conns += 2
            stats.total_dup_client_conns += 1
            conns[0].is_dup = True
            self._history[key] = []
        elif len(conns) > 2:
            stats.current_dup_client_conns += 1
            stats.total_dup_client_conns += 1
        if len(conns) > 1:
            peer.is_dup = True
        self._active[key] = peer
        self._announce(peer)

    def note_activity(self, peer: Peer) -> None:
        """A duplicate connection that speaks becomes the active one (spec 1.8)."""
        history = self._history.get(peer.key)
        if history is None:
            return
        if not history or history[-1] is not peer:
            if peer in history:
                history.remove(peer)
            history.append(peer)
        self._active[peer.key] = peer

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
        conns = self._conns[key]
        conns.remove(peer)
        if not conns:
            del self._conns[key]
            del self._active[key]
            self._gone(key)
            return
        history = self._history[key]
        if peer in history:
            history.remove(peer)
        if len(conns) == 1:
            stats.current_dup_client_keys -= 1
            stats.current_dup_client_conns -= 2
            del self._history[key]
            survivor = conns[0]
            survivor.is_dup = False
            self._active[key] = survivor
            return
        stats.current_dup_client_conns -= 1
        if self._active.get(key) is peer:
            # The most recent sender takes over; with no sender there is no active
            # connection until one of them speaks.
            if history:
                self._active[key] = history[-1]
            else:
                del self._active[key]

    def _gone(self, key: bytes) -> None:
        """The last connection of ``key`` left: tell those it sent to, and watchers."""
        sent_to = self._sent_to.pop(key, {})
        if self._restarting:
            sent_to.clear()
            return
        for dst in sent_to.values():
            if dst.state == ACTIVE:
                dst.send_peer_gone(key, PeerGoneReason.DISCONNECTED)
        # Two keys that sent to each other reference each other's dicts: clearing
        # breaks that cycle, so closed connections are freed by reference counting.
        sent_to.clear()
        for watcher in self._watchers:
            watcher.send_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # -- routing (the hot path) ------------------------------------------

    def send_packet(self, src: Peer, payload: memoryview) -> None:
        stats = self.stats
        dst_key = payload[:KEY_LEN].tobytes()
        size = len(payload) - KEY_LEN
        disco = size >= DISCO_MIN_LEN and payload[KEY_LEN : KEY_LEN + 6] == DISCO_MAGIC
        stats.packets_received += 1
        stats.bytes_received += size
        if disco:
            stats.packets_received_disco += 1
        else:
            stats.packets_received_other += 1
        dst = self._active.get(dst_key)
        if dst is None:
            if dst_key in self._conns:
                stats.drop("dup_client", disco, size)
                return
            stats.drop("unknown_dest", disco, size)
            if disco and src.not_here_allowed():
                src.send_peer_gone(dst_key, PeerGoneReason.NOT_HERE)
            return
        if dst.state != ACTIVE:
            stats.drop("gone_disconnected", disco, size)
            return
        sent_to = src.sent_to
        if sent_to.get(dst_key) is not dst:
            sent_to[dst_key] = dst
        dst.enqueue_packet(_recv_prefix(_RECV, len(payload), src.key) + payload[KEY_LEN:], disco)

    def flush(self) -> None:
        dirty = self.dirty
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
        if ftype == FrameType.FORWARD_PACKET:
            self._forward_in(peer, payload)
        elif ftype == FrameType.WATCH_CONNS:
            self._watch(peer)
        elif ftype == FrameType.CLOSE_PEER:
            self._close_peer(payload.tobytes())

    def _forward_in(self, mesh_peer: Peer, payload: memoryview) -> None:
        stats = self.stats
        src_key = payload[:KEY_LEN].tobytes()
        dst_key = payload[KEY_LEN : 2 * KEY_LEN].tobytes()
        packet = payload[2 * KEY_LEN :]
        disco = len(packet) >= DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC
        stats.packets_forwarded_in += 1
        dst = self._active.get(dst_key)
        if dst is None or dst.state != ACTIVE:
            stats.drop("unknown_dest_on_fwd", disco, len(packet))
            # NotHere goes to the mesh peer that forwarded it, not the origin.
            if disco and mesh_peer.not_here_allowed():
                mesh_peer.send_peer_gone(dst_key, PeerGoneReason.NOT_HERE)
            return
        dst.enqueue_packet(_recv_prefix(_RECV, KEY_LEN + len(packet), src_key) + packet, disco)

    def _watch(self, peer: Peer) -> None:
        if peer.key == self.public_key or peer in self._watchers:
            return
        self._watchers.append(peer)
        self.stats.watchers += 1
        for active in self._active.values():
            peer.send_control(self._presence(active))

    def _announce(self, peer: Peer) -> None:
        if self._watchers:
            frame = self._presence(peer)
            for watcher in self._watchers:
                watcher.send_control(frame)

    @staticmethod
    def _presence(peer: Peer) -> bytes:
        flags = 0
        if peer.is_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if peer.info is not None and peer.info.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if peer.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        return peer_present_frame(peer.key, _ip16(peer.remote[0]), peer.remote[1], flags or PeerPresentFlags.IS_REGULAR)

    def _close_peer(self, key: bytes) -> None:
        conns = self._conns.get(key)
        if not conns:
            log.info("ClosePeer for unknown key {key}", key=key.hex())
            return
        for peer in list(conns):
            peer.close()

    # -- introspection ----------------------------------------------------

    def connections(self, key: bytes) -> list[Peer]:
        return list(self._conns.get(key, ()))

    def active(self, key: bytes) -> Peer | None:
        return self._active.get(key)

    def peers(self):
        for conns in self._conns.values():
            yield from conns

    def check_consistency(self) -> list[str]:
        """Problems in the registry's invariants; empty when consistent."""
        problems = []
        conns_total = sum(len(c) for c in self._conns.values())
        if conns_total != self.stats.current_connections:
            problems.append(f"current_connections={self.stats.current_connections} but {conns_total} registered")
        for key, peer in self._active.items():
            if peer not in self._conns.get(key, ()):
                problems.append(f"active connection for {key.hex()[:8]} is not registered")
        dups = {k for k, c in self._conns.items() if len(c) > 1}
        if dups != set(self._history):
            problems.append("duplicate history out of sync")
        return problems

