"""``derpbox check``: DERP nodes checked as a Tailscale client sees them, reported as
text (with diagnoses) or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .node import CheckOptions, check_node
from .results import FAIL
from .targets import load_targets, map_field


def check_main(argv: list[str], environ=os.environ, out=None) -> int:
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="derpbox check", description=(
        "Check DERP nodes as a Tailscale client does: TCP, TLS with the CertName rules, meta-certificate "
        "and fast start, a relayed packet, /derp/latency-check, STUN over IPv4/IPv6, the captive-portal "
        "check. TARGET is https://host[:port], host, or a DERP map (JSON file path or URL)."))
    p.add_argument("target")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--region", help="only this region (ID or RegionCode)")
    p.add_argument("--idle-test", type=float, default=0.0, metavar="SECONDS",
                   help="hold an idle DERP connection this long and report if it is cut (off by default)")
    p.add_argument("--ca-file", help="extra trusted CA certificates (PEM), for private CAs and tests")
    p.add_argument("--timeout", type=float, default=3.0, help="per-step timeout in seconds (default 3)")
    p.add_argument("--cert-name", default="", help="CertName for a single host (e.g. sha256-raw:<hex>)")
    p.add_argument("--stun-port", type=int, default=0, help="STUN port for a single host (0 = 3478, -1 = none)")
    p.add_argument("--port80", action="store_true", help="single host: check as CanPort80 true")
    p.add_argument("--http-port", type=int, default=80,
                   help="port for the captive-portal check (Tailscale uses 80; for port-forwarded tests)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    opts = CheckOptions(timeout=args.timeout, cafile=args.ca_file, idle_test=args.idle_test, http_port=args.http_port)
    try:
        regions = load_targets(args.target, args)
    except (OSError, ValueError) as e:
        out.write(f"derpbox check: {e}\n")
        return 2
    if args.region:
        regions = [r for r in regions if str(r["RegionID"]) == args.region or r["RegionCode"] == args.region]
        if not regions:
            out.write(f"derpbox check: no region {args.region!r} in {args.target}\n")
            return 2
    report = []
    failed = False
    for region in regions:
        for node in region["Nodes"]:
            results = check_node(node, opts)
            failed |= any(r.status == FAIL for r in results)
            entry = {"region_id": region["RegionID"], "region_code": region["RegionCode"],
                     "node": map_field(node, "Name", ""), "host": map_field(node, "HostName", ""),
                     "ok": not any(r.status == FAIL for r in results), "checks": results}
            report.append(entry)
            if not args.json:
                _print_node(entry, out)
    if args.json:
        doc = {"ok": not failed, "nodes": [{**e, "checks": [r.as_json() for r in e["checks"]]} for e in report]}
        out.write(json.dumps(doc, indent=2) + "\n")
    elif not report:
        out.write("no nodes to check\n")
    else:
        out.write(("all checks passed" if not failed else "some checks FAILED") + "\n")
    out.flush()
    return 1 if failed else 0


def _print_node(entry: dict, out) -> None:
    region = f"region {entry['region_id']}" + (f" ({entry['region_code']})" if entry["region_code"] else "")
    out.write(f"== {region} node {entry['node']} ({entry['host']})\n")
    for r in entry["checks"]:
        out.write("  " + r.line() + "\n")
        for d in r.diagnosis:
            out.write(f"       DIAGNOSIS: {d}\n")
