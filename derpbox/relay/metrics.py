"""Relay counters and gauges, named after derper's expvars (spec section 6).

Plain attributes on a slotted object keep the hot path to one attribute add; the
Prometheus exposition is built from these fields elsewhere.
"""

from __future__ import annotations

DROP_REASONS = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",
    "write_error",
    "dup_client",
)
PACKET_KINDS = ("disco", "other")

GAUGES = (
    "current_connections",
    "current_home_connections",
    "current_notideal_connections",
    "current_dup_client_keys",
    "current_dup_client_conns",
    "watchers",
)
COUNTERS = (
    "accepts",
    "bytes_received",
    "bytes_sent",
    "packets_received",
    "packets_sent",
    "packets_received_disco",
    "packets_received_other",
    "unknown_frames",
    "home_moves_in",
    "home_moves_out",
    "got_ping",
    "sent_pong",
    "peer_gone_disconnected_frames",
    "peer_gone_not_here_frames",
    "packets_forwarded_out",
    "packets_forwarded_in",
    "sclient_write_timeouts",
    "total_dup_client_conns",
    "websocket_accepts",
    "fast_start_upgrades",
    "handshake_failures",
    "admission_rejections",
    "protocol_errors",
)


class RelayStats:
    __slots__ = GAUGES + COUNTERS + ("dropped_packets", "dropped_bytes")

    def __init__(self):
        for name in GAUGES + COUNTERS:
            setattr(self, name, 0)
        # Every (reason, kind) pair exists from the start, as derper pre-creates them.
        self.dropped_packets = {(r, k): 0 for r in DROP_REASONS for k in PACKET_KINDS}
        self.dropped_bytes = dict.fromkeys(self.dropped_packets, 0)

    def drop(self, reason: str, disco: bool, nbytes: int) -> None:
        key = (reason, "disco" if disco else "other")
        self.dropped_packets[key] += 1
        self.dropped_bytes[key] += nbytes

    def total_dropped(self, reason: str | None = None) -> int:
        return sum(v for (r, _), v in self.dropped_packets.items() if reason in (None, r))
