"""Load for the attack tests, each run as its own process so neither its CPU nor its share
of the GIL is the server's: ``python -m tests.loadgen URL MODE SECONDS``.

Modes (each bounded by SECONDS):
  pair             a steady pair: one numbered packet relayed every 2 ms between two clients;
                   prints JSON {"sent", "received", "delays"} (round trips in seconds)
  ws-tiny-frames   completes the handshake over WebSocket, then sends SendPacket frames with
                   every byte in a WebSocket frame of its own (7 wire bytes per DERP byte)
  tls-tiny-records completes the handshake over TLS, then sends every DERP byte in a TLS
                   record of its own
The two floods print JSON {"sent": bytes, "closed": whether the server closed the connection}.
"""

from __future__ import annotations

import json
import os
import sys
import time

from derpbox.client import DERPClient
from derpbox.protocol import frames as F
from derpbox.protocol.websocket import Opcode, encode_frame

MASK = b"\x01\x02\x03\x04"


def steady_pair(url: str, seconds: float) -> int:
    a, b = DERPClient.connect(url), DERPClient.connect(url)
    sent, received, delays = 0, [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        a.send_packet(b.public_key, sent.to_bytes(4, "big"))
        sent += 1
        _, data = b.recv_packet(timeout=5)
        delays.append(time.monotonic() - started)
        received.append(int.from_bytes(data, "big"))
        time.sleep(0.002)
    a.close()
    b.close()
    print(json.dumps({"sent": sent, "received": received, "delays": delays}), flush=True)
    return 0


def main(url: str, mode: str, seconds: float) -> int:
    if mode == "pair":
        return steady_pair(url, seconds)
    client = DERPClient.connect(url, websocket=mode == "ws-tiny-frames")
    frame = F.send_packet_frame(os.urandom(32), bytes(100))
    deadline = time.monotonic() + seconds
    sent = 0
    closed = False
    try:
        if mode == "ws-tiny-frames":
            batch = b"".join(encode_frame(Opcode.BINARY, frame[i : i + 1], mask=MASK) for i in range(len(frame))) * 40
            while time.monotonic() < deadline:
                client.stream.sendall(batch)
                sent += len(batch)
        elif mode == "tls-tiny-records":
            pieces = [frame[i : i + 1] for i in range(len(frame))]
            while time.monotonic() < deadline:
                for piece in pieces:
                    client.stream.sendall(piece)
                sent += len(frame)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except OSError:
        closed = True  # by the server: the caller says whether it should have been
    print(json.dumps({"sent": sent, "closed": closed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
