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
import time
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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..counters import counter, gauge
from ..files import write_atomically
from ..netaddr import is_ip

log = Logger()

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]

# derper uses one year: clients such as macOS reject much longer validity.
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
_UNSAFE_HOSTNAME_CHARS = re.compile(r"[^A-Za-z0-9.-]")


class CertificateError(ValueError):
    """A certificate or key file is missing, unreadable or unusable."""


class KeyMismatchError(CertificateError):
    """The private key is not the key of the leaf certificate.

    Also the state seen in the middle of a non-atomic replacement (the
    certificate written, the key not yet), so a watcher retries it for a while.
    """


class MissingFileError(CertificateError):
    """The certificate or key file does not exist (yet)."""


def sanitize_hostname(hostname: str) -> str:
    """Drop every character outside ``[A-Za-z0-9.-]``, as derper does for file names."""
    return _UNSAFE_HOSTNAME_CHARS.sub("", hostname)


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

    METRICS = (
        gauge("not_after_seconds", "derpbox_tls_certificate_not_after_seconds",
              "Expiry of the certificate being served, seconds since the Unix epoch (0: none yet)."),
    )

    def __init__(self, initial: CertifiedKey | None = None) -> None:
        self._current = initial
        self._listeners: list[Listener] = []

    def current(self) -> CertifiedKey | None:
        return self._current

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def not_after_seconds(self) -> int:
        current = self._current
        return int(current.not_after.timestamp()) if current is not None else 0

    def publish(self, certified_key: CertifiedKey) -> None:
        self._current = certified_key
        for listener in list(self._listeners):
            listener(certified_key)


FileState = tuple  # ((mtime_ns, size, inode) or None) for the .crt, then the .key


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def describe_certificate(certified_key: CertifiedKey) -> str:
    leaf = certified_key.leaf
    return (
        f"serial {leaf.serial_number:x}, sha256 {certified_key.sha256_hex[:16]}..., "
        f"expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    )


class ManualCertificateSource(CertificateHolder):
    """derper's manual mode: ``<certdir>/<hostname>.crt`` and ``.key``, reloaded when replaced.

    When *hostname* is an IP address and the files are missing, a self-signed
    certificate is created (see :func:`ensure_ip_self_signed`). Raises
    :class:`CertificateError` when the files cannot be used at start.

    Unlike derper (which needs a restart), the files are watched: :meth:`start_watching`
    polls ``(mtime_ns, size, inode)`` of both files every *interval* seconds, and
    :meth:`reload` (SIGHUP) loads them at once. A valid new pair is published to the
    listeners (new handshakes use it, connections already made keep theirs); a
    broken pair is refused with one log line per distinct file state and the
    current certificate stays in use. A pair whose key does not match the
    certificate, or with one file missing, is what a non-atomic replacement
    looks like half-way, so the poller retries it for *settle_time* seconds
    before refusing it.

    Manual mode always watches (there is no ``DERP_CERT_WATCH`` switch yet); the
    counters ``reloads``, ``reload_failures`` and ``last_error`` are for metrics.
    """

    METRICS = CertificateHolder.METRICS + (
        counter("reloads", "derpbox_tls_certificate_reloads", "Certificate files reloaded without a restart."),
        counter("reload_failures", "derpbox_tls_certificate_reload_failures",
                "Replaced certificate files refused (the old certificate stays)."),
    )
    poll_interval = 1.0
    settle_time = 3.0
    reload_label = "TLS certificates"

    def __init__(self, certdir: str | os.PathLike[str], hostname: str) -> None:
        self.hostname = hostname
        self.crt_path, self.key_path = cert_paths(certdir, hostname)
        if is_ip(hostname):
            certified_key = ensure_ip_self_signed(certdir, hostname)
        else:
            certified_key = load_certified_key(self.crt_path, self.key_path, hostname)
        super().__init__(certified_key)
        # Counters for metrics.
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        # The file state last dealt with: loaded, or refused and logged.
        self._settled: FileState = self._file_state()
        # A state that failed in a way a half-done replacement explains, and when it was first seen.
        self._pending: FileState | None = None
        self._pending_since = 0.0
        self._loop = None
        self._clock = None

    # -- watching

    def start_watching(self, clock=None, interval: float | None = None) -> None:
        """Poll the files with a LoopingCall on *clock* (the reactor by default)."""
        if self._loop is not None:
            return
        if clock is None:
            # Imported here: importing the reactor installs the default one, too early for callers choosing another.
            from twisted.internet import reactor as clock
        self._clock = clock
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self._loop.start(interval or self.poll_interval, now=False).addErrback(
            lambda f: log.failure("certificate file watcher stopped", f)
        )

    def stop_watching(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    @property
    def watching(self) -> bool:
        return self._loop is not None

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock.seconds()
        return time.monotonic()

    def _file_state(self) -> FileState:
        return (_stat(self.crt_path), _stat(self.key_path))

    def poll(self) -> None:
        """Load the files if they changed since they were last loaded or refused."""
        state = self._file_state()
        if state == self._settled and self._pending is None:
            return
        self._try(state, forced=False)

    def reload(self) -> bool:
        """Load the files now, changed or not (SIGHUP); True if a new certificate is in use."""
        log.info("Reloading TLS certificate {crt} and {key}", crt=str(self.crt_path), key=str(self.key_path))
        return self._try(self._file_state(), forced=True)

    def _try(self, state: FileState, forced: bool) -> bool:
        try:
            certified_key = load_certified_key(self.crt_path, self.key_path, self.hostname)
        except CertificateError as e:
            return self._failed(state, e, forced)
        after = self._file_state()
        if after != state and not forced:
            # Changed while being read: look again on the next poll.
            self._pending, self._pending_since = after, self._now()
            return False
        self._settled, self._pending = after, None
        self.last_error = None
        current = self.current()
        if current is not None and _same(current, certified_key):
            log.info(
                "TLS certificate files {crt} rewritten with the certificate already in use ({desc})",
                crt=str(self.crt_path),
                desc=describe_certificate(certified_key),
            )
            return False
        self.reloads += 1
        log.info(
            "TLS certificate reloaded from {crt}: {desc} (new TLS handshakes use it; "
            "established connections keep theirs)",
            crt=str(self.crt_path),
            desc=describe_certificate(certified_key),
        )
        self.publish(certified_key)
        return True

    def _failed(self, state: FileState, error: CertificateError, forced: bool) -> bool:
        transient = isinstance(error, (KeyMismatchError, MissingFileError))
        if transient and not forced:
            now = self._now()
            if self._pending != state:
                # A new state: give the writer time to replace the other file too.
                self._pending, self._pending_since = state, now
                return False
            if now - self._pending_since < self.settle_time:
                return False
        self._settled, self._pending = state, None
        self.reload_failures += 1
        self.last_error = str(error)
        current = self.current()
        log.error(
            "TLS certificate reload refused, still serving the previous certificate ({desc}): {error}",
            desc=describe_certificate(current) if current is not None else "none",
            error=str(error),
            cert_reload_error=str(error),
        )
        return False


def _same(a: CertifiedKey, b: CertifiedKey) -> bool:
    der = serialization.Encoding.DER
    return [c.public_bytes(der) for c in a.chain] == [c.public_bytes(der) for c in b.chain] and _spki(
        a.key.public_key()
    ) == _spki(b.key.public_key())


def load_certified_key(
    crt_path: str | os.PathLike[str], key_path: str | os.PathLike[str], hostname: str
) -> CertifiedKey:
    """Load and validate a PEM chain and key for *hostname*; raise :class:`CertificateError`."""
    chain = _load_chain(Path(crt_path))
    key = _load_key(Path(key_path))
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise KeyMismatchError(
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
        raise MissingFileError(f"{path}: {what} file not found") from None
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
        if is_ip(hostname):
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

