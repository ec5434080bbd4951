"""The mesh row: one pair split across two meshed nodes against the same pair on one node.

Senders connect to node A and receivers to node B, so every packet crosses the mesh in
one ForwardPacket hop; CPU per delivered packet is measured on each node, beside the
p99 one-way latency. Configurations, in one run, each with fresh processes:

    derpbox          both ends on one derpbox node (the baseline)
    derpbox-derpbox  two meshed derpbox nodes
    derpbox-derper   senders on derpbox, receivers on Tailscale's derper
    derper-derpbox   senders on derper, receivers on derpbox
    derper           both ends on one derper node
    derper-derper    two meshed derpers (the reference)

Everything is on 127.0.0.1 with a throwaway CA and a certificate for 127.0.0.1, which
both servers verify their mesh peers against (derpbox -mesh-ca-file, derper
SSL_CERT_FILE). Needs Tailscale's derper: --derper or DERPER_BIN (../shared/goref/derper).

    python bench/meshbench.py --rates 5000,10000 --duration 10 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import derpbench
from derpbench import (BENCH_DIR, default_derper, fmt, free_port, machine_info, median, raise_nofile, report_head,
                       run_load, save_report, server_flags, spread, stop, wait_listening)

sys.path.insert(0, str(BENCH_DIR.parent))
from tests.certs import make_cert  # noqa: E402  (the repository's own throwaway CA)

MESH_KEY = os.urandom(32).hex()
CONFIGS = ("derpbox", "derpbox-derpbox", "derpbox-derper", "derper-derpbox", "derper", "derper-derper")


def start_node(kind: str, tmp: Path, certs: Path, ports: list[int], index: int, log, derper: str) -> dict:
    """Node ``index`` of a region listening on ``ports[index]``, meshed with all of ``ports``."""
    port = ports[index]
    mesh = ",".join(f"127.0.0.1:{p}" for p in ports)
    home = tmp / f"{kind}{index}"
    home.mkdir()
    key_file = tmp / "mesh.key"
    key_file.write_text(MESH_KEY + "\n")
    common = server_flags(port, certs, home / "derper.key")
    if len(ports) > 1:
        common += ["-mesh-psk-file", str(key_file), "-mesh-with", mesh]
    if kind == "derpbox":
        cmd = [sys.executable, "-m", "derpbox", *common]
        if len(ports) > 1:
            cmd += ["-mesh-ca-file", str(certs / "ca.pem")]
        env = dict(os.environ)
    else:
        cmd = [derper, *common]
        env = dict(os.environ, SSL_CERT_FILE=str(certs / "ca.pem"))
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, preexec_fn=raise_nofile)
    wait_listening(port, proc, kind)
    return {"name": kind, "proc": proc, "pid": proc.pid, "port": port, "cmd": cmd}


def wait_meshed(nodes: list[dict], log_path: Path, timeout: float = 30) -> None:
    """Until each node logs its link to the other (derpbox: "connected to", derper: "connected;")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if text.count("watching its clients") + text.count("connected;") >= len(nodes):
            time.sleep(0.5)  # let the first PeerPresent batches land
            return
        time.sleep(0.2)
    raise RuntimeError(f"the nodes did not mesh within {timeout} s; see {log_path}")


def run_config(config: str, rates: list[int], args, out: Path, started: str, derper: str) -> list[dict]:
    kinds = config.split("-")
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"meshbench-{config}-") as tmp:
        tmp = Path(tmp)
        certs = tmp / "certs"
        make_cert(certs, "127.0.0.1")
        ports = [free_port() for _ in kinds]
        log_path = out / f"{started}-mesh-{config}.log"
        with open(log_path, "wb") as log:
            nodes = [start_node(kind, tmp, certs, ports, i, log, derper) for i, kind in enumerate(kinds)]
            try:
                if len(nodes) > 1:
                    wait_meshed(nodes, log_path)
                for rate in rates:
                    row = run_load(nodes[0], args.pairs, rate, args, receive_on=nodes[1] if len(nodes) > 1 else None)
                    row["config"] = config
                    rows.append(row)
                    print(f"{config:16} {rate:>6}/s: delivered {row['delivered_pps']:.0f} pps, loss "
                          f"{fmt(row['loss_pct'], '.2f')} %, p99 {fmt(row['p99_ms'], '.2f')} ms, sender node "
                          f"{fmt(row['server_cpu_s_per_Mpkt'], '.2f')}, receiver node "
                          f"{fmt(row['receiving_server_cpu_s_per_Mpkt'], '.2f')} CPU s/Mpkt", file=sys.stderr, flush=True)
            finally:
                for node in nodes:
                    stop(node)
    return rows


def report(res: dict) -> str:
    lines = report_head(f"meshbench {res['started']}", res)
    lines += ["", f"{res['pairs']} pairs, 1200-byte packets, {res['duration']} s measured per row, "
              f"{res['repeat']} runs per row (medians; the range in brackets). Senders on the first node, "
              "receivers on the second: every packet crosses the mesh once. CPU s/Mpkt = CPU seconds of that "
              "node per million delivered packets.", "",
              "| config | rate/sender | delivered pps | loss % | p99 ms | sender node CPU s/Mpkt | "
              "receiver node CPU s/Mpkt | both nodes CPU s/Mpkt |",
              "|---|---|---|---|---|---|---|---|"]
    by = {}
    for row in res["rows"]:
        by.setdefault((row["config"], row["rate_per_sender"]), []).append(row)
    for (config, rate), rows in by.items():
        for row in rows:
            row["both_cpu_s_per_Mpkt"] = (row["server_cpu_s_per_Mpkt"] or 0) + (row["receiving_server_cpu_s_per_Mpkt"] or 0)

        def cell(key, spec=".2f"):
            return spread(derpbench.values(rows, key), spec)

        lines.append(f"| {config} | {rate} | {cell('delivered_pps', '.0f')} | {cell('loss_pct')} | {cell('p99_ms')} | "
                     f"{cell('server_cpu_s_per_Mpkt')} | {cell('receiving_server_cpu_s_per_Mpkt')} | "
                     f"{cell('both_cpu_s_per_Mpkt')} |")
    lines += ["", "Ratios of medians (both nodes' CPU per packet; p99):", "",
              "| rate/sender | derpbox-derpbox / derpbox | derper-derper / derper | derpbox-derpbox / derper-derper | "
              "derpbox-derper / derper-derper | p99 derpbox-derpbox / derper-derper |", "|---|---|---|---|---|---|"]
    for rate in res["rates"]:
        m = {c: median(by.get((c, rate), []), "both_cpu_s_per_Mpkt") for c in CONFIGS}
        single = {c: median(by.get((c, rate), []), "server_cpu_s_per_Mpkt") for c in ("derpbox", "derper")}
        p99 = {c: median(by.get((c, rate), []), "p99_ms") for c in CONFIGS}
        r = derpbench.ratio
        lines.append(f"| {rate} | {r(m['derpbox-derpbox'], single['derpbox'])} | {r(m['derper-derper'], single['derper'])} | "
                     f"{r(m['derpbox-derpbox'], m['derper-derper'])} | {r(m['derpbox-derper'], m['derper-derper'])} | "
                     f"{r(p99['derpbox-derpbox'], p99['derper-derper'])} |")
    lines += ["", "On a 2-core machine both nodes and the load generator share the cores; compare within a run."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--drain", type=float, default=1)
    ap.add_argument("--rates", default="5000,10000")
    ap.add_argument("--slice-ms", type=float, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration, alternating (default 3)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--derper", default=default_derper())
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args()
    if not os.access(args.derper, os.X_OK):
        ap.error(f"no derper at {args.derper}: pass --derper or set DERPER_BIN")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    configs = [c for c in args.configs.split(",") if c]
    raise_nofile()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"started": started, "command": shlex.join([sys.executable, *sys.argv]),
           "machine": {**machine_info(derpbench.default_tailcat()),
                       "derper": subprocess.run([args.derper, "-version"], capture_output=True, text=True).stdout.strip()},
           "pairs": args.pairs, "duration": args.duration, "repeat": args.repeat, "rates": rates, "rows": []}
    for _ in range(args.repeat):
        for config in configs:
            res["rows"] += run_config(config, rates, args, args.out, started, args.derper)
    save_report(args.out, started, "-mesh", res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
