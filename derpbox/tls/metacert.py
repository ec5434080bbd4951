"""The DERP meta-certificate ("fast start", spec section 8.3).

A throw-away self-signed Ed25519 certificate whose Subject CN carries the
server's DERP public key. It is appended after the real chain in every TLS
handshake; a Tailscale client that negotiated TLS 1.3 reads the key from it
and sends its ClientInfo without waiting for the ServerKey frame. The server
builds it here; the client and the checks read it back with the parser below.
"""

from __future__ import annotations

import datetime
import warnings

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from ..protocol.frames import KEY_LEN

META_CN_PREFIX = "derpkey"
# Clients require the serial to fit in 8 bits; derper uses the protocol version.
META_SERIAL = 2
_VALIDITY = datetime.timedelta(days=30)


def make_meta_certificate(server_public_key: bytes) -> x509.Certificate:
    """Build the meta-certificate for a 32-byte DERP (Curve25519) public key."""
    if len(server_public_key) != KEY_LEN:
        raise ValueError(f"DERP public key must be {KEY_LEN} bytes, got {len(server_public_key)}")
    cn = META_CN_PREFIX + server_public_key.hex()
    with warnings.catch_warnings():
        # The CN is 71 characters, over X.509's 64-character bound for CN;
        # derper sends exactly this, so the bound must be waived.
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)])
    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(META_SERIAL)
        .not_valid_before(now - _VALIDITY)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )


def _common_name(cert: x509.Certificate) -> str:
    with warnings.catch_warnings():
        # The meta-certificate's CN is over X.509's bound (see above), which cryptography warns about.
        warnings.simplefilter("ignore", UserWarning)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def is_meta_certificate(cert: x509.Certificate) -> bool:
    return _common_name(cert).startswith(META_CN_PREFIX)


def meta_certificate_key(chain: list[x509.Certificate]) -> bytes | None:
    """The DERP key in a chain's meta-certificate, as the Go client finds it, or None."""
    for cert in chain:
        cn = _common_name(cert)
        # The serial must fit in 8 bits (see META_SERIAL).
        if not cn.startswith(META_CN_PREFIX) or cert.serial_number >= 256:
            continue
        try:
            key = bytes.fromhex(cn[len(META_CN_PREFIX) :])
        except ValueError:
            continue
        if len(key) == KEY_LEN:
            return key
    return None
