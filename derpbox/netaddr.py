"""Addresses and networks: the one home for parsing IPs, CIDR lists and peer addresses.

Go reports an IPv4 client on a dual-stack socket as the IPv4 address, not as
``::ffff:a.b.c.d``; every comparison (allow lists, trusted proxies, debug access,
logs) goes through ``parse_ip`` so the mapped form never leaks past this module.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["IPAddress", "IPNetwork", "in_networks", "ip16", "ip_version", "is_ip", "parse_ip", "parse_networks", "remote_address"]


def parse_ip(text: str) -> IPAddress | None:
    """The address in *text* (an IPv6 zone dropped, IPv4-mapped IPv6 unmapped), or None."""
    try:
        ip = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ip_version(text: str) -> int:
    """4 or 6 when *text* is an IP address literal as it stands, else 0."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


def is_ip(text: str) -> bool:
    """True when *text* is an IP address literal (a hostname that needs no DNS)."""
    return ip_version(text) != 0


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IPs or CIDRs (empty entries skipped) as networks; ValueError names a bad one."""
    nets = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
    return tuple(nets)


def in_networks(ip: IPAddress | None, networks: Iterable[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ip16(text: str) -> bytes:
    """The 16-byte form of an address (IPv4 as ::ffff:a.b.c.d) as DERP frames carry it; zeros if none."""
    ip = parse_ip(text)
    if ip is None:
        return bytes(16)
    if ip.version == 4:
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def remote_address(transport) -> tuple[str, int]:
    """The peer's address with IPv4-mapped IPv6 unmapped, as a Go server reports it.

    Behind a trusted PROXY-protocol proxy, transport.getPeer() is already the real
    client named by the header (derpbox.web.proxied), at every layer above it.
    """
    addr = transport.getPeer()
    host = getattr(addr, "host", "")
    ip = parse_ip(host)
    if ip is not None and ip.version == 4 and ":" in host:
        host = str(ip)
    return host, getattr(addr, "port", 0)
