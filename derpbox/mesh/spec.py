"""Who to mesh with: derper's ``-mesh-with`` entries and derpbox's mesh peers file.

An entry is ``host[:port][/dialhost]`` as in derper: derpbox dials
``https://host[:port]/derp``, connecting to ``dialhost`` instead when given while
still checking the certificate for ``host``. A peers file holds one entry a line,
optionally followed by the peer's DERP map ``CertName`` (a name, or the
``sha256-raw:<hex>`` pin of an IP-only node); ``#`` starts a comment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..netaddr import host_port, is_ip
from ..tls.pins import parse_pin

_PORT = re.compile(r"^(?P<host>\[[^\]]+\]|[^:\[\]]+)(?::(?P<port>[0-9]+))?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


def _check_host(host: str, what: str, entry: str) -> None:
    if not (is_ip(host) or _HOSTNAME.match(host)):
        raise ValueError(f"{entry!r}: {what} {host!r} is neither a DNS name nor an IP address")


@dataclass(frozen=True)
class MeshPeerSpec:
    entry: str  # as written: the peer's name in logs and metrics
    host: str
    port: int
    dial_host: str
    cert_name: str = ""
    # A worker of this node, reached over its unix socket without TLS (derpbox.workers).
    unix_path: str = ""
    # That worker has a lower index than this one: of two connections of one key that were
    # both there before the workers' link came up, its connection is the one kept.
    precedes: bool = False

    @property
    def url(self) -> str:
        return f"https://{host_port(self.host, self.port)}/derp"


def parse_entry(entry: str, cert_name: str = "") -> MeshPeerSpec:
    """One ``host[:port][/dialhost]``; ValueError says what is wrong with it."""
    text = entry.strip()
    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(f"{entry!r}: too many components (host[:port][/dialhost])")
    m = _PORT.match(parts[0])
    if not parts[0] or m is None:
        raise ValueError(f"{entry!r}: expected host[:port][/dialhost]")
    host = m["host"].strip("[]")
    _check_host(host, "host", entry)
    port = int(m["port"]) if m["port"] else 443
    if not 0 < port < 65536:
        raise ValueError(f"{entry!r}: port {port} is out of range")
    dial_host = parts[1] if len(parts) == 2 else host
    if not dial_host:
        raise ValueError(f"{entry!r}: empty dialhost after '/'")
    _check_host(dial_host, "dialhost", entry)
    if cert_name:
        parse_pin(cert_name)
    return MeshPeerSpec(text, host, port, dial_host, cert_name)


def parse_entries(entries, cert_names: dict[str, str] | None = None) -> tuple[MeshPeerSpec, ...]:
    cert_names = cert_names or {}
    return tuple(parse_entry(e, cert_names.get(e.strip().split("/")[0], "")) for e in entries if e.strip())


def parse_peers_file(text: str, source: str) -> tuple[MeshPeerSpec, ...]:
    """Every entry of a peers file; ValueError names the file and line of the first bad one."""
    specs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(f"{source}:{lineno}: expected 'host[:port][/dialhost] [CertName]', got {line.strip()!r}")
        try:
            specs.append(parse_entry(fields[0], fields[1] if len(fields) == 2 else ""))
        except ValueError as e:
            raise ValueError(f"{source}:{lineno}: {e}") from None
    return tuple(specs)
