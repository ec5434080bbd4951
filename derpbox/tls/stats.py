"""TLS listener counters, declared once with derper's names: tls_listener_* and derper_tls_*_version."""

from __future__ import annotations

from ..counters import counter, gauge


def tls_version_label(openssl_name: str) -> str:
    """"TLSv1.3" -> "1.3", as derper labels versions."""
    if openssl_name.startswith("TLSv"):
        return openssl_name[4:]
    return openssl_name


class TLSStats:
    METRICS = (
        counter("accepted_connections", "tls_listener_accepted_connections", "Connections accepted by the TLS listener."),
        counter("rejected_connections", "tls_listener_rejected_connections",
                "Connections rejected by the TLS listener's accept limit."),
        counter("request_version", "derper_tls_request_version", "Completed TLS handshakes, by negotiated version.",
                ("version",)),
        gauge("active_version", "derper_tls_active_version", "Open TLS connections, by negotiated version.", ("version",)),
        counter("handshake_failures", "derpbox_tls_handshake_failures",
                "TLS connections closed before the handshake completed, by reason: tls_error (OpenSSL refused it: "
                "no shared version or cipher, wrong SNI, not TLS at all), closed (the client left), timeout.",
                ("reason",)),
    )
    __slots__ = ("accepted_connections", "rejected_connections", "request_version", "active_version",
                 "handshake_failures")

    def __init__(self) -> None:
        self.accepted_connections = 0
        self.rejected_connections = 0
        self.request_version: dict[str, int] = {}
        self.active_version: dict[str, int] = {}
        self.handshake_failures = dict.fromkeys(("tls_error", "closed", "timeout"), 0)

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def handshake(self, version: str) -> None:
        self.request_version[version] = self.request_version.get(version, 0) + 1
        self.active_version[version] = self.active_version.get(version, 0) + 1

    def closed(self, version: str) -> None:
        self.active_version[version] = self.active_version.get(version, 0) - 1
