"""The kernel's view of a TCP connection (Linux ``TCP_INFO``): RTT, congestion window, bytes.

``struct tcp_info`` grows with kernel versions and the kernel copies as much as the
caller asks for and it has; the fields read here are at fixed offsets since Linux 4.2.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP_INFO = getattr(socket, "TCP_INFO", 11)
# tcpi_rtt (offset 68) through tcpi_bytes_received (ends at 136): nine u32 then four u64.
_FROM_RTT = struct.Struct("=9I4Q")
_RTT_OFFSET = 68
NEEDED = _RTT_OFFSET + _FROM_RTT.size


@dataclass(frozen=True, slots=True)
class TCPInfo:
    rtt_us: int  # smoothed round-trip time, microseconds
    rttvar_us: int
    snd_cwnd: int  # congestion window, in segments
    total_retrans: int
    bytes_acked: int  # bytes sent and acknowledged by the peer
    bytes_received: int


def parse_tcp_info(raw: bytes) -> TCPInfo:
    if len(raw) < NEEDED:
        raise ValueError(f"TCP_INFO is {len(raw)} bytes, fewer than the {NEEDED} read (Linux 4.2 or later)")
    (rtt, rttvar, _ssthresh, cwnd, _advmss, _reordering, _rcv_rtt, _rcv_space, retrans,
     _pacing, _max_pacing, acked, received) = _FROM_RTT.unpack_from(raw, _RTT_OFFSET)
    return TCPInfo(rtt, rttvar, cwnd, retrans, acked, received)


def read_tcp_info(sock: socket.socket) -> TCPInfo:
    """Raises OSError when the socket has none (closed, not TCP) and ValueError on an old kernel."""
    return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256))
