"""Attack and soak: issue 13's attacks against one derpbox, one after another.

One server process serves the whole run. Each attack runs in processes of its own while a
steady pair (its own process too) relays one numbered packet at a time through the same
server; per attack the report gives the pair's loss and round trips, the server's RSS and
open files before, during, right after and after settling, its CPU time, the counters that
moved, its log lines, and the attack's own numbers. See bench/README.md.

    python bench/attacksoak.py                           # full scale: the soak
    python bench/attacksoak.py --scale 0.02 --hold 5     # a quick check, about a minute
    python bench/attacksoak.py --only churn,idle
"""

from __future__ import annotations

import argparse
import array
import collections
import datetime
import json
import os
import random
import re
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from nacl.public import PrivateKey
from OpenSSL import SSL

from derpbench import (
    BENCH_DIR,
    TLSConn,
    cpu_seconds,
    default_tailcat,
    dial,
    expect,
    fmt,
    free_port,
    machine_info,
    nofile_limit,
    raise_nofile,
    report_head,
    rss_kib,
    save_report,
    start,
    start_derpbox,
    stop,
)
from derpbox.client import DERPClient, DERPClientError
from derpbox.protocol import websocket as ws
from derpbox.protocol.frames import (
    FrameType,
    encode_frame,
    note_preferred_frame,
    ping_frame,
    send_packet_frame,
)
from derpbox.protocol.upgrade import upgrade_request

ROOT = BENCH_DIR.parent

# What each attack does at --scale 1 (issue 13's numbers; fuzz, admission and sigterm are ours).
FULL_SCALE = {
    "malformed": 10_000,     # connections, each one malformed input from MALFORMED
    "trickle": 1_000,        # connections trickling one byte every 2 s
    "churn": 100_000,        # connect, handshake, disconnect cycles
    "idle": 10_000,          # handshaken clients held open for --hold seconds
    "slow-readers": 50,      # clients that never read while flooders send to them
    "fragments": 2,          # one 1-byte-WebSocket-frame and one 1-byte-TLS-record flood (not scaled)
    "fuzz": 10_000,          # connections, each one fuzzed input
    "admission": 600,        # clients admitted through a misbehaving admission server
    "sigterm": 1_000,        # clients connected (and flooded) when the server gets SIGTERM
}
ATTACKS = tuple(FULL_SCALE)
DESCRIPTIONS = {
    "malformed": "each connection sends one malformed input (cycling through the MALFORMED variants) and waits up "
                 "to 5 s for the server to close it",
    "trickle": "connections send one byte every 2 s: a TLS ClientHello, a request head, a request body, a DERP "
               "frame after the handshake, a WebSocket frame after the handshake (left unfinished); held --hold s",
    "churn": "DERP over TLS: connect, full handshake (ServerInfo received), close; every 4th cycle closes with a "
             "reset instead of a FIN",
    "idle": "DERP over TLS clients handshaken and then left idle (never read, never write), held --hold s",
    "slow-readers": "handshaken clients that never read while 2 flooding connections send them 1200-byte packets "
                    "at --flood-pps for --hold s",
    "fragments": "tests/loadgen.py ws-tiny-frames (every DERP byte its own WebSocket frame) and tls-tiny-records "
                 "(every DERP byte its own TLS record), both for --hold s",
    "fuzz": "each connection sends a randomly mutated input (request head, ClientInfo, DERP frames after the "
            "handshake, WebSocket frames), then half-closes and waits up to 5 s for the server to close",
    "admission": "the server asks the bench's admission server about every client; for these clients (one "
                 "source address per mode) it hangs, stalls its body, answers 500, answers non-JSON, resets, or "
                 "allows after 4 s",
    "sigterm": "clients connected and flooded (as slow-readers) and the pair running; after 2 s of flood the server "
               "gets SIGTERM; exit code and time to exit, and how many clients saw their connection closed",
}
CLOSE_WAIT = 5.0  # seconds a malformed or fuzzed connection waits for the server to close it
NOTIFY_WAIT = 1.0
TRICKLE_INTERVAL = 2.0
SOURCES_PER_ATTACK = 8  # loopback source addresses per attack: TIME_WAIT of 100,000 cycles spread over them
PAIR_INTERVAL = 0.002
PAIR_LOSS_WAIT = 1.0  # a packet not back within this is counted lost
FLOOD_PACKET = 1200
FLOOD_SLICE = 0.01
ADMISSION_MODES = ("hang", "stalled-body", "error-500", "not-json", "reset", "slow-allow")
ADMISSION_STALL = 10.0  # longer than derpbox's 5 s admission deadline
ADMISSION_SLOW = 4.0  # shorter than it
# Errors a client may see from the server's side; anything else is a bug in this script.
CLIENT_ERRORS = (OSError, ssl.SSLError, SSL.Error, DERPClientError, ValueError, EOFError)
LOG_ERROR = re.compile(r"#(error|critical)\]|Traceback|Unhandled")
LOG_WARN = re.compile(r"#warn\]")
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def source_ip(attack: str, i: int) -> str:
    """The loopback address connection ``i`` of ``attack`` comes from (127.0.0.1 is the pair's)."""
    return f"127.0.{10 + ATTACKS.index(attack)}.{1 + i % SOURCES_PER_ATTACK}"


def admission_source(mode: str) -> str:
    return f"127.0.2.{1 + ADMISSION_MODES.index(mode)}"


def outcome_of(error: BaseException) -> str:
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, (ConnectionError, EOFError)):
        return "closed"
    if isinstance(error, TimeoutError):
        return "timeout"
    return f"error {type(error).__name__}"


def percentile(values, q: float):
    """The q-quantile (nearest rank below) of ``values``, None if empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def moved(before: dict, after: dict) -> dict:
    """Metrics whose value changed: name -> [before, after]. Histogram buckets are left out
    (their _sum and _count say enough)."""
    return {k: [before.get(k, 0.0), after.get(k, 0.0)] for k in sorted(set(before) | set(after))
            if "_bucket{" not in k and before.get(k, 0.0) != after.get(k, 0.0)}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


# --- client pieces --------------------------------------------------------------------


def tcp(port: int, src: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(src, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls(port: int, src: str) -> TLSConn:
    return TLSConn(tcp(port, src))


def derp_upgrade(port: int) -> bytes:
    return upgrade_request(f"127.0.0.1:{port}", user_agent="attacksoak")


def ws_upgrade(port: int) -> bytes:
    return ws.client_handshake_request(f"127.0.0.1:{port}", key=ws.new_client_key())


def client_hello() -> bytes:
    """The first flight of a TLS client, as bytes to trickle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    try:
        ctx.wrap_bio(ssl.MemoryBIO(), outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_closed(sock: socket.socket, conn: TLSConn | None = None, timeout: float = CLOSE_WAIT) -> str:
    """How the server ended the connection: "closed" (FIN), "reset", "notify-only" when over TLS
    it sent close_notify but kept the TCP connection NOTIFY_WAIT s longer (Twisted waits for the
    client's close_notify, which an attacker never sends), or after ``timeout`` "answered-open"
    (it sent something) or "silent-open"."""
    deadline = time.monotonic() + timeout
    notified = answered = False
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                return "closed"
            answered = True
            if conn is not None and not notified:
                conn.incoming.write(data)
                try:
                    while conn.tls.read(65536):
                        pass
                    # b"": the server's close_notify
                    notified = True
                    deadline = min(deadline, time.monotonic() + NOTIFY_WAIT)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    conn = None  # not decryptable (our own garbage broke the stream): only the TCP close counts
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        pass
    return "notify-only" if notified else "answered-open" if answered else "silent-open"


def closed_now(sock: socket.socket) -> bool:
    """Discards what the server sent; True once it has closed the connection."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def finish(sock: socket.socket, conn: TLSConn | None = None) -> str:
    outcome = wait_closed(sock, conn)
    sock.close()
    return outcome


# --- malformed inputs: each a function (port, src, rng) -> (outcome, bytes sent) --------


def send_raw(port, src, data: bytes):
    sock = tcp(port, src)
    sock.sendall(data)
    return finish(sock), len(data)


def send_tls(port, src, data: bytes, half_close: bool = False):
    conn = tls(port, src)
    conn.sendall(data)
    if half_close:
        conn.sock.shutdown(socket.SHUT_WR)
    return finish(conn.sock, conn), len(data)


def garbage_record(port, src, rng):
    conn = tls(port, src)
    junk = b"\x17\x03\x03\x00\x40" + rng.randbytes(64)  # an application-data record that fails to decrypt
    conn.sock.sendall(junk)
    return finish(conn.sock), len(junk)


MALFORMED = {
    "not-tls": lambda port, src, rng: send_raw(port, src, rng.randbytes(200)),
    "plain-http": lambda port, src, rng: send_raw(port, src, derp_upgrade(port)),
    "tls-garbage-record": garbage_record,
    "bad-request-line": lambda port, src, rng: send_tls(port, src, b"\x00\x01GARBAGE\r\n\r\n"),
    "huge-head": lambda port, src, rng: send_tls(port, src, b"GET /derp HTTP/1.1\r\n"
                                                 + b"X-Pad: " + b"a" * 65536 + b"\r\n\r\n"),
    "bad-version": lambda port, src, rng: send_tls(port, src, derp_upgrade(port).replace(b"HTTP/1.1", b"HTTP/9.9")),
    "huge-body": lambda port, src, rng: send_tls(port, src, b"POST /derp HTTP/1.1\r\nHost: x\r\n"
                                                 b"Content-Length: 10737418240\r\n\r\n"),
    "bad-client-info": lambda port, src, rng: send_tls(
        port, src, derp_upgrade(port) + encode_frame(FrameType.CLIENT_INFO, rng.randbytes(120))),
    "wrong-first-frame": lambda port, src, rng: send_tls(
        port, src, derp_upgrade(port) + send_packet_frame(rng.randbytes(32), b"x" * 100)),
    "oversize-frame": lambda port, src, rng: send_tls(port, src, derp_upgrade(port) + b"\x02\xff\xff\xff\xff"),
    "bad-ws-upgrade": lambda port, src, rng: send_tls(port, src, re.sub(rb"Sec-WebSocket-Key: [^\r]*\r\n", b"",
                                                                        ws_upgrade(port))),
    "ws-unmasked": lambda port, src, rng: send_tls(port, src, ws_upgrade(port)
                                                   + ws.encode_frame(ws.Opcode.BINARY, b"x" * 20)),
    "ws-reserved-opcode": lambda port, src, rng: send_tls(port, src, ws_upgrade(port) + b"\x83\x80" + bytes(4)),
}


# --- fuzzing --------------------------------------------------------------------------

TOKENS = (b"\r\n", b"\r\n\r\n", b"\x00", b"\xff\xff\xff\xff", b":", b" ", b"Content-Length: 99999999999\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Upgrade: websocket\r\n", b"Derp-Fast-Start: 1\r\n")


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(buf) + 1)
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del buf[at:at + rng.randint(1, 16)]
        elif op == 4:
            buf[at:at] = buf[at:at + rng.randint(1, 64)]
        else:
            buf[at:at] = rng.choice(TOKENS)
    return bytes(buf)


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # any type, any (true) length
        return encode_frame(rng.randrange(256), rng.randbytes(rng.choice((0, 1, 4, 8, 32, 33, 100, 2000))))
    if kind == 1:  # a header whose length lies
        return bytes((rng.randrange(256),)) + rng.randbytes(4) + rng.randbytes(rng.randrange(64))
    frame = rng.choice((
        send_packet_frame(rng.randbytes(32), rng.randbytes(rng.randrange(1, 1300))),
        ping_frame(rng.randbytes(8)),
        note_preferred_frame(bool(rng.randrange(2))),
        encode_frame(FrameType.WATCH_CONNS),
        encode_frame(FrameType.CLOSE_PEER, rng.randbytes(32)),
        encode_frame(FrameType.FORWARD_PACKET, rng.randbytes(64) + rng.randbytes(100)),
        encode_frame(FrameType.CLIENT_INFO, rng.randbytes(100)),
    ))
    return mutate(rng, frame) if kind == 3 else frame


def random_ws_frame(rng: random.Random) -> bytes:
    payload = rng.randbytes(rng.choice((0, 5, 125, 126, 300, 70000)))
    opcode = rng.randrange(16)
    masked = rng.randrange(4) != 0
    try:
        frame = ws.encode_frame(opcode, payload, fin=bool(rng.randrange(2)), mask=rng.randbytes(4) if masked else None)
    except ValueError:  # a control frame too long or fragmented: send it anyway, by hand
        frame = bytes((opcode, 0x80 | min(len(payload), 125))) + bytes(4) + payload[:125]
    return mutate(rng, frame) if rng.randrange(3) == 0 else frame


def fuzz_head(port, src, rng):
    return send_tls(port, src, mutate(rng, rng.choice((derp_upgrade(port), ws_upgrade(port)))), half_close=True)


def fuzz_client_info(port, src, rng):
    # Mostly the box and its JSON; sometimes the header too (then the server waits for bytes
    # that never come until its 10 s handshake deadline).
    def rewrite(frame: bytes) -> bytes:
        if rng.randrange(10) == 0:
            return mutate(rng, frame)
        return encode_frame(FrameType.CLIENT_INFO, mutate(rng, frame[5:]))

    conn, _ = dial(port, PrivateKey.generate(), source_ip=src, rewrite_client_info=rewrite)
    conn.close()
    return "accepted", 0


def fuzz_frames(port, src, rng):
    conn, _ = dial(port, PrivateKey.generate(), source_ip=src)
    data = b"".join(random_frame(rng) for _ in range(rng.randint(1, 20)))
    conn.sendall(data)
    conn.sock.shutdown(socket.SHUT_WR)
    return finish(conn.sock, conn), len(data)


def fuzz_ws(port, src, rng):
    frames = b"".join(random_ws_frame(rng) for _ in range(rng.randint(1, 10)))
    return send_tls(port, src, ws_upgrade(port) + frames, half_close=True)


FUZZ = {"head": fuzz_head, "client-info": fuzz_client_info, "frames": fuzz_frames, "ws-frames": fuzz_ws}


def churn_cycle(port, src, reset: bool):
    conn, _ = dial(port, PrivateKey.generate(), source_ip=src)
    if reset:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    conn.sock.close()
    return "done", 0


def admitted(port, mode: str):
    try:
        conn, _ = dial(port, PrivateKey.generate(), source_ip=admission_source(mode))
    except ConnectionError:
        return "rejected", 0
    conn.sock.close()
    return "admitted", 0


# (variant, case function) lists; case i runs variant i modulo the length.
CASES = {
    "malformed": list(MALFORMED.items()),
    "fuzz": list(FUZZ.items()),
    "churn": [("close", lambda port, src, rng: churn_cycle(port, src, False))] * 3
    + [("reset", lambda port, src, rng: churn_cycle(port, src, True))],
    "admission": [(mode, lambda port, src, rng, mode=mode: admitted(port, mode)) for mode in ADMISSION_MODES],
}


def cases_main(attack: str, port: int, indexes: range, threads: int, deadline: float, seed: int, pipe) -> None:
    """Runs one case per index (variant = index modulo the variants) on ``threads`` threads;
    none starts after ``deadline``."""
    variants = CASES[attack]
    lock = threading.Lock()
    by_variant: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals = {"connections": 0, "bytes_sent": 0}

    def work(ids):
        for i in ids:
            if time.monotonic() > deadline:
                return
            name, case = variants[i % len(variants)]
            rng = random.Random(seed * 1_000_003 + i)
            try:
                outcome, nbytes = case(port, source_ip(attack, i), rng)
            except CLIENT_ERRORS as e:
                outcome, nbytes = outcome_of(e), 0
            with lock:
                by_variant[name][outcome] += 1
                totals["connections"] += 1
                totals["bytes_sent"] += nbytes

    workers = [threading.Thread(target=work, args=(indexes[t::threads],)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    pipe.send({**totals, "by_variant": {k: dict(v) for k, v in by_variant.items()}})


# --- held connections -----------------------------------------------------------------


def hold_main(attack: str, port: int, indexes: range, deadline: float, pipe) -> None:
    """Handshaken DERP clients that never read or write again, until the parent (or the
    deadline) releases them; then how many the server had closed."""
    socks, keys, errors = [], [], collections.Counter()
    for i in indexes:
        if time.monotonic() > deadline:
            break
        key = PrivateKey.generate()
        try:
            conn, _ = dial(port, key, source_ip=source_ip(attack, i))
        except CLIENT_ERRORS as e:
            errors[outcome_of(e)] += 1
            continue
        # Only the socket stays: its TLS state is dropped (nothing more is sent or decrypted).
        socks.append(conn.sock)
        keys.append(bytes(key.public_key))
    pipe.send({"opened": len(socks), "errors": dict(errors), "keys": keys})
    pipe.poll(max(0.0, deadline - time.monotonic()))
    closed = sum(closed_now(s) for s in socks)
    for s in socks:
        s.close()
    pipe.send({"closed_by_server": closed})


def flood_main(attack: str, port: int, dst_keys: list[bytes], pps: int, seconds: float, pipe) -> None:
    """Two connections sending 1200-byte packets round-robin to ``dst_keys`` at ``pps`` in total."""
    conns = [dial(port, PrivateKey.generate(), source_ip=source_ip(attack, 1000 + n))[0] for n in range(2)]
    for conn in conns:
        conn.sock.settimeout(5)
    frames = [send_packet_frame(k, bytes(FLOOD_PACKET)) for k in dst_keys]
    pipe.send("ready")
    started = time.monotonic()
    sent = nbytes = 0
    errors = collections.Counter()
    while conns and (now := time.monotonic()) < started + seconds:
        due = min(int((now - started) * pps) - sent, 512)
        for conn in list(conns):
            n = due // len(conns)
            batch = b"".join(frames[(sent + j) % len(frames)] for j in range(n))
            try:
                conn.sendall(batch)
            except CLIENT_ERRORS as e:
                errors[outcome_of(e)] += 1
                conns.remove(conn)
                continue
            sent += n
            nbytes += len(batch)
        time.sleep(FLOOD_SLICE)
    for conn in conns:
        conn.close()
    pipe.send({"packets": sent, "bytes": nbytes, "errors": dict(errors)})


def trickle_open(variant: str, port: int, src: str):
    """(raw socket, send function, bytes to trickle) for one trickling connection."""
    if variant == "tls-hello":
        sock = tcp(port, src)
        return sock, sock.sendall, client_hello()
    if variant == "ws-frame":
        client = DERPClient.connect(f"https://127.0.0.1:{port}/derp", websocket=True, source=(src, 0), timeout=30)
        return client.stream.sock, client.stream.sendall, ws.encode_masked_binary(
            send_packet_frame(os.urandom(32), bytes(100)))
    if variant == "derp-frame":
        conn, _ = dial(port, PrivateKey.generate(), source_ip=src)
        return conn.sock, conn.sendall, send_packet_frame(os.urandom(32), bytes(100))
    conn = tls(port, src)
    if variant == "head":
        return conn.sock, conn.sendall, derp_upgrade(port)
    conn.sendall(b"POST /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")  # "body"
    return conn.sock, conn.sendall, bytes(100000)


TRICKLE = ("tls-hello", "head", "body", "derp-frame", "ws-frame")


def trickle_main(port: int, indexes: range, hold: float, deadline: float, pipe) -> None:
    conns = []  # [variant, sock, send, payload, sent, opened_at, closed_at]
    errors = collections.Counter()
    for i in indexes:
        variant = TRICKLE[i % len(TRICKLE)]
        try:
            conns.append([variant, *trickle_open(variant, port, source_ip("trickle", i)), 0, time.monotonic(), None])
        except CLIENT_ERRORS as e:
            errors[f"{variant}: {outcome_of(e)}"] += 1
    pipe.send("ready")
    until = min(deadline, time.monotonic() + hold)
    nbytes = 0
    while (now := time.monotonic()) < until:
        for c in conns:
            if c[6] is not None:
                continue
            if closed_now(c[1]):
                c[6] = now
            elif c[4] < len(c[3]):
                try:
                    c[2](c[3][c[4]:c[4] + 1])
                    c[4] += 1
                    nbytes += 1
                except CLIENT_ERRORS:
                    c[6] = now
        if all(c[6] is not None for c in conns):
            break
        time.sleep(max(0.0, min(until, now + TRICKLE_INTERVAL) - time.monotonic()))
    variants = {}
    for c in conns:
        if c[6] is None and closed_now(c[1]):
            c[6] = time.monotonic()
        v = variants.setdefault(c[0], {"opened": 0, "closed_by_server": 0, "seconds_to_close": []})
        v["opened"] += 1
        if c[6] is not None:
            v["closed_by_server"] += 1
            v["seconds_to_close"].append(round(c[6] - c[5], 1))
        c[1].close()
    pipe.send({"bytes_sent": nbytes, "variants": variants, "errors": dict(errors)})


# --- the steady pair ------------------------------------------------------------------


def pair_main(url: str, deadline: float, pipe) -> None:
    """One numbered packet at a time from a to b, each waited for up to PAIR_LOSS_WAIT."""
    a, b = DERPClient.connect(url), DERPClient.connect(url)
    pipe.send("ready")
    sent = received = late = 0
    delays = array.array("d")
    error = None
    try:
        while not pipe.poll(0) and time.monotonic() < deadline:
            started = time.monotonic()
            a.send_packet(b.public_key, sent.to_bytes(4, "big"))
            seq, sent = sent, sent + 1
            while (left := started + PAIR_LOSS_WAIT - time.monotonic()) > 0:
                try:
                    _, data = b.recv_packet(timeout=left)
                except TimeoutError:
                    break
                if int.from_bytes(data, "big") == seq:
                    received += 1
                    delays.append(time.monotonic() - started)
                    break
                late += 1  # one counted lost before, arriving now
            time.sleep(PAIR_INTERVAL)
    except CLIENT_ERRORS as e:
        error = f"{type(e).__name__}: {e}"
    a.close()
    b.close()
    pipe.send({"sent": sent, "received": received, "late": late, "delays": delays.tobytes(), "error": error})
    pipe.poll(max(0.0, deadline - time.monotonic()))  # the parent's "stop", if an error came first


# --- the bench's admission server -----------------------------------------------------

ALLOW = b'HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{"Allow":true}'


def admission_conn(sock: socket.socket) -> None:
    """One keep-alive connection from derpbox: every request answered by its client's mode
    (the client's source address names it; any other client is allowed at once)."""
    modes = {admission_source(m): m for m in ADMISSION_MODES}
    sock.settimeout(60)
    buf = b""
    with sock:
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            while length and len(buf) < int(length[1]):
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:int(length[1]) if length else 0], buf[int(length[1]) if length else 0:]
            try:
                mode = modes.get(json.loads(body).get("Source", ""))
            except ValueError:
                mode = None
            if mode in ("hang", "stalled-body"):
                if mode == "stalled-body":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"Allow\":")
                time.sleep(ADMISSION_STALL)
                return
            if mode == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                return
            if mode == "slow-allow":
                time.sleep(ADMISSION_SLOW)
            sock.sendall({"error-500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
                          "not-json": b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>ok</html>"}.get(mode, ALLOW))


def admission_main(pipe) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    srv.settimeout(0.5)
    pipe.send(srv.getsockname()[1])
    while not pipe.poll(0):  # the parent's "stop", or its end (EOF)
        try:
            sock, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=admission_conn, args=(sock,), daemon=True).start()


# --- the parent: server, samples, attacks ----------------------------------------------


class Soak:
    def __init__(self, args, server: dict, metrics_port: int, log_path: Path):
        self.args = args
        self.server = server
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.port = server["port"]
        self.url = f"https://127.0.0.1:{self.port}/derp"
        self.highest = {"rss_kib": 0, "fds": 0}

    def count(self, attack: str) -> int:
        if attack == "fragments":
            return FULL_SCALE[attack]
        return max(1, round(FULL_SCALE[attack] * self.args.scale))

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return parse_metrics(r.read().decode())

    def sample(self) -> dict:
        pid = self.server["pid"]
        taken = {"rss_kib": rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": cpu_seconds(pid),
                 "metrics": self.metrics()}
        for k in self.highest:
            self.highest[k] = max(self.highest[k], taken[k])
        return taken

    def track(self) -> None:
        """Keeps the highest RSS and open-file count seen during the attack (sampled each second)."""
        pid = self.server["pid"]
        try:
            self.highest["rss_kib"] = max(self.highest["rss_kib"], rss_kib(pid))
            self.highest["fds"] = max(self.highest["fds"], len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass  # the server has exited (sigterm)

    def expect(self, pipe, proc, timeout: float):
        """derpbench.expect, sampling the server meanwhile."""
        deadline = time.monotonic() + timeout
        while not pipe.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            self.track()
            if time.monotonic() >= deadline:
                break
        return expect(pipe, proc, 0)

    def pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.track()
            time.sleep(min(1.0, left))

    def settle(self) -> float:
        """Waits (bounded) until the server holds no client, then --settle seconds; the wait."""
        started = time.monotonic()
        while self.metrics().get("derp_current_connections", 0) > 0 and time.monotonic() < started + 60:
            time.sleep(0.2)
        waited = time.monotonic() - started
        time.sleep(self.args.settle)
        return waited

    def deadline(self) -> float:
        return time.monotonic() + self.args.attack_timeout

    def split(self, n: int, procs: int) -> list[range]:
        return [range(p, n, procs) for p in range(min(n, procs))]

    # Each attack returns its own numbers: connections, closed_by_server, bytes_sent, and details.
    # ``loaded`` is called once while the attack is at full strength (not by the one-shot cases).

    def cases(self, attack: str, loaded) -> dict:
        n, deadline = self.count(attack), self.deadline()
        threads = 64 if attack == "admission" else self.args.threads
        procs = 1 if attack == "admission" else self.args.procs
        runs = [start(cases_main, attack, self.port, r, threads, deadline, self.args.seed)
                for r in self.split(n, procs)]
        answers = [self.expect(pipe, proc, self.args.attack_timeout + 60) for proc, pipe in runs]
        for proc, _ in runs:
            proc.join(10)
        by_variant: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for a in answers:
            for k, v in a["by_variant"].items():
                by_variant[k].update(v)
        outcomes = sum(by_variant.values(), collections.Counter())
        return {"connections": sum(a["connections"] for a in answers), "planned": n,
                "closed_by_server": outcomes["closed"] + outcomes["reset"] + outcomes["rejected"],
                "bytes_sent": sum(a["bytes_sent"] for a in answers), "outcomes": dict(outcomes),
                "by_variant": {k: dict(v) for k, v in sorted(by_variant.items())}}

    def hold(self, attack: str, n: int):
        holders = [start(hold_main, attack, self.port, r, self.deadline()) for r in self.split(n, self.args.procs * 2)]
        opened = [self.expect(pipe, proc, self.args.attack_timeout + 60) for proc, pipe in holders]
        return holders, opened

    def release(self, holders) -> int:
        for _, pipe in holders:
            pipe.send("release")
        closed = sum(self.expect(pipe, proc, 120)["closed_by_server"] for proc, pipe in holders)
        for proc, _ in holders:
            proc.join(10)
        return closed

    def held(self, opened: list[dict], closed: int, **extra) -> dict:
        errors = sum((collections.Counter(o["errors"]) for o in opened), collections.Counter())
        return {"connections": sum(o["opened"] for o in opened), "planned": sum(o["opened"] for o in opened)
                + sum(errors.values()), "closed_by_server": closed, "bytes_sent": 0, "errors": dict(errors), **extra}

    def idle(self, attack: str, loaded) -> dict:
        holders, opened = self.hold(attack, self.count(attack))
        loaded()
        self.pause(self.args.hold)
        return self.held(opened, self.release(holders))

    def flood(self, attack: str, keys: list[bytes], seconds: float):
        return start(flood_main, attack, self.port, keys, self.args.flood_pps, seconds)

    def slow_readers(self, attack: str, loaded) -> dict:
        holders, opened = self.hold(attack, self.count(attack))
        proc, pipe = self.flood(attack, [k for o in opened for k in o["keys"]], self.args.hold)
        self.expect(pipe, proc, 60)
        self.pause(self.args.hold / 2)
        loaded()
        flood = self.expect(pipe, proc, self.args.hold + 60)
        proc.join(10)
        return {**self.held(opened, self.release(holders), flood=flood), "bytes_sent": flood["bytes"]}

    def trickle(self, attack: str, loaded) -> dict:
        runs = [start(trickle_main, self.port, r, self.args.hold, self.deadline())
                for r in self.split(self.count(attack), self.args.procs)]
        for proc, pipe in runs:
            self.expect(pipe, proc, self.args.attack_timeout + 60)
        loaded()
        answers = [self.expect(pipe, proc, self.args.hold + TRICKLE_INTERVAL + 120) for proc, pipe in runs]
        variants: dict[str, dict] = {}
        for a in answers:
            for name, v in a["variants"].items():
                into = variants.setdefault(name, {"opened": 0, "closed_by_server": 0, "seconds_to_close": []})
                for k in into:
                    into[k] += v[k]
        summary = {name: {"opened": v["opened"], "closed_by_server": v["closed_by_server"],
                          "median_s_to_close": percentile(v["seconds_to_close"], 0.5),
                          "max_s_to_close": max(v["seconds_to_close"], default=None)} for name, v in variants.items()}
        errors = sum((collections.Counter(a["errors"]) for a in answers), collections.Counter())
        return {"connections": sum(v["opened"] for v in variants.values()), "planned": self.count(attack),
                "closed_by_server": sum(v["closed_by_server"] for v in variants.values()),
                "bytes_sent": sum(a["bytes_sent"] for a in answers), "by_variant": summary, "errors": dict(errors)}

    def fragments(self, attack: str, loaded) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
        procs = {mode: subprocess.Popen([sys.executable, "-m", "tests.loadgen", self.url, mode, str(self.args.hold)],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
                 for mode in ("ws-tiny-frames", "tls-tiny-records")}
        self.pause(self.args.hold / 2)
        loaded()
        results = {}
        for mode, proc in procs.items():
            out, _ = proc.communicate(timeout=self.args.hold + 60)
            ok = proc.returncode == 0 and out
            results[mode] = json.loads(out.splitlines()[-1]) if ok else {"exit": proc.returncode}
        return {"connections": len(procs), "planned": len(procs),
                "closed_by_server": sum(bool(r.get("closed")) for r in results.values()),
                "bytes_sent": sum(r.get("sent", 0) for r in results.values()), "by_variant": results}

    def sigterm(self, attack: str, loaded) -> dict:
        holders, opened = self.hold(attack, self.count(attack))
        proc, pipe = self.flood(attack, [k for o in opened for k in o["keys"]], self.args.attack_timeout)
        self.expect(pipe, proc, 60)
        self.pause(2)
        loaded()
        server = self.server["proc"]
        sent_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = f"killed after 60 s ({server.wait()})"
        exit_s = time.monotonic() - sent_at
        flood = self.expect(pipe, proc, 60)
        proc.join(10)
        closed = self.release(holders)
        return {**self.held(opened, closed, flood=flood, exit_code=code, seconds_to_exit=round(exit_s, 2)),
                "bytes_sent": flood["bytes"]}

    def run(self, attack: str) -> dict:
        runner = {"malformed": self.cases, "fuzz": self.cases, "churn": self.cases, "admission": self.cases,
                  "trickle": self.trickle, "idle": self.idle, "slow-readers": self.slow_readers,
                  "fragments": self.fragments, "sigterm": self.sigterm}[attack]
        log_start = self.log_path.stat().st_size
        pair_proc, pair_pipe = start(pair_main, self.url, self.deadline() + 120)
        expect(pair_pipe, pair_proc, 60)
        before = self.sample()
        self.highest = {"rss_kib": before["rss_kib"], "fds": before["fds"]}
        samples = {}
        started = time.monotonic()
        result = runner(attack, lambda: samples.setdefault("loaded", self.sample()))
        duration = time.monotonic() - started
        samples["highest"] = self.highest
        if attack != "sigterm":
            samples["after"] = self.sample()
        pair_pipe.send("stop")
        pair = expect(pair_pipe, pair_proc, 60)
        pair_proc.join(10)
        if attack != "sigterm":
            result["seconds_to_no_clients"] = round(self.settle(), 1)
            samples["settled"] = self.sample()
        delays = array.array("d", pair["delays"])
        last = samples.get("settled", samples.get("loaded", before))
        log = self.log_path.read_bytes()[log_start:].decode(errors="replace").splitlines()
        return {
            "attack": attack, "count": self.count(attack), "description": DESCRIPTIONS[attack],
            "duration_s": round(duration, 1), "result": result,
            "pair": {"sent": pair["sent"], "received": pair["received"], "lost": pair["sent"] - pair["received"],
                     "late": pair["late"], "error": pair["error"],
                     **{f"{k}_ms": None if (v := percentile(delays, q)) is None else round(v * 1000, 2)
                        for k, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}},
            "server": {"before": {k: v for k, v in before.items() if k != "metrics"},
                       **{name: {k: v for k, v in s.items() if k != "metrics"} for name, s in samples.items()}},
            "server_cpu_s": round(last["cpu_s"] - before["cpu_s"], 2),
            "counters_moved": moved(before["metrics"], last["metrics"]),
            "log": {"lines": len(log), "warn": sum(bool(LOG_WARN.search(x)) for x in log),
                    "error": sum(bool(LOG_ERROR.search(x)) for x in log),
                    "first_errors": [x[:300] for x in log if LOG_ERROR.search(x)][:5],
                    "first_warnings": sorted({x.split(" ", 1)[-1][:300]  # without the timestamp: one per kind
                                              for x in log if LOG_WARN.search(x)})[:5]},
        }


# --- report ---------------------------------------------------------------------------


SAMPLES = ("before", "loaded", "highest", "after", "settled")


def mib(sample: dict | None) -> str:
    return "-" if sample is None else f"{sample['rss_kib'] / 1024:.1f}"


def fds(sample: dict | None) -> str:
    return "-" if sample is None else str(sample["fds"])


def number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


def report(res: dict) -> str:
    out = report_head(f"derpbox attack and soak ({res['started']})", res)
    out += [f"- scale: {res['scale']} (full scale = 1), hold {res['hold']} s, settle {res['settle']} s, "
            f"flood {res['flood_pps']} packets/s, seed {res['seed']}",
            f"- server: `{shlex.join(res['server_cmd'])}`, fd limit (soft/hard) {res['nofile']}",
            "- admission controller: " + ("the bench's own (every client of the run is checked)" if res["admission"]
                                          else "none"),
            "", "Steady pair: one 4-byte packet at a time between two clients on the same server, every 2 ms, "
            f"each waited for up to {PAIR_LOSS_WAIT:g} s (else lost); round trip = send to receipt. RSS/fds: "
            "before the attack; loaded (once, with the attack at full strength: held, trickling and flooding "
            "attacks); the highest seen in 1 s samples; right after the attack; settled (no clients left, then "
            "--settle s). srv CPU and counters moved: from before to settled (to loaded for sigterm). "
            "See bench/README.md.", "",
            "| attack | count | s | conns | closed by server | bytes sent | pair sent | lost | p50 ms | p99 ms "
            "| max ms "
            "| RSS MiB before / loaded / highest / after / settled | fds before / loaded / highest / after / settled "
            "| srv CPU s | log warn/error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["attacks"]:
        s, p, a = r["server"], r["pair"], r["result"]
        out.append(
            f"| {r['attack']} | {r['count']} | {r['duration_s']} | {a['connections']} | {a['closed_by_server']} "
            f"| {a['bytes_sent']} | {p['sent']} | {p['lost']} | {fmt(p['p50_ms'], '.2f')} | {fmt(p['p99_ms'], '.2f')} "
            f"| {fmt(p['max_ms'], '.1f')} | {' / '.join(mib(s.get(k)) for k in SAMPLES)} "
            f"| {' / '.join(fds(s.get(k)) for k in SAMPLES)} | {r['server_cpu_s']} "
            f"| {r['log']['warn']}/{r['log']['error']} |")
    if res.get("failed"):
        out += ["", f"**The run stopped early**: {res['failed']}"]
    for r in res["attacks"]:
        a = r["result"]
        out += ["", f"## {r['attack']}", "", r["description"] + ".", ""]
        details = {k: v for k, v in a.items() if k not in ("connections", "closed_by_server", "bytes_sent",
                                                           "by_variant", "planned")}
        out += [f"- planned {a['planned']}, made {a['connections']}; " + ", ".join(f"{k}: {json.dumps(v)}"
                                                                                for k, v in details.items())]
        if r["pair"]["error"] or r["pair"]["late"]:
            out.append(f"- pair: {r['pair']['late']} late packets, error {r['pair']['error']}")
        for name, v in a.get("by_variant", {}).items():
            out.append(f"- {name}: {json.dumps(v)}")
        out += ["", f"| counter | before | {'loaded' if r['attack'] == 'sigterm' else 'settled'} | change |",
                "|---|---|---|---|"]
        out += [f"| {k} | {number(b)} | {number(x)} | {'+' if x >= b else ''}{number(x - b)} |"
                for k, (b, x) in r["counters_moved"].items()]
        log = r["log"]
        out += ["", f"Server log: {log['lines']} lines, {log['warn']} warnings, {log['error']} errors."]
        out += [f"    {line}" for line in log["first_warnings"] + log["first_errors"]]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of full scale, e.g. 0.02 (default 1)")
    ap.add_argument("--only", default="", help=f"comma-separated attacks, in this order: {','.join(ATTACKS)}")
    ap.add_argument("--hold", type=float, default=40.0,
                    help="seconds trickling, idle and flooded connections are held (default 40: past the "
                         "server's 30 s request deadline)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after an attack before the settled sample")
    ap.add_argument("--flood-pps", type=int, default=20000, help="packets/s the flooders send (default 20000)")
    ap.add_argument("--procs", type=int, default=2, help="attacker processes (holders: twice as many; default 2)")
    ap.add_argument("--threads", type=int, default=32,
                    help="connections in flight per attacker process (default 32)")
    ap.add_argument("--attack-timeout", type=float, default=1800.0, help="no attack starts work after this (s)")
    ap.add_argument("--seed", type=int, default=1, help="fuzzing seed")
    ap.add_argument("--derpbox-args", default="", help="extra derpbox flags")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args()
    attacks = [a for a in ATTACKS if not args.only or a in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(ATTACKS) - {""}
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; choose from {','.join(ATTACKS)}")
    if not 0 < args.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    raise_nofile()  # inherited by every attacker process

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{started}-soak-derpbox.log"
    res = {"started": started, "command": shlex.join([sys.executable, *sys.argv]),
           "machine": machine_info(default_tailcat()), "scale": args.scale, "hold": args.hold,
           "settle": args.settle, "flood_pps": args.flood_pps, "seed": args.seed,
           "admission": "admission" in attacks, "attacks": []}
    admission = None
    metrics_port = free_port()
    extra = ["-metrics-addr", f"127.0.0.1:{metrics_port}", *shlex.split(args.derpbox_args)]
    if res["admission"]:
        admission = start(admission_main)
        extra += ["-verify-client-url", f"http://127.0.0.1:{expect(admission[1], admission[0], 30)}/verify"]
    with tempfile.TemporaryDirectory(prefix="attacksoak-") as tmp, open(log_path, "wb") as log:
        server = start_derpbox(Path(tmp), log, shlex.join(extra))
        res["server_cmd"], res["nofile"] = server["cmd"], nofile_limit(server["pid"])
        soak = Soak(args, server, metrics_port, log_path)
        try:
            for attack in attacks:
                print(f"{attack}: {soak.count(attack)} ...", file=sys.stderr, flush=True)
                try:
                    row = soak.run(attack)
                except Exception as e:  # noqa: BLE001 - the attacks done so far are still worth a report
                    res["failed"] = f"{attack}: {e!r}"
                    print(f"{attack} failed: {e!r}", file=sys.stderr, flush=True)
                    break
                res["attacks"].append(row)
                p, a = row["pair"], row["result"]
                print(f"{attack}: {row['duration_s']} s, {a['connections']} conns, {a['closed_by_server']} closed "
                      f"by server; pair lost {p['lost']} of {p['sent']}, p99 {fmt(p['p99_ms'], '.2f')} ms",
                      file=sys.stderr, flush=True)
        finally:
            if attacks[-1:] != ["sigterm"] and server["proc"].poll() is not None:
                res["failed"] = res.get("failed", "") + f" (the server exited with {server['proc'].returncode})"
            stop(server)
            if admission is not None:
                admission[1].send("stop")
                admission[0].join(10)
    save_report(args.out, started, "-soak", res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
