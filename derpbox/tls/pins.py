"""``sha256-raw:`` CertName pins (spec 8.2): a self-signed IP-only node's leaf, by digest.

Pure text handling, so configuration can check a pin without loading the TLS stack.
"""

from __future__ import annotations

PIN_PREFIX = "sha256-raw:"


def parse_pin(cert_name: str) -> bytes | None:
    """The SHA-256 digest a ``sha256-raw:<64 hex>`` CertName pins, None for a plain name;
    ValueError for a malformed pin."""
    if not cert_name.startswith(PIN_PREFIX):
        return None
    digits = cert_name[len(PIN_PREFIX) :]
    try:
        digest = bytes.fromhex(digits)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"{cert_name!r}: a pin is {PIN_PREFIX} and 64 hex digits")
    return digest
