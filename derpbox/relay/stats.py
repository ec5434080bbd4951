"""The relay's counters and gauges, each declared once with derper's name (spec section 6).

Plain attributes on a slotted object keep the hot path to one attribute add;
``derpbox.metrics`` renders ``RelayStats.METRICS``.
"""

from __future__ import annotations

from ..counters import Histogram, attributes, counter, gauge, histogram, untyped

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
HTTP_REFUSAL_STATUSES = ("400", "405", "426", "431", "505")
# derper's buckets for the PeerPresent/PeerGone batches written to a mesh watcher.
MESH_UPDATE_BATCH_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MESH_UPDATE_LOOP_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
BUFFERED_WRITE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 50, 100)
# derper's moving average of queue time: each packet written weighs 0.1.
QUEUE_AVERAGE_KEEP = 0.9


class RelayStats:
    METRICS = (
        gauge("current_connections", "derp_current_connections", "Current connections, including duplicates."),
        gauge("current_home_connections", "derp_current_home_connections",
              "Current connections from clients that say this is their home (preferred) DERP."),
        gauge("current_notideal_connections", "derp_current_notideal_connections",
              "Current connections that sent the Ideal-Node header (not their ideal node)."),
        gauge("current_dup_client_keys", "derp_current_dup_client_keys", "Keys currently connected more than once."),
        gauge("current_dup_client_conns", "derp_current_dup_client_conns",
              "Connections of keys currently connected more than once."),
        gauge("watchers", "derp_watchers", "Mesh watchers (WatchConns subscribers)."),
        counter("total_dup_client_conns", "derp_total_dup_client_conns", "Duplicate connections ever seen for a key."),
        counter("accepts", "derp_accepts", "Accepted DERP connections, before verification."),
        counter("bytes_received", "derp_bytes_received", "Payload bytes received from clients (keys and framing excluded)."),
        counter("bytes_sent", "derp_bytes_sent", "Payload bytes sent to clients (keys and framing excluded)."),
        counter("packets_received", "derp_packets_received", "Packets received from clients (forwarded-in packets excluded)."),
        counter("packets_sent", "derp_packets_sent", "Packets sent to clients."),
        counter("unknown_frames", "derp_unknown_frames", "Unknown frames received (never incremented, as derper)."),
        counter("home_moves_in", "derp_home_moves_in", "Clients that made this their home DERP."),
        counter("home_moves_out", "derp_home_moves_out", "Clients that stopped making this their home DERP."),
        counter("got_ping", "derp_got_ping", "Ping frames received."),
        counter("sent_pong", "derp_sent_pong", "Pong frames sent."),
        counter("peer_gone_disconnected_frames", "derp_peer_gone_disconnected_frames", "PeerGone(Disconnected) frames sent."),
        counter("peer_gone_not_here_frames", "derp_peer_gone_not_here_frames", "PeerGone(NotHere) frames sent."),
        counter("packets_forwarded_out", "derp_packets_forwarded_out", "Packets forwarded to mesh peers."),
        counter("packets_forwarded_in", "derp_packets_forwarded_in", "Packets forwarded in from mesh peers."),
        counter("multiforwarder_created", "derp_multiforwarder_created",
                "Keys that became reachable through more than one mesh peer."),
        counter("multiforwarder_deleted", "derp_multiforwarder_deleted",
                "Keys that went back to being reachable through one mesh peer."),
        counter("packet_forwarder_delete_other_value", "derp_packet_forwarder_delete_other_value",
                "Mesh PeerGone notices for a key not forwarded through that peer (stale or repeated)."),
        counter("mesh_forward_holds", "derpbox_mesh_forward_holds",
                "Times a connection stopped being read until a full mesh link it forwards to drained."),
        histogram("mesh_update_batch_size", "derp_mesh_update_batch_size",
                  "PeerPresent and PeerGone frames written to a mesh watcher in one write."),
        histogram("mesh_update_loop_count", "derp_mesh_update_loop_count",
                  "Writes needed to send a mesh watcher its pending updates (one here: one write per flush)."),
        counter("sclient_write_timeouts", "derp_sclient_write_timeouts", "Client writes that timed out."),
        untyped("average_queue_duration_ms", "derp_average_queue_duration_ms",
                "Moving average (alpha 0.1 per packet) of the time packets wait in a client's queue, in ms."),
        histogram("buffered_write_frames", "derp_buffered_write_frames", "Frames written to a client in one write."),
        counter("packets_received_kind", "derp_packets_received_kind", "Packets received from clients, by kind.",
                ("kind",)),
        counter("dropped_packets", "derp_packets_dropped", "Packets dropped, by reason and kind.", ("reason", "kind")),
        counter("dropped_bytes", "derp_bytes_dropped", "Payload bytes dropped, by reason and kind.", ("reason", "kind")),
        counter("websocket_accepts", "derp_websocket_accepts", "DERP connections accepted over WebSocket."),
        counter("fast_start_upgrades", "derpbox_fast_start_upgrades",
                "DERP connections that used the fast-start upgrade (no 101 response)."),
        counter("handshake_failures", "derpbox_handshake_failures", "DERP connections that failed the handshake (ClientInfo)."),
        counter("protocol_errors", "derpbox_protocol_errors", "DERP connections closed for a protocol error after the handshake."),
        counter("admission_rejections", "derpbox_admission_rejections", "DERP clients rejected by client verification."),
        counter("http_refusals", "derpbox_http_refusals",
                "Connections refused for a bad first HTTP request, by the status answered.", ("status",)),
        counter("head_timeouts", "derpbox_http_head_timeouts",
                "Connections closed for sending no complete HTTP request in time."),
    )
    __slots__ = attributes(METRICS) + ("packets_received_disco", "dropped_packets",
                                        "dropped_bytes", "mesh_update_batch_size", "mesh_update_loop_count",
                                        "http_refusals", "buffered_write_frames")

    def __init__(self):
        for name in attributes(self.METRICS):
            setattr(self, name, 0)
        self.packets_received_disco = 0
        # Every (reason, kind) pair exists from the start, as derper pre-creates them.
        self.dropped_packets = {(r, k): 0 for r in DROP_REASONS for k in PACKET_KINDS}
        self.dropped_bytes = dict.fromkeys(self.dropped_packets, 0)
        self.mesh_update_batch_size = Histogram(MESH_UPDATE_BATCH_BUCKETS)
        self.mesh_update_loop_count = Histogram(MESH_UPDATE_LOOP_BUCKETS)
        self.average_queue_duration_ms = 0.0
        self.buffered_write_frames = Histogram(BUFFERED_WRITE_BUCKETS)
        # Every status a bad first request can get exists from the start (a series, not a gap).
        self.http_refusals = dict.fromkeys(HTTP_REFUSAL_STATUSES, 0)

    @property
    def packets_received_other(self) -> int:
        # Derived: the hot path counts every packet and the disco ones only.
        return self.packets_received - self.packets_received_disco

    @property
    def packets_received_kind(self) -> dict[str, int]:
        return {"disco": self.packets_received_disco, "other": self.packets_received_other}

    def note_queue_time(self, seconds: float, npackets: int) -> None:
        """``npackets`` written after waiting ``seconds``: the average moves as derper's does per packet."""
        keep = QUEUE_AVERAGE_KEEP ** npackets
        self.average_queue_duration_ms = self.average_queue_duration_ms * keep + seconds * 1000.0 * (1.0 - keep)

    def drop(self, reason: str, disco: bool, nbytes: int) -> None:
        key = (reason, "disco" if disco else "other")
        self.dropped_packets[key] += 1
        self.dropped_bytes[key] += nbytes

    def total_dropped(self, reason: str | None = None) -> int:
        return sum(v for (r, _), v in self.dropped_packets.items() if reason in (None, r))
