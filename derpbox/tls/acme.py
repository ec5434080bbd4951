"""ACME certificates (derper's ``-certmode=letsencrypt`` and ``gcp``).

:class:`AcmeCertificateSource` is a :class:`CertificateHolder` and a Twisted
``Service``: at start it publishes a stored certificate that is still good,
otherwise (or when it is due) it orders one from the ACME server through the
RFC 8555 ``acme`` library. The library is synchronous (``requests``), so every
network call runs in the reactor's thread pool; the orchestration runs in the
reactor and is the only code that touches the challenge tables.

Challenges:

* HTTP-01: pass :meth:`AcmeCertificateSource.http01_response` to
  ``build_port80_site(challenge_responder=...)``.
* TLS-ALPN-01 (RFC 8737): :class:`derpbox.tls.context.ServerTLS` calls
  :meth:`AcmeCertificateSource.tls_alpn_certificate` for a ClientHello that
  offers only ``acme-tls/1`` (it finds the method on its source by itself).

IP addresses (derper's ``-acme-ip-certs``, RFC 8738): an IP *hostname* is ordered
as an ``ip`` identifier. Let's Encrypt issues those only under its ``shortlived``
profile (about 6 days), which the order requests when the CA's directory lists it
(draft-aaron-acme-profiles); a CA without profiles gets an order without one. The
TLS-ALPN-01 validation handshake names the address by its reverse-DNS name
(``4.3.2.1.in-addr.arpa``) in the SNI and the validation certificate carries the
address in an iPAddress SAN (RFC 8738 section 6).

Renewal happens when ``renew_fraction`` (1/3) of the lifetime is left, whatever
the lifetime (so about every 4 days for a 6-day certificate, 60 for a 90-day
one); failures are retried with exponential backoff from ``retry_min`` to
``retry_max`` seconds, as autocert and derper's IP certificate manager do. Files
in *certdir*: ``acme-account.key`` (the account key, reused across restarts),
``<host>.crt`` (full chain) and ``<host>.key``; for an IPv6 address the colons
become dots, as derper names them.
"""

from __future__ import annotations

import binascii
import datetime
import hashlib
import ipaddress
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from ..counters import counter, gauge
from ..files import write_atomically
from .certs import CertificateError, CertificateHolder, CertifiedKey, cert_paths, load_certified_key
from .expiry import warning_time

log = Logger()

__all__ = [
    "ACME_TLS_1",
    "AcmeCertificateSource",
    "AcmeError",
    "AcmeStats",
    "DIRECTORIES",
    "SHORTLIVED_PROFILE",
    "TLSALPN01Response",
    "default_directory",
    "make_tls_alpn01_certificate",
]

DIRECTORIES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "gcp": "https://dv.acme-v02.api.pki.goog/directory",
}
ACCOUNT_KEY_FILE = "acme-account.key"
ACME_TLS_1 = b"acme-tls/1"
# RFC 8737 id-pe-acmeIdentifier.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HTTP01 = "http-01"
TLSALPN01 = "tls-alpn-01"
# Let's Encrypt's profile for IP address certificates (derper requests it by this name).
SHORTLIVED_PROFILE = "shortlived"
_USER_AGENT = "derpbox"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_address(hostname: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(hostname)
    except ValueError:
        return None


def challenge_name(hostname: str) -> str:
    """The SNI of a TLS-ALPN-01 validation handshake for *hostname*: the name itself, or for
    an IP address its reverse-DNS name (RFC 8738 section 6), lower case without the root dot."""
    ip = _ip_address(hostname)
    return ip.reverse_pointer if ip is not None else hostname.rstrip(".").lower()


def acme_cert_paths(certdir: str | os.PathLike[str], hostname: str) -> tuple[Path, Path]:
    """``<name>.crt`` and ``<name>.key``; an IPv6 address with its colons as dots (derper's names)."""
    ip = _ip_address(hostname)
    return cert_paths(certdir, str(ip).replace(":", ".") if ip is not None else hostname)


def default_directory(certmode: str) -> str:
    """The ACME directory URL derper uses for *certmode* (``letsencrypt`` or ``gcp``)."""
    try:
        return DIRECTORIES[certmode]
    except KeyError:
        raise ValueError(f"certmode {certmode!r} has no ACME directory (use letsencrypt or gcp)") from None


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """Answer to a tls-alpn-01 challenge (acme 5.x dropped its own class; the POST body is ``{}``)."""

    typ = TLSALPN01


# Every kind _describe_failure gives; pre-created so a dashboard sees zeros before the first failure.
FAILURE_KINDS = ("directory", "ca_error", "rate_limited", "challenge", "timeout", "network",
                 "no_challenge", "account", "bad_certificate", "acme", "other")


class AcmeError(Exception):
    """One failed attempt, with a failure *kind* (one of FAILURE_KINDS) for the stats."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in FAILURE_KINDS, kind
        super().__init__(message)
        self.kind = kind


@dataclass
class AcmeStats:
    """Counters for metrics: orders placed, certificates issued, failures by kind."""

    METRICS = (
        counter("orders", "derpbox_acme_orders", "ACME orders placed."),
        counter("issued", "derpbox_acme_issued", "Certificates issued by the ACME CA."),
        counter("renewals", "derpbox_acme_renewals", "Certificates renewed."),
        counter("failures_by_kind", "derpbox_acme_failures", "ACME failures, by kind (the log has the CA's message).",
                ("kind",)),
    )

    orders: int = 0
    issued: int = 0
    renewals: int = 0
    accounts_created: int = 0
    failures: Counter = field(default_factory=Counter)
    last_error: str = ""
    last_error_time: float | None = None
    not_after: float | None = None  # unix time of the certificate being served
    profile: str = ""  # the profile the last order requested ("" = none)
    next_check: float | None = None  # unix time of the next renewal check or retry

    @property
    def failures_by_kind(self) -> dict[str, int]:
        return {kind: self.failures[kind] for kind in FAILURE_KINDS}


@dataclass
class _Order:
    acme: client.ClientV2
    order: messages.OrderResource
    pending: list[tuple[str, messages.ChallengeBody, str]]  # (challenge type, challenge, key authorization)
    key_pem: bytes  # the new certificate's private key
    account_created: bool
    profile: str  # "" = none requested


def make_tls_alpn01_certificate(identifier: str, key_authorization: str) -> CertifiedKey:
    """The RFC 8737 validation certificate: self-signed, one SAN (dNSName, or iPAddress for an
    IP *identifier* as RFC 8738 asks), critical acmeIdentifier."""
    ip = _ip_address(identifier)
    san = x509.IPAddress(ip) if ip is not None else x509.DNSName(identifier)
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpbox ACME TLS-ALPN-01")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        # DER OCTET STRING (tag 4, length 32) holding the digest.
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(chain=(cert,), key=key)


# The ordering worker's TLS-ALPN-01 certificate and key (PEM), for the other workers.
_ALPN_FILE = "tls-alpn-01.pem"


def _pem(ck: CertifiedKey) -> bytes:
    return ck.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()) + ck.leaf.public_bytes(serialization.Encoding.PEM)


def _decode_eab_key(value: str) -> str:
    """The EAB HMAC key as unpadded base64url (the form josepy decodes); accepts std base64 too."""
    text = value.strip().replace("+", "-").replace("/", "_").rstrip("=")
    try:
        jose.b64.b64decode(text)
    except (binascii.Error, ValueError):
        raise ValueError("-acme-eab-key is neither base64url nor standard base64") from None
    return text


class AcmeCertificateSource(CertificateHolder, Service):
    """A certificate source that obtains and renews its certificate over ACME."""

    METRICS = CertificateHolder.METRICS + tuple(m._replace(attr="stats." + m.attr) for m in AcmeStats.METRICS) + (
        gauge("expiring", "derpbox_acme_certificate_expiring",
              "1 when the served certificate is near expiry because renewals keep failing (the log says why), "
              "else 0."),
    )

    def __init__(
        self,
        reactor,
        *,
        hostname: str,
        certdir: str | os.PathLike[str],
        directory_url: str,
        email: str = "",
        ca_file: str | os.PathLike[str] | None = None,
        eab_kid: str = "",
        eab_key: str = "",
        challenge: str = "auto",
        http01_available: bool = True,
        shared_challenges: str | os.PathLike[str] | None = None,
        profile: str | None = None,
        renew_fraction: float = 1 / 3,
        retry_min: float = 60.0,
        retry_max: float = 1800.0,
        order_timeout: float = 90.0,
        clock=None,
    ) -> None:
        CertificateHolder.__init__(self)
        if not hostname:
            raise ValueError("ACME certificates need a hostname (a DNS name or, with -acme-ip-certs, an IP address)")
        if challenge not in ("auto", HTTP01, TLSALPN01):
            raise ValueError(f"unknown ACME challenge type {challenge!r} (auto, http-01 or tls-alpn-01)")
        if bool(eab_kid) != bool(eab_key):
            raise ValueError("-acme-eab-kid and -acme-eab-key must be given together")
        if not 0 < renew_fraction <= 1:
            raise ValueError("renew_fraction must be in (0, 1]")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.ip = _ip_address(hostname)
        self.hostname = str(self.ip) if self.ip is not None else hostname.rstrip(".").lower()
        # The profile to ask for when the CA lists it; by default derper's choice.
        self.profile = profile if profile is not None else (SHORTLIVED_PROFILE if self.ip is not None else "")
        self.certdir = Path(certdir)
        self.directory_url = directory_url
        self.email = email
        self.ca_file = os.fspath(ca_file) if ca_file else None
        self.eab_kid = eab_kid
        self.eab_key = _decode_eab_key(eab_key) if eab_key else ""
        self.challenge = challenge
        self.http01_available = http01_available
        self.renew_fraction = renew_fraction
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.order_timeout = order_timeout
        self.stats = AcmeStats()
        self.crt_path, self.key_path = acme_cert_paths(self.certdir, self.hostname)
        self.account_key_path = self.certdir / ACCOUNT_KEY_FILE
        self._http01: dict[str, bytes] = {}
        # With workers (derpbox.workers): HTTP-01 answers also go here, for the worker that
        # happens to take the CA's validation request.
        self.shared_challenges = Path(shared_challenges) if shared_challenges else None
        self._tls_alpn: dict[str, CertifiedKey] = {}
        self._timer = None
        self._backoff = retry_min
        self._inflight: defer.Deferred | None = None
        self._account_key: jose.JWK | None = None
        self._regr: messages.RegistrationResource | None = None

    # --- challenge hooks (called in the reactor thread) -----------------------------

    def http01_response(self, token: str) -> bytes | None:
        """The key authorization to serve at ``/.well-known/acme-challenge/<token>``, or None."""
        return self._http01.get(token)

    def tls_alpn_certificate(self, server_name: str) -> CertifiedKey | None:
        """The RFC 8737 certificate for an ``acme-tls/1`` handshake with SNI *server_name*, or None."""
        return self._tls_alpn.get(server_name.rstrip(".").lower())

    @property
    def expiring(self) -> int:
        current = self.current()
        return int(current is not None and self.clock.seconds() >= warning_time(current))

    # --- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self.certdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stored = self._load_stored()
        if stored is not None:
            self._publish(stored)
            log.info(
                "ACME: using stored certificate for {hostname} (valid until {not_after:%Y-%m-%d %H:%M:%S} UTC)",
                hostname=self.hostname,
                not_after=stored.not_after,
            )
        self._schedule(0 if stored is None else max(0.0, self._renew_at(stored) - self.clock.seconds()))

    def stopService(self):
        Service.stopService(self)
        self._cancel_timer()
        if self._inflight is not None:
            # The network call finishes in its thread; we only wait for it.
            d = defer.Deferred()
            self._inflight.addBoth(lambda _: d.callback(None))
            return d
        return None

    def renew_now(self) -> defer.Deferred:
        """Order a new certificate now (unless an order is running); fires when the attempt ends."""
        self._cancel_timer()
        return self._check()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if not self.running:
            return
        self.stats.next_check = self.clock.seconds() + delay
        self._timer = self.clock.callLater(delay, self._check)

    def _renew_at(self, ck: CertifiedKey) -> float:
        start = ck.leaf.not_valid_before_utc.timestamp()
        end = ck.not_after.timestamp()
        return end - self.renew_fraction * (end - start)

    def _load_stored(self) -> CertifiedKey | None:
        if not self.crt_path.exists() and not self.key_path.exists():
            return None
        try:
            return load_certified_key(self.crt_path, self.key_path, self.hostname)
        except CertificateError as e:
            log.warn("ACME: ignoring stored certificate, a new one will be ordered: {error}", error=str(e))
            return None

    def _publish(self, ck: CertifiedKey) -> None:
        self.stats.not_after = ck.not_after.timestamp()
        self.publish(ck)

    def _check(self) -> defer.Deferred:
        self._timer = None
        if self._inflight is not None:
            return self._inflight
        d = self._inflight = self._attempt()

        def done(_):
            self._inflight = None

        d.addBoth(done)
        return d

    @defer.inlineCallbacks
    def _attempt(self):
        renewing = self.current() is not None
        try:
            ck = yield self._obtain()
        except Exception as e:
            kind, message = _describe_failure(e)
            self.stats.failures[kind] += 1
            self.stats.last_error = message
            self.stats.last_error_time = self.clock.seconds()
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self.retry_max)
            log.error(
                "ACME: could not {what} a certificate for {hostname} from {directory} ({kind}): {message}; "
                "retrying in {delay:.0f}s",
                what="renew" if renewing else "obtain",
                hostname=self.hostname,
                directory=self.directory_url,
                kind=kind,
                message=message,
                delay=delay,
            )
            self._schedule(delay)
            return
        self._backoff = self.retry_min
        self.stats.issued += 1
        if renewing:
            self.stats.renewals += 1
        if not self.running:
            return
        self._publish(ck)
        log.info(
            "ACME: {what} certificate for {hostname}, serial {serial:x}, valid until {not_after:%Y-%m-%d %H:%M:%S} UTC"
            "{profile}; renewal due {renew_at:%Y-%m-%d %H:%M:%S} UTC",
            what="renewed" if renewing else "obtained",
            hostname=self.hostname,
            serial=ck.leaf.serial_number,
            not_after=ck.not_after,
            profile=f" (profile {self.stats.profile})" if self.stats.profile else "",
            renew_at=datetime.datetime.fromtimestamp(self._renew_at(ck), datetime.timezone.utc),
        )
        # Never loop on a CA that issues certificates already due for renewal.
        self._schedule(max(self._renew_at(ck) - self.clock.seconds(), self.retry_min))

    # --- the ACME flow ----------------------------------------------------------------

    @defer.inlineCallbacks
    def _obtain(self):
        order: _Order = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._begin_order)
        self.stats.orders += 1
        self.stats.profile = order.profile
        if order.account_created:
            self.stats.accounts_created += 1
        answered = []
        try:
            for typ, challb, key_authz in order.pending:
                if typ == HTTP01:
                    token = challb.chall.encode("token")
                    self._http01[token] = key_authz.encode("ascii")
                    if self.shared_challenges is not None:
                        self.shared_challenges.mkdir(mode=0o700, exist_ok=True)
                        write_atomically(self.shared_challenges / token, key_authz.encode("ascii"), 0o600)
                else:
                    alpn = make_tls_alpn01_certificate(self.hostname, key_authz)
                    self._tls_alpn[challenge_name(self.hostname)] = alpn
                    if self.shared_challenges is not None:
                        self.shared_challenges.mkdir(mode=0o700, exist_ok=True)
                        write_atomically(self.shared_challenges / _ALPN_FILE, _pem(alpn), 0o600)
                answered.append((typ, challb, key_authz))
            if answered:
                log.info(
                    "ACME: answering {types} for {hostname}",
                    types=", ".join(t for t, _, _ in answered),
                    hostname=self.hostname,
                )
            pem = yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._finish_order, order
            )
        finally:
            for typ, challb, _ in answered:
                if typ == HTTP01:
                    token = challb.chall.encode("token")
                    self._http01.pop(token, None)
                    if self.shared_challenges is not None:
                        (self.shared_challenges / token).unlink(missing_ok=True)
                else:
                    self._tls_alpn.pop(challenge_name(self.hostname), None)
                    if self.shared_challenges is not None:
                        (self.shared_challenges / _ALPN_FILE).unlink(missing_ok=True)
        return pem

    # Runs in a worker thread.
    def _begin_order(self) -> _Order:
        account_key = self._load_account_key()
        net = client.ClientNetwork(
            account_key,
            alg=jose.ES256 if isinstance(account_key, jose.JWKEC) else jose.RS256,
            verify_ssl=self.ca_file or True,
            user_agent=_USER_AGENT,
        )
        try:
            directory = client.ClientV2.get_directory(self.directory_url, net)
        except (requests.exceptions.RequestException, ValueError) as e:
            raise AcmeError("directory", f"cannot fetch ACME directory {self.directory_url}: {e}") from None
        acme = client.ClientV2(directory, net)
        account_created = self._account(acme, account_key, directory)
        key_pem = _new_cert_key_pem()
        if self.ip is not None:
            csr = crypto_util.make_csr(key_pem, ipaddrs=[self.ip])
        else:
            csr = crypto_util.make_csr(key_pem, [self.hostname])
        profile = self._choose_profile(directory)
        orderr = acme.new_order(csr, profile=profile)
        pending = []
        for authzr in orderr.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # reused authorization (e.g. PEBBLE_AUTHZREUSE): nothing to answer
            pending.append(self._choose_challenge(authzr, account_key))
        return _Order(acme, orderr, pending, key_pem, account_created, profile or "")

    # Runs in a worker thread.
    def _finish_order(self, order: _Order) -> CertifiedKey:
        for typ, challb, key_authz in order.pending:
            if typ == HTTP01:
                response = challenges.HTTP01Response(key_authorization=key_authz)
            else:
                response = TLSALPN01Response(key_authorization=key_authz)
            order.acme.answer_challenge(challb, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
        orderr = order.acme.poll_and_finalize(order.order, deadline)
        fullchain = orderr.fullchain_pem.encode("ascii")
        key_pem = order.key_pem
        # Key first: a crash in between leaves a mismatch, which the next start replaces.
        write_atomically(self.key_path, key_pem, 0o600)
        write_atomically(self.crt_path, fullchain, 0o644)
        try:
            return load_certified_key(self.crt_path, self.key_path, self.hostname)
        except CertificateError as e:
            raise AcmeError("bad_certificate", f"the CA issued an unusable certificate: {e}") from None

    def _choose_profile(self, directory: messages.Directory) -> str | None:
        """The profile to request: ours when the CA lists it, else none (the CA's default)."""
        if not self.profile:
            return None
        offered = directory.meta.profiles or {}
        if self.profile in offered:
            return self.profile
        # A CA without profiles (e.g. Pebble before 2.7) issues its one kind; one that has
        # others may refuse the identifier, and its error then says so.
        log.emit(
            LogLevel.warn if offered else LogLevel.info,
            "ACME: {directory} {lists}: ordering without the {profile!r} profile for {hostname}",
            directory=self.directory_url,
            lists=f"lists the profiles {', '.join(sorted(offered))}" if offered else "lists no profiles",
            profile=self.profile,
            hostname=self.hostname,
        )
        return None

    def _choose_challenge(self, authzr: messages.AuthorizationResource, account_key: jose.JWK):
        offered: dict[str, Any] = {}
        for challb in authzr.body.challenges:
            offered.setdefault(_chall_type(challb), challb)
        if self.challenge == "auto":
            preference = [HTTP01, TLSALPN01] if self.http01_available else [TLSALPN01]
        else:
            preference = [self.challenge]
        for typ in preference:
            challb = offered.get(typ)
            if challb is None:
                continue
            if typ == HTTP01:
                return typ, challb, challb.chall.key_authorization(account_key)
            token = challb.chall.jobj["token"]
            thumbprint = jose.b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode()
            return typ, challb, f"{token}.{thumbprint}"
        raise AcmeError(
            "no_challenge",
            f"the CA offers {', '.join(sorted(t for t in offered if t))} for {self.hostname}; "
            f"derpbox can answer {', '.join(preference)}",
        )

    def _load_account_key(self) -> jose.JWK:
        if self._account_key is not None:
            return self._account_key
        if self.account_key_path.exists():
            key = serialization.load_pem_private_key(self.account_key_path.read_bytes(), password=None)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            write_atomically(self.account_key_path, pem, 0o600)
            log.info("ACME: created account key {path}", path=str(self.account_key_path))
        if isinstance(key, ec.EllipticCurvePrivateKey):
            self._account_key = jose.JWKEC(key=key)
        elif isinstance(key, rsa.RSAPrivateKey):
            self._account_key = jose.JWKRSA(key=key)
        else:
            raise AcmeError("account", f"{self.account_key_path}: unsupported account key type {type(key).__name__}")
        return self._account_key

    # Runs in a worker thread; True when a new account was registered.
    def _account(self, acme: client.ClientV2, account_key: jose.JWK, directory: messages.Directory) -> bool:
        # Look the key's account up first: no new registration when it exists.
        try:
            regr = acme.query_registration(messages.RegistrationResource(body=messages.Registration()))
            self._regr = regr
            return False
        except messages.Error as e:
            if e.code != "accountDoesNotExist":
                raise
        eab = None
        if self.eab_kid:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=account_key.public_key(),
                kid=self.eab_kid,
                hmac_key=self.eab_key,
                directory=directory,
            )
        elif acme.external_account_required():
            raise AcmeError("account", "the CA requires external account binding: set -acme-eab-kid and -acme-eab-key")
        reg = messages.NewRegistration.from_data(
            email=self.email or None, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            self._regr = acme.new_account(reg)
        except errors.ConflictError as e:
            self._regr = acme.query_registration(
                messages.RegistrationResource(uri=e.location, body=messages.Registration())
            )
            return False
        log.info("ACME: registered account {uri}", uri=self._regr.uri)
        return True


def _chall_type(challb: messages.ChallengeBody) -> str:
    if isinstance(challb.chall, challenges.UnrecognizedChallenge):
        return str(challb.chall.jobj.get("type", "?"))
    return challb.chall.typ


def _new_cert_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _describe_failure(e: BaseException) -> tuple[str, str]:
    """(kind, message) for the log and the stats; the CA's own words where it gave any."""
    if isinstance(e, AcmeError):
        return e.kind, str(e)
    if isinstance(e, messages.Error):
        code = e.code or "unknown"
        kind = "rate_limited" if code == "rateLimited" else "ca_error"
        return kind, f"{e.typ}: {e.detail or e.title or e.description or ''}"
    if isinstance(e, errors.ValidationError):
        parts = []
        for authzr in e.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    err = challb.error
                    parts.append(f"{_chall_type(challb)}: {err.typ}: {err.detail}")
        return "challenge", "challenge failed: " + ("; ".join(parts) or "no detail from the CA")
    if isinstance(e, errors.TimeoutError):
        return "timeout", "timed out waiting for the CA to validate or issue"
    if isinstance(e, errors.IssuanceError):
        err = e.error
        return "ca_error", f"issuance failed: {err.typ}: {err.detail}"
    if isinstance(e, requests.exceptions.RequestException):
        return "network", f"{type(e).__name__}: {e}"
    if isinstance(e, errors.Error):
        return "acme", f"{type(e).__name__}: {e}"
    return "other", f"{type(e).__name__}: {e}"


class AcmeFollower(CertificateHolder, Service):
    """What the other workers of a node serve in an ACME mode: the certificate one worker
    orders and renews (read from ``-certdir`` when its files change), and that worker's
    HTTP-01 answers (read from ``shared_challenges``). Serves nothing until the first
    certificate exists."""

    poll_interval = 1.0

    def __init__(self, reactor, *, hostname: str, certdir: str | os.PathLike[str],
                 shared_challenges: str | os.PathLike[str]) -> None:
        CertificateHolder.__init__(self)
        self.reactor = reactor
        self.hostname = hostname
        self.crt_path, self.key_path = acme_cert_paths(certdir, hostname)
        self.shared_challenges = Path(shared_challenges)
        self._seen = None
        self._loop = None

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def poll(self) -> None:
        try:
            state = tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, (self.crt_path, self.key_path)))
        except OSError:
            return
        if state == self._seen:
            return
        try:
            ck = load_certified_key(self.crt_path, self.key_path, self.hostname)
        except CertificateError:
            # The ordering worker writes key then certificate: the pair settles on a later poll.
            return
        self._seen = state
        self.publish(ck)
        log.info("ACME: serving the certificate the ordering worker obtained for {hostname}", hostname=self.hostname)

    def http01_response(self, token: str) -> bytes | None:
        if "/" in token or token.startswith("."):
            return None
        try:
            return (self.shared_challenges / token).read_bytes()
        except OSError:
            return None

    def tls_alpn_certificate(self, server_name: str) -> CertifiedKey | None:
        """The ordering worker's TLS-ALPN-01 certificate, while it has one for our name."""
        if server_name.rstrip(".").lower() != challenge_name(self.hostname):
            return None
        try:
            pem = (self.shared_challenges / _ALPN_FILE).read_bytes()
        except OSError:
            return None
        return CertifiedKey(chain=(x509.load_pem_x509_certificate(pem),),
                            key=serialization.load_pem_private_key(pem, None))
