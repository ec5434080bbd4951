"""Certificate sources: where the TLS listener gets its certificate from.

A source hands out the current :class:`CertifiedKey` and tells listeners when
it changes, so sources that renew (ACME) or reload can push new certificates
into live listeners. This module has the manual source of derper's
``-certmode=manual``: files in a cert directory, or a self-signed certificate
created on first start when the hostname is an IP address.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Union

import service_identity
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.logger import Logger

from ..files import write_atomically

log = Logger()

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]

DEFAULT_DERP_PORT = 443
DEFAULT_STUN_PORT = 3478
# derper uses one year: clients such as macOS reject much longer validity.
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
_UNSAFE_HOSTNAME_CHARS = re.compile(r"[^A-Za-z0-9.-]")


class CertificateError(ValueError):
    """A certificate or key file is missing, unreadable or unusable."""


def sanitize_hostname(hostname: str) -> str:
    """Drop every character outside ``[A-Za-z0-9.-]``, as derper does for file names."""
    return _UNSAFE_HOSTNAME_CHARS.sub("", hostname)


def is_ip_address(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def cert_paths(certdir: str | os.PathLike[str], hostname: str) -> tuple[Path, Path]:
    """The ``(<name>.crt, <name>.key)`` paths derper uses for *hostname*."""
    base = Path(certdir) / sanitize_hostname(hostname)
    return base.with_name(base.name + ".crt"), base.with_name(base.name + ".key")


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate chain (leaf first, no root needed) and the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def sha256_hex(self) -> str:
        """Lowercase hex SHA-256 of the leaf DER: the value of a ``sha256-raw:`` pin."""
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


Listener = Callable[[CertifiedKey], None]


class CertificateSource(Protocol):
    def current(self) -> CertifiedKey | None:
        """The certificate to serve now, or None if there is none yet."""

    def add_listener(self, listener: Listener) -> None:
        """Call *listener* with each new certificate from now on."""


class CertificateHolder:
    """A :class:`CertificateSource` whose owner pushes certificates in with :meth:`publish`."""

    def __init__(self, initial: CertifiedKey | None = None) -> None:
        self._current = initial
        self._listeners: list[Listener] = []

    def current(self) -> CertifiedKey | None:
        return self._current

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, certified_key: CertifiedKey) -> None:
        self._current = certified_key
        for listener in list(self._listeners):
            listener(certified_key)


class ManualCertificateSource(CertificateHolder):
    """derper's manual mode: ``<certdir>/<hostname>.crt`` and ``.key``, loaded once.

    When *hostname* is an IP address and the files are missing, a self-signed
    certificate is created (see :func:`ensure_ip_self_signed`). Raises
    :class:`CertificateError` when the files cannot be used.
    """

    def __init__(self, certdir: str | os.PathLike[str], hostname: str) -> None:
        if is_ip_address(hostname):
            certified_key = ensure_ip_self_signed(certdir, hostname)
        else:
            certified_key = load_certified_key(*cert_paths(certdir, hostname), hostname)
        super().__init__(certified_key)


def load_certified_key(
    crt_path: str | os.PathLike[str], key_path: str | os.PathLike[str], hostname: str
) -> CertifiedKey:
    """Load and validate a PEM chain and key for *hostname*; raise :class:`CertificateError`."""
    chain = _load_chain(Path(crt_path))
    key = _load_key(Path(key_path))
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CertificateError(
            f"{key_path}: private key does not match the public key of the first certificate in {crt_path}"
        )
    _verify_hostname(leaf, hostname, crt_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        raise CertificateError(f"{crt_path}: certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            f"{crt_path}: certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    return CertifiedKey(chain=tuple(chain), key=key)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise CertificateError(f"{path}: cannot read {what} file: {e.strerror}") from None


def _load_chain(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{path}: no valid PEM certificate: {e}") from None


def _load_key(path: Path) -> PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(f"{path}: private key is encrypted; an unencrypted key is required") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"{path}: no valid PEM private key: {e}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise CertificateError(f"{path}: unsupported private key type {type(key).__name__}; use RSA, ECDSA or Ed25519")
    return key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify_hostname(leaf: x509.Certificate, hostname: str, crt_path) -> None:
    # Like Go's VerifyHostname: subjectAltName only, the CN is not consulted.
    try:
        if is_ip_address(hostname):
            verify_certificate_ip_address(leaf, hostname)
        else:
            verify_certificate_hostname(leaf, hostname.rstrip("."))
    except (service_identity.VerificationError, service_identity.CertificateError):
        raise CertificateError(
            f"{crt_path}: certificate is not valid for {hostname!r} (subjectAltName: {_describe_sans(leaf)})"
        ) from None


def _describe_sans(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "none"
    names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "none"


def ensure_ip_self_signed(certdir: str | os.PathLike[str], ip: str) -> CertifiedKey:
    """Load the certificate for IP *ip*, creating a self-signed one if a file is missing.

    As derper: ECDSA P-256, CN = the IP, an IP SAN, KeyUsage
    digitalSignature|keyEncipherment, ExtKeyUsage serverAuth, one year.
    """
    address = ipaddress.ip_address(ip)
    crt_path, key_path = cert_paths(certdir, ip)
    if crt_path.exists() and key_path.exists():
        return load_certified_key(crt_path, key_path, ip)
    certified_key = _make_ip_self_signed(ip, address)
    crt_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Key first: a crash in between leaves no certificate, so the next start regenerates both.
    write_atomically(
        key_path,
        certified_key.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        0o600,
    )
    write_atomically(crt_path, certified_key.leaf.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("Created self-signed certificate for IP address {ip} in {path}", ip=ip, path=str(crt_path))
    return certified_key


def _make_ip_self_signed(ip: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.timezone.utc)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=True,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(address)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(chain=(cert,), key=key)


def derp_map_node_json(hostname_ip: str, cert: CertifiedKey, derp_port: int, stun_port: int) -> dict:
    """The DERPNode derper suggests for an IP hostname, as a JSON-ready dict.

    CertName pins the leaf with ``sha256-raw:``. Tailscale clients accept
    exactly one certificate besides the meta-certificate under such a pin,
    so it is left out when the chain has intermediates (the node must then be
    verifiable through a CA instead).
    """
    address = ipaddress.ip_address(hostname_ip)
    node: dict = {"Name": "custom", "RegionID": 900, "HostName": hostname_ip}
    if len(cert.chain) == 1:
        node["CertName"] = "sha256-raw:" + cert.sha256_hex
    node["IPv4" if address.version == 4 else "IPv6"] = hostname_ip
    if stun_port != DEFAULT_STUN_PORT:
        node["STUNPort"] = stun_port
    if derp_port != DEFAULT_DERP_PORT:
        node["DERPPort"] = derp_port
    return node
