"""The server certificate as a Tailscale client judges it: names, validity, trust,
and the CertName rules of a DERP map node (spec 8.2)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto

from .. import netaddr
from ..tls.metacert import is_meta_certificate
from ..tls.pins import PIN_PREFIX
from .results import FAIL, OK, WARN

EXPIRY_WARN_DAYS = 14


def cert_names(cert: x509.Certificate) -> list[str]:
    """DNS and IP SANs (the names Go verifies against; the CN is not used)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def name_matches(cert: x509.Certificate, name: str) -> bool:
    name = name.rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    for pattern in cert_names(cert):
        if ip is not None:
            try:
                if ipaddress.ip_address(pattern) == ip:
                    return True
            except ValueError:
                pass
            continue
        pattern = pattern.rstrip(".").lower()
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def leaf_of(chain: list[x509.Certificate]) -> x509.Certificate | None:
    """The server's own certificate: the first one that is not the meta-certificate."""
    return next((c for c in chain if not is_meta_certificate(c)), None)


def sha256_hex(cert: x509.Certificate) -> str:
    """The fingerprint a ``sha256-raw:`` CertName pins, in the lowercase hex Tailscale compares."""
    return cert.fingerprint(hashes.SHA256()).hex()


def validity(cert: x509.Certificate, now: datetime.datetime | None = None) -> tuple[str, str]:
    """(status, text) for a certificate's validity window: expired/not yet valid FAIL, < 14 days WARN."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        return FAIL, f"certificate not valid before {before:%Y-%m-%d %H:%M:%S} UTC"
    if now > after:
        return FAIL, f"certificate expired at {after:%Y-%m-%d %H:%M:%S} UTC"
    left = after - now
    days = left.days
    if left < datetime.timedelta(days=EXPIRY_WARN_DAYS):
        return WARN, f"certificate expires in {days} days ({after:%Y-%m-%d %H:%M} UTC)"
    return OK, f"certificate valid {days} days"


def verify_chain(chain: list[x509.Certificate], cafile: str | None) -> str | None:
    """None if the chain (meta-cert excluded) leads to a trusted root, else OpenSSL's reason."""
    certs = [c for c in chain if not is_meta_certificate(c)]
    if not certs:
        return "no certificate presented"
    store = crypto.X509Store()
    paths = ssl.get_default_verify_paths()
    for f, d in ((paths.cafile, paths.capath), (paths.openssl_cafile, paths.openssl_capath)):
        try:
            store.load_locations(f if f and os.path.exists(f) else None, d if d and os.path.isdir(d) else None)
        except (crypto.Error, TypeError):
            pass
    if cafile:
        store.load_locations(cafile)
    leaf = crypto.X509.from_cryptography(certs[0])
    rest = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    try:
        crypto.X509StoreContext(store, leaf, chain=rest).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e.args[0] if e.args else e)
    return None


def check_cert_name_rules(chain: list[x509.Certificate], host_name: str, cert_name: str,
                          sni: str | None, cafile: str | None) -> tuple[str, str, list[str]]:
    """Apply Tailscale's CertName rules (spec 8.2): (status, detail, diagnosis)."""
    if cert_name.startswith(PIN_PREFIX):
        return _check_pinned(chain, cert_name[len(PIN_PREFIX):], sni)
    return _check_named(chain, cert_name or host_name, "CertName" if cert_name else "HostName", cafile)


def _check_pinned(chain: list[x509.Certificate], want: str, sni: str | None) -> tuple[str, str, list[str]]:
    others = [c for c in chain if not is_meta_certificate(c)]
    if len(others) != 1:
        return FAIL, f"sha256-raw pin needs exactly one certificate besides the meta-certificate, got {len(others)}", [
            "a pinned (sha256-raw:) node must serve only its self-signed leaf, no CA chain"]
    leaf = others[0]
    got = sha256_hex(leaf)
    if got != want:
        diag = [f"the server's certificate has SHA-256 {got}; set CertName to \"sha256-raw:{got}\""]
        if want.lower() == got:
            diag = ["the pin must be lowercase hex; Tailscale compares it string for string"]
        return FAIL, "certificate does not match the sha256-raw pin", diag
    status, text = validity(leaf)
    if status == FAIL:
        return FAIL, text, []
    if sni and not name_matches(leaf, sni):
        return FAIL, f"pinned certificate is not valid for the TLS name {sni}", [
            f"certificate names: {', '.join(cert_names(leaf)) or '(none)'}"]
    return status, f"pinned sha256-raw matches, {text}", []


def _check_named(chain: list[x509.Certificate], name: str, field_name: str,
                 cafile: str | None) -> tuple[str, str, list[str]]:
    """The certificate must be trusted and carry ``name`` (from the node's ``field_name``)."""
    leaf = leaf_of(chain)
    if leaf is None:
        return FAIL, "no certificate presented", []
    names = cert_names(leaf)
    problem = verify_chain(chain, cafile)
    if not name_matches(leaf, name):
        diag = [
            f"wrong certificate name: the certificate is for {', '.join(names) or '(no SAN names)'}, "
            f"not {name} ({field_name})",
        ]
        if names:
            good = names[0]
            if netaddr.is_ip(good):
                diag.append(f"for an IP-only node pin the certificate: CertName \"sha256-raw:{sha256_hex(leaf)}\"")
            else:
                diag.append(f"set HostName (or CertName) to {good} in the DERP map, "
                            f"or install a certificate for {name}")
        if problem is None:
            return FAIL, f"certificate is valid but not for {name}", diag
        return FAIL, f"certificate not trusted ({problem}) and not for {name}", diag
    if problem is not None:
        diag = []
        if "self-signed" in problem or "self signed" in problem or "local issuer" in problem:
            diag.append(f"a self-signed or private-CA certificate needs CertName \"sha256-raw:{sha256_hex(leaf)}\" "
                        "in the DERP map (or --ca-file for this check)")
        return FAIL, f"certificate for {name} not trusted: {problem}", diag
    status, text = validity(leaf)
    return status, f"{text}, verified for {name}", []
