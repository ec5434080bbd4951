"""What ``derpbox check`` checks: the regions and nodes of a DERP map (a file or URL),
or one node made from a host or ``https://`` URL and the command's flags."""

from __future__ import annotations

import json
import os
import urllib.request
from urllib.parse import urlsplit

from .. import netaddr


def map_field(d: dict, name: str, default=None):
    """A DERP map field; the name matched case-insensitively, as Go's JSON decoding does."""
    if name in d:
        return d[name]
    low = name.lower()
    for k, v in d.items():
        if k.lower() == low:
            return v
    return default


def load_targets(target: str, opts_args) -> list[dict]:
    """Regions [{RegionID, RegionCode, Nodes}] from a host, URL, map file or map URL."""
    if os.path.exists(target):
        with open(target, encoding="utf-8") as f:
            return _regions(target, f.read())
    parts = urlsplit(target if "://" in target else f"https://{target}")
    if parts.path not in ("", "/", "/derp"):
        with urllib.request.urlopen(target, timeout=opts_args.timeout) as resp:
            return _regions(target, resp.read().decode("utf-8"))
    if parts.scheme not in ("https", "wss"):
        raise ValueError(f"{target}: Tailscale clients only use https:// for DERP")
    host = parts.hostname or ""
    node = {"Name": host, "RegionID": 0, "HostName": host, "DERPPort": parts.port or 443,
            "CertName": opts_args.cert_name or "", "STUNPort": opts_args.stun_port,
            "CanPort80": opts_args.port80}
    version = netaddr.ip_version(host)
    if version:
        node[f"IPv{version}"] = host
    return [{"RegionID": 0, "RegionCode": "", "Nodes": [node]}]


def _regions(target: str, text: str) -> list[dict]:
    doc = json.loads(text)
    regions = map_field(doc, "Regions")
    if not isinstance(regions, dict):
        raise ValueError(f"{target}: not a DERP map (no Regions object)")
    out = []
    for rid, region in sorted(regions.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if region is None:
            continue
        out.append({"RegionID": map_field(region, "RegionID", rid), "RegionCode": map_field(region, "RegionCode", ""),
                    "Nodes": map_field(region, "Nodes", []) or []})
    return out
