"""The cost of workers: CPU per delivered packet with 2 workers against 1, and of the hop.

The kernel spreads connections over a node's workers (SO_REUSEPORT, by a hash of the
4-tuple), so a pair's packets cross between workers, through one internal ForwardPacket,
about half the time. To tell what the hop costs from what a second process costs, this
bench places every connection itself: it finds source ports that land on each worker
(probing, as the hash is salted per boot) and dials from them. Configurations, each with
a fresh node, alternating, `--repeat` times:

    1-worker   derpbox -workers 1, the pairs as the kernel places them (the baseline)
    2-local    -workers 2, each pair's sender and receiver on the same worker (2 pairs each)
    2-cross    -workers 2, every pair's sender on one worker and its receiver on the other
    2-kernel   -workers 2, as the kernel places them (what a node sees)

Each configuration runs every paced rate, then a flat-out row (senders write as fast as
the node reads): the saturation rate, with the load generator's own CPU beside it, as the
generator competes with the workers for this machine's cores (`--no-flat-out` skips it).

    python bench/workerbench.py --rates 10000,20000 --duration 6 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import re
import shlex
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import derpbench
from derpbench import (BENCH_DIR, fmt, machine_info, median, raise_nofile, report_head, run_load, save_report,
                       start_derpbox, stop)
from nacl.public import PrivateKey

CONFIGS = ("1-worker", "2-local", "2-cross", "2-kernel")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.unix_path)


def worker_vars(mesh_dir: str, index: int) -> dict:
    """One worker's own figures, from its internal socket (which answers /debug/ for this user)."""
    conn = UnixHTTPConnection(f"{mesh_dir}/worker{index}.sock")
    conn.request("GET", "/debug/vars?scope=worker")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def connections(mesh_dir: str, workers: int) -> list[int]:
    return [worker_vars(mesh_dir, i)["derp_current_connections"] for i in range(workers)]


# Source ports to probe, never twice in a run: a row's connections leave theirs in TIME_WAIT.
_PORTS = iter(range(40000, 60000))


def crossing(mesh_dir: str) -> tuple[int, int]:
    """(packets forwarded between the workers, packets received from clients) so far."""
    parts = [worker_vars(mesh_dir, i) for i in range(2)]
    return (sum(p["derp_packets_forwarded_out"] for p in parts),
            sum(p["derp_packets_received"] for p in parts))


def find_ports(server: dict, mesh_dir: str, workers: int, wanted: int) -> list[list[int]]:
    """``wanted`` source ports per worker: a probe connection from each lands on one worker."""
    found: list[list[int]] = [[] for _ in range(workers)]
    while min(len(p) for p in found) < wanted:
        sport = next(_PORTS)
        before = connections(mesh_dir, workers)
        try:
            conn, _ = derpbench.dial(server["port"], PrivateKey.generate(), sport)
        except OSError:
            continue  # the port is in use
        deadline = time.monotonic() + 5
        while (after := connections(mesh_dir, workers)) == before:
            assert time.monotonic() < deadline, "no worker registered the probe"
            time.sleep(0.01)
        landed = next(i for i in range(workers) if after[i] > before[i])
        # Reset, not FIN: the port is reused at once for the real connection (no TIME_WAIT).
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        if len(found[landed]) < wanted:
            found[landed].append(sport)
        while connections(mesh_dir, workers) != before:
            time.sleep(0.01)
    return found


def placement(config: str, ports: list[list[int]], pairs: int) -> tuple[list[int], list[int]]:
    """The senders' and the receivers' source ports: pair i's sender on worker i % 2, its
    receiver on the same worker (2-local) or the other (2-cross)."""
    other = 0 if config == "2-local" else 1
    return ([ports[i % 2][i // 2] for i in range(pairs)],
            [ports[(i + other) % 2][pairs // 2 + i // 2] for i in range(pairs)])


def run_config(config: str, rates: list[int], args, out: Path, started: str) -> list[dict]:
    workers = 1 if config == "1-worker" else 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="workerbench-") as tmp, \
            open(out / f"{started}-workers-{config}.log", "ab") as log:
        start = log.tell()  # this node's lines: the log gathers every run of the configuration
        server = start_derpbox(Path(tmp), log, f"-workers {workers}")
        try:
            if workers == 2:
                text = ""
                deadline = time.monotonic() + 30
                while not (m := re.search(r"internal mesh sockets in (\S+)", text)) or text.count("connected to") < 2:
                    assert time.monotonic() < deadline, "the workers did not mesh"
                    time.sleep(0.1)
                    text = Path(log.name).read_bytes()[start:].decode(errors="replace")
                mesh_dir = m[1]
            for rate in [*rates, *([] if args.no_flat_out else [None])]:
                place = None
                if config in ("2-local", "2-cross"):
                    place = placement(config, find_ports(server, mesh_dir, 2, args.pairs), args.pairs)
                before = crossing(mesh_dir) if workers == 2 else None
                row = run_load(server, args.pairs, rate, args, source_ports=place)
                if before is not None:
                    after = crossing(mesh_dir)
                    row["crossing_share"] = (after[0] - before[0]) / max(1, after[1] - before[1])
                row["config"] = config
                rows.append(row)
                print(f"{config:9} {f'{rate}/s' if rate else 'flat-out':>8}: delivered {row['delivered_pps']:.0f} pps, "
                      f"loss {fmt(row['loss_pct'], '.2f')} %, {fmt(row['server_cpu_s_per_Mpkt'], '.2f')} CPU s/Mpkt",
                      file=sys.stderr, flush=True)
        finally:
            stop(server)
    return rows


def report(res: dict) -> str:
    out = report_head(f"derpbox workers: 2 against 1 ({res['started']})", res)
    out += ["", f"{res['pairs']} pairs, 1200-byte packets over TLS, {res['duration']} s measured per row, "
            f"{res['repeat']} runs per configuration (alternating); medians. Server CPU is the supervisor "
            "and its workers together. crossing = the share of the row's packets (warm-up and drain "
            "included) that took the hop between the workers.", ""]
    out += ["| rate/sender | config | crossing | CPU s/Mpkt (runs) | median | x 1-worker | p50 ms | p99 ms | loss % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for rate in res["rates"]:
        base = median([r for r in res["rows"] if r["config"] == "1-worker" and r["rate_per_sender"] == rate],
                      "server_cpu_s_per_Mpkt")
        for config in res["configs"]:
            rows = [r for r in res["rows"] if r["config"] == config and r["rate_per_sender"] == rate]
            cpu = median(rows, "server_cpu_s_per_Mpkt")
            runs = ", ".join(fmt(r["server_cpu_s_per_Mpkt"], ".2f") for r in rows)
            share = median(rows, "crossing_share")
            out.append(f"| {rate} | {config} | {'-' if share is None else f'{share:.0%}'} | {runs} | {fmt(cpu, '.2f')} | "
                       f"{fmt(cpu / base if cpu and base else None, '.2f')} | {fmt(median(rows, 'p50_ms'), '.2f')} | "
                       f"{fmt(median(rows, 'p99_ms'), '.2f')} | {fmt(median(rows, 'loss_pct'), '.3f')} |")
    flat = [r for r in res["rows"] if r["rate_per_sender"] is None]
    if flat:
        out += ["", "**Flat out** (saturation): senders write 64-packet batches as fast as the node reads "
                "them. On a 2-core machine the generator needs a core of its own, so the workers share "
                "what it leaves: read the generator's CPU beside the rate.", "",
                "| config | crossing | delivered pps (runs) | median | x 1-worker | server CPU s | gen CPU s | "
                "CPU s/Mpkt | loss % |", "|---|---|---|---|---|---|---|---|---|"]
        base = median([r for r in flat if r["config"] == "1-worker"], "delivered_pps")
        for config in res["configs"]:
            rows = [r for r in flat if r["config"] == config]
            if not rows:
                continue
            pps = median(rows, "delivered_pps")
            share = median(rows, "crossing_share")
            out.append(f"| {config} | {'-' if share is None else f'{share:.0%}'} | "
                       f"{', '.join(fmt(r['delivered_pps'], '.0f') for r in rows)} | {fmt(pps, '.0f')} | "
                       f"{fmt(pps / base if pps and base else None, '.2f')} | {fmt(median(rows, 'server_cpu_s'), '.2f')} | "
                       f"{fmt(median(rows, 'generator_cpu_s'), '.2f')} | {fmt(median(rows, 'server_cpu_s_per_Mpkt'), '.2f')} | "
                       f"{fmt(median(rows, 'loss_pct'), '.3f')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs, even (default 4)")
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--drain", type=float, default=1)
    ap.add_argument("--rates", default="10000,20000")
    ap.add_argument("--slice-ms", type=float, default=1)
    ap.add_argument("--no-flat-out", action="store_true", help="skip the flat-out rows")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration, alternating (default 3)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args()
    if args.pairs % 2:
        ap.error("--pairs must be even (half the pairs on each worker)")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    configs = [c for c in args.configs.split(",") if c]
    raise_nofile()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"started": started, "command": shlex.join([sys.executable, *sys.argv]),
           "machine": machine_info(derpbench.default_tailcat()), "pairs": args.pairs, "duration": args.duration,
           "repeat": args.repeat, "rates": rates, "configs": configs, "rows": []}
    for _ in range(args.repeat):
        for config in configs:
            res["rows"] += run_config(config, rates, args, args.out, started)
    save_report(args.out, started, "-workers", res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
