"""pyOpenSSL server contexts for the DERP TLS listener.

:class:`ServerTLS` is an old-style Twisted context factory: Twisted calls
``getContext()`` once per accepted connection (``twisted.protocols.
_tls_legacy.older``) and builds the ``SSL.Connection`` from whatever it
returns. A certificate change therefore only needs a new ``SSL.Context``:
existing connections keep the context they were created with.
"""

from __future__ import annotations

from typing import Callable

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from ..logs import LogThrottle
from ..netaddr import is_ip
from .certs import CertificateSource, CertifiedKey
from .metacert import make_meta_certificate

log = Logger()

_HTTP11 = b"http/1.1"
_ACME_TLS_1 = b"acme-tls/1"
TLSALPNResponder = Callable[[str], "CertifiedKey | None"]
"""ACME tls-alpn-01 hook: SNI -> the RFC 8737 validation certificate, or None."""
# Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 keeps OpenSSL's defaults.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """TLS server settings for DERP: certificate from *source*, meta-certificate appended.

    With *strict_sni* and a DNS *hostname*, handshakes whose SNI is not the
    hostname fail (derper's manual mode); with an IP hostname any SNI or none
    is accepted.
    """

    def __init__(
        self,
        source: CertificateSource,
        hostname: str,
        server_public_key: bytes,
        strict_sni: bool = True,
        log_throttle: LogThrottle | None = None,
        groups: str = "",
        tls_alpn_responder: TLSALPNResponder | None = None,
    ) -> None:
        self.hostname = hostname
        self.groups = groups
        self.meta_certificate = make_meta_certificate(server_public_key)
        self._expected_sni = _normalize_name(hostname) if strict_sni and not is_ip(hostname) else None
        self._throttle = log_throttle or LogThrottle(log)
        # Holds no certificate, so any handshake switched to it (or started
        # on it) fails in OpenSSL with a handshake_failure alert.
        self._refusing_context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context: SSL.Context | None = None
        self._tls_alpn = tls_alpn_responder or getattr(source, "tls_alpn_certificate", None)
        # Before the first certificate: no certificate either, but ACME
        # tls-alpn-01 handshakes can still be switched to their own context.
        self._pending_context = self._refusing_context
        if self._tls_alpn is not None:
            self._pending_context = SSL.Context(SSL.TLS_SERVER_METHOD)
            self._pending_context.set_alpn_select_callback(self._select_alpn)
            # Without a servername callback OpenSSL fails a handshake on a context with no
            # certificate before it asks for ALPN (seen with OpenSSL 4.0; an IP hostname has no
            # SNI to check), so the validation certificate could never be switched in.
            self._pending_context.set_tlsext_servername_callback(
                self._check_sni if self._expected_sni is not None else _any_sni)
        source.add_listener(self.use)
        current = source.current()
        if current is not None:
            self.use(current)

    def use(self, certified_key: CertifiedKey) -> None:
        """Serve *certified_key* in new handshakes; connections already made are unaffected."""
        self._context = self._build_context(certified_key)

    def getContext(self) -> SSL.Context:
        """The context for a new connection (Twisted asks once per connection)."""
        if self._context is None:
            self._throttle.warn(
                "no-cert",
                "TLS handshake refused: no certificate available yet for {hostname}",
                hostname=self.hostname,
            )
            return self._pending_context
        return self._context

    def _build_context(self, certified_key: CertifiedKey) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(_TLS12_CIPHERS)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        # Frees the per-connection read/write buffers while a connection is idle.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if self.groups:
            _set_groups(ctx, self.groups)
        ctx.use_certificate(certified_key.leaf)
        ctx.use_privatekey(certified_key.key)
        ctx.check_privatekey()
        for intermediate in certified_key.chain[1:]:
            ctx.add_extra_chain_cert(intermediate)
        # Last in the chain, sent on every handshake (spec 8.3).
        ctx.add_extra_chain_cert(self.meta_certificate)
        ctx.set_alpn_select_callback(_select_alpn if self._tls_alpn is None else self._select_alpn)
        if self._expected_sni is not None:
            ctx.set_tlsext_servername_callback(self._check_sni)
        return ctx

    def _check_sni(self, conn: SSL.Connection) -> None:
        # OpenSSL calls this for every ClientHello, with or without SNI. On a
        # resumed TLS 1.2 session it reports the SNI of the original (checked)
        # handshake; TLS 1.3 resumption requires the same SNI anyway.
        raw = conn.get_servername()
        sni = raw.decode("ascii", "backslashreplace") if raw else ""
        if _normalize_name(sni) == self._expected_sni:
            return
        # Raising here would also fail the handshake, but pyOpenSSL hands the
        # exception to sys.excepthook (a traceback per scanner probe); moving
        # the connection to a context without a certificate fails it quietly.
        conn.set_context(self._refusing_context)
        self._throttle.warn(
            "sni-mismatch",
            "TLS handshake refused from {peer}: SNI {sni!r} does not match hostname {hostname!r}",
            peer=_peer_host(conn),
            sni=sni,
            hostname=self.hostname,
        )

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
        # OpenSSL picks the certificate after ALPN, so switching the context
        # here serves the validation certificate (and nothing else) to the CA.
        if offered == [_ACME_TLS_1]:
            raw = conn.get_servername()
            sni = raw.decode("ascii", "replace") if raw else ""
            certified_key = self._tls_alpn(sni) if sni else None
            if certified_key is not None:
                conn.set_context(_acme_context(certified_key))
                log.info("ACME tls-alpn-01 handshake for {sni} from {peer}", sni=sni, peer=_peer_host(conn))
                return _ACME_TLS_1
            self._throttle.warn(
                "acme-tls-1",
                "acme-tls/1 handshake from {peer} for {sni!r} without a pending tls-alpn-01 challenge",
                peer=_peer_host(conn),
                sni=sni,
            )
            return SSL.NO_OVERLAPPING_PROTOCOLS
        return _select_alpn(conn, offered)


def _any_sni(conn: SSL.Connection) -> None:
    """Servername callback accepting every SNI (and none)."""


def _acme_context(certified_key: CertifiedKey) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(certified_key.leaf)
    ctx.use_privatekey(certified_key.key)
    return ctx


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    # pyOpenSSL has no public call for the group list; cryptography's bindings have it.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise ValueError(f"OpenSSL does not accept the group list {groups!r}")


def check_groups(groups: str) -> str:
    """Validate an OpenSSL key-exchange group list ("" keeps OpenSSL's default)."""
    if groups:
        _set_groups(SSL.Context(SSL.TLS_SERVER_METHOD), groups)
    return groups


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
    # Go DERP clients offer no ALPN (this is then not called); a client
    # offering only other protocols still gets HTTP/1.1 without ALPN.
    return _HTTP11 if _HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _normalize_name(name: str) -> str:
    return name.rstrip(".").lower()


def _peer_host(conn: SSL.Connection) -> str:
    # Twisted stores its TLS protocol as the connection's app data.
    protocol = conn.get_app_data()
    return getattr(protocol.getPeer(), "host", "?") if protocol is not None else "?"
