"""Fresh memory BIOs once a TLS handshake is over.

OpenSSL's memory BIOs keep the capacity their largest content needed. After the handshake
that is the server's certificate flight and the client's key share, about 4.4 KiB per
connection, held for as long as the connection lives. Giving the connection new, empty
BIOs hands that back, which matters for thousands of idle connections.

pyOpenSSL has no call for it, so this uses its cffi binding (``OpenSSL._util``) and the
Connection's BIO attributes. With a pyOpenSSL that lacks them, ``renew_bios`` does
nothing and says so (``RENEWABLE`` is False).
"""

from __future__ import annotations

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:
    _ffi = _lib = None

RENEWABLE = _lib is not None and all(
    hasattr(_lib, name) for name in ("BIO_new", "BIO_s_mem", "BIO_free", "BIO_get_mem_data", "SSL_set_bio"))


def renew_bios(conn) -> bool:
    """Give ``conn``, a pyOpenSSL Connection on memory BIOs, two new empty ones. False (and
    nothing done) while either holds bytes, or when this pyOpenSSL cannot do it."""
    if not RENEWABLE:
        return False
    into, out = getattr(conn, "_into_ssl", None), getattr(conn, "_from_ssl", None)
    if into is None or out is None or getattr(conn, "_ssl", None) is None:
        return False
    data = _ffi.new("char **")
    if _lib.BIO_get_mem_data(into, data) or _lib.BIO_get_mem_data(out, data):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    # The SSL object owns its BIOs: setting new ones frees the old.
    _lib.SSL_set_bio(conn._ssl, new_into, new_out)
    conn._into_ssl, conn._from_ssl = new_into, new_out
    return True
