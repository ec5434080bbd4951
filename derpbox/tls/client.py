"""TLS for derpbox's own outbound DERP connections (the mesh): always verified.

As Go's derper dials its mesh peers: the chain is checked against the system roots
(OpenSSL's default paths, so ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` work as they do
for Go), plus a CA file for a private CA, and the name against the certificate.
A DERP map style ``CertName`` replaces the name to check, and ``sha256-raw:<hex>``
pins the leaf of a self-signed IP-only node instead (spec 8.2).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from ..netaddr import is_ip
from .pins import parse_pin

class TLSIdentityError(Exception):
    """The server's certificate does not prove the name (or pin) we expect."""


def _leaf_digest(x509) -> bytes:
    return hashlib.sha256(x509.to_cryptography().public_bytes(Encoding.DER)).digest()


@implementer(IOpenSSLClientConnectionCreator)
class VerifiedClientTLS:
    """Client connections that verify ``host``'s certificate (or ``cert_name``, or a pin)."""

    def __init__(self, host: str, *, cert_name: str = "", ca_file: str = ""):
        self.host = host
        self.pin = parse_pin(cert_name) if cert_name else None
        self.expected_name = host if not cert_name or self.pin is not None else cert_name
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if self.pin is not None:
            ctx.set_verify(SSL.VERIFY_PEER, self._check_pin)
        else:
            ctx.set_default_verify_paths()
            if ca_file:
                ctx.load_verify_locations(ca_file)
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errnum, depth, ok: bool(ok))
        self._ctx = ctx

    def _check_pin(self, conn, cert, errnum, depth, ok) -> bool:
        # Under a pin the chain's issuers do not matter, only the leaf's exact bytes.
        return depth > 0 or _leaf_digest(cert) == self.pin

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        # Go sends no SNI to an IP literal.
        if not is_ip(self.host):
            conn.set_tlsext_host_name(self.host.encode("idna"))
        conn.set_connect_state()
        return conn

    def check_identity(self, conn: SSL.Connection) -> None:
        """After the handshake: the certificate must name what we dialled (TLSIdentityError)."""
        if self.pin is not None:
            return
        try:
            if is_ip(self.expected_name):
                verify_ip_address(conn, self.expected_name)
            else:
                verify_hostname(conn, self.expected_name)
        except VerificationError as e:
            raise TLSIdentityError(f"the certificate is not valid for {self.expected_name}: {e}") from None
