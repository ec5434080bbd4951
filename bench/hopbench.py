"""What the hop between workers costs in Python: the relay alone, no sockets, no TLS.

A packet that crosses between workers goes through the relay twice: the sender's worker
routes it to the other worker's link (a ForwardPacket), and that worker routes it again,
from the link to its client. This times both passes against a packet relayed between two
clients of one worker, through the real ``Relay`` and ``Peer`` objects fed with frames as
one socket read would bring them (``--batch`` frames per read), the writes going nowhere:

    local         SendPacket in, RecvPacket queued and flushed to the receiver
    to-worker     SendPacket in, ForwardPacket queued and flushed to the other worker's link
    from-worker   ForwardPacket in (from the other worker), RecvPacket flushed to the receiver

    python bench/hopbench.py                 # batches of 1 and 13 packets, best of 5

Writes ``bench/results/<timestamp>-hop.md`` and ``.json``, and ``LATEST-hop.md``.

The hop's Python cost per packet is to-worker + from-worker - local; workerbench.py
measures the whole of it, sockets and the second process included.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

from derpbench import BENCH_DIR, machine_info, report_head, save_report
from nacl.public import PrivateKey
from twisted.internet.task import Clock

from derpbox.mesh.link import MeshLink
from derpbox.protocol import frames as F
from derpbox.protocol.handshake import client_info_frame
from derpbox.relay.peer import Peer
from derpbox.relay.relay import Relay

WORKER_KEY = bytes(range(32))
# A WireGuard data packet's first byte, as the relay sees most packets.
PACKET = bytes([4]) + bytes(1199)


class Nowhere:
    """A connection (for a Peer) and a transport (for a MeshLink) that takes every write."""

    connected = True
    disconnecting = False

    def write(self, data):
        pass

    def abort(self):
        pass

    def close(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def registerProducer(self, producer, streaming):
        pass


class LinkPeer:
    """The MeshPeer of the link to the other worker, as much as the relay and the link use."""

    is_worker = True

    def __init__(self, relay: Relay):
        self.relay = relay
        self.clock = relay.clock
        self.link = MeshLink(self, None)
        self.link.transport = Nowhere()
        self.link.ready = True

    def forward_packet(self, src, dst, packet, disco, sender=None):
        self.link.forward(src, dst, packet, disco, sender)


def connect(relay: Relay, info: dict | None = None) -> tuple[Peer, bytes]:
    key = PrivateKey.generate()
    peer = Peer(relay, Nowhere(), ("127.0.0.1", 1))
    peer.start()
    peer.feed(client_info_frame(key, relay.public_key, info or {"version": 2}))
    relay.flush()
    return peer, bytes(key.public_key)


def time_feeds(peer: Peer, data: bytes, rounds: int, repeat: int) -> float:
    """The best seconds per feed of ``data`` over ``repeat`` runs of ``rounds``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            peer.feed(data)
        best = min(best, (time.perf_counter() - start) / rounds)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,13", help="frames per read, comma-separated (default 1,13)")
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = {"started": started, "command": shlex.join([sys.executable, *sys.argv]),
           "machine": machine_info(None), "rounds": args.rounds, "repeat": args.repeat, "rows": []}
    relay = Relay(PrivateKey.generate(), Clock(), worker_mesh_key=WORKER_KEY, queue_depth=1000)
    sender, sender_key = connect(relay)
    receiver, receiver_key = connect(relay)
    other_worker, _ = connect(relay, {"version": 2, "meshKey": WORKER_KEY.hex()})
    on_other_worker = bytes([7]) * 32
    relay.add_forwarder(on_other_worker, LinkPeer(relay))
    lines = ["| frames per read | local us/packet | to-worker | from-worker | hop (to + from - local) |",
             "|---|---|---|---|---|"]
    for batch in (int(b) for b in args.batches.split(",")):
        reads = {
            "local": (sender, F.send_packet_frame(receiver_key, PACKET)),
            "to-worker": (sender, F.send_packet_frame(on_other_worker, PACKET)),
            "from-worker": (other_worker, F.forward_packet_frame(sender_key, receiver_key, PACKET)),
        }
        us = {name: time_feeds(peer, frame * batch, args.rounds, args.repeat) / batch * 1e6
              for name, (peer, frame) in reads.items()}
        hop = us["to-worker"] + us["from-worker"] - us["local"]
        res["rows"].append({"batch": batch, **us, "hop": hop})
        lines.append(f"| {batch} | {us['local']:.2f} | {us['to-worker']:.2f} | {us['from-worker']:.2f} | {hop:.2f} |")
    head = report_head(f"derpbox: the hop between workers in Python ({started})", res)
    text = "\n".join([*head, "", f"Best of {args.repeat} runs of {args.rounds} reads; us per packet, "
                       "the relay alone (no sockets, no TLS).", "", *lines]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    save_report(args.out, started, "-hop", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
