"""What derpbox calls through pyOpenSSL's cffi binding (``OpenSSL._util``) directly.

Two things pyOpenSSL's API cannot do, or does at a cost above the work itself:

- **Fresh memory BIOs once a handshake is over** (``renew_bios``). OpenSSL's memory BIOs
  keep the capacity their largest content needed: after the handshake that is the
  server's certificate flight and the client's key share, about 4.4 KiB per connection
  for as long as it lives. pyOpenSSL has no call for it.
- **Record I/O** (``read_plaintext``, ``write_plaintext``, ``read_ciphertext``,
  ``write_ciphertext``). Around each SSL_read, SSL_write and BIO_read pyOpenSSL adds
  argument checks, a fresh buffer (128 KiB for every ``bio_read``) and, for the SSL_read
  that finds no further record, an exception built from OpenSSL's error queue. Measured
  on one 1,200-byte packet per TLS record: 4.7 us to take a record in and 3.1 us to send
  one through pyOpenSSL, 1.7 and 1.2 us through these (the rest is the cipher). Errors
  other than "needs more bytes" are still raised by pyOpenSSL itself, from the same
  result, so the exceptions and their text are pyOpenSSL's.

The buffers are the process's, reused by every connection: the reactor runs these from
one thread, and every result is copied out before the next call. With a pyOpenSSL whose
internals differ, ``DIRECT`` is False and the same four calls go through pyOpenSSL's API
(``RENEWABLE`` False: BIOs are not renewed).
"""

from __future__ import annotations

from OpenSSL import SSL

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:
    _ffi = _lib = None

RENEWABLE = _lib is not None and all(
    hasattr(_lib, name) for name in ("BIO_new", "BIO_s_mem", "BIO_free", "BIO_get_mem_data", "SSL_set_bio"))

DIRECT = (_lib is not None and all(hasattr(_lib, name) for name in (
    "SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ", "BIO_read", "BIO_write"))
    and hasattr(SSL.Connection, "_raise_ssl_error"))

# At most one record's plaintext (16 KiB) comes out of an SSL_read; a BIO_read takes
# several records at once.
PLAINTEXT_CHUNK = 1 << 15
CIPHERTEXT_CHUNK = 1 << 17

if DIRECT:
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _plain = _ffi.new("char[]", PLAINTEXT_CHUNK)
    _plain_view = _ffi.buffer(_plain)
    _cipher = _ffi.new("char[]", CIPHERTEXT_CHUNK)
    _cipher_view = _ffi.buffer(_cipher)


def _read_plaintext_direct(conn: SSL.Connection) -> bytes | None:
    ssl = conn._ssl
    n = _lib.SSL_read(ssl, _plain, PLAINTEXT_CHUNK)
    if n > 0:
        return _plain_view[:n]
    if _lib.SSL_get_error(ssl, n) == _WANT_READ:
        return None
    conn._raise_ssl_error(ssl, n)
    raise SSL.Error(f"SSL_read returned {n} and OpenSSL reported no error")


def _read_plaintext_api(conn: SSL.Connection) -> bytes | None:
    try:
        return conn.recv(PLAINTEXT_CHUNK)
    except SSL.WantReadError:
        return None


def _write_plaintext_direct(conn: SSL.Connection, data) -> int:
    ssl = conn._ssl
    n = _lib.SSL_write(ssl, _ffi.from_buffer(data), len(data))
    if n > 0:
        return n
    conn._raise_ssl_error(ssl, n)
    raise SSL.Error(f"SSL_write returned {n} and OpenSSL reported no error")


def _write_plaintext_api(conn: SSL.Connection, data) -> int:
    return conn.send(data)


def _read_ciphertext_direct(conn: SSL.Connection) -> bytes:
    n = _lib.BIO_read(conn._from_ssl, _cipher, CIPHERTEXT_CHUNK)
    if n <= 0:
        return b""
    if n < CIPHERTEXT_CHUNK:
        return _cipher_view[:n]
    parts = [_cipher_view[:n]]
    while (n := _lib.BIO_read(conn._from_ssl, _cipher, CIPHERTEXT_CHUNK)) > 0:
        parts.append(_cipher_view[:n])
    return b"".join(parts)


def _read_ciphertext_api(conn: SSL.Connection) -> bytes:
    parts = []
    while True:
        try:
            parts.append(conn.bio_read(CIPHERTEXT_CHUNK))
        except SSL.WantReadError:
            return b"".join(parts)


def _write_ciphertext_direct(conn: SSL.Connection, data: bytes) -> None:
    if _lib.BIO_write(conn._into_ssl, data, len(data)) <= 0:
        # A memory BIO takes all or nothing (nothing only when memory ran out): pyOpenSSL
        # tries again, and raises if it fails too.
        conn.bio_write(data)


def _write_ciphertext_api(conn: SSL.Connection, data: bytes) -> None:
    conn.bio_write(data)


# read_plaintext(conn): the plaintext of the next record in conn's input, None when it
#   needs more bytes; raises pyOpenSSL's errors (ZeroReturnError for close_notify).
# write_plaintext(conn, data): seals data (one record's worth, at most 16 KiB); the bytes
#   taken; raises pyOpenSSL's errors (WantReadError while a handshake message is due).
# read_ciphertext(conn): everything conn's output BIO holds, b"" when empty.
# write_ciphertext(conn, data): bytes from the socket into conn's input BIO.
if DIRECT:
    read_plaintext, write_plaintext = _read_plaintext_direct, _write_plaintext_direct
    read_ciphertext, write_ciphertext = _read_ciphertext_direct, _write_ciphertext_direct
else:
    read_plaintext, write_plaintext = _read_plaintext_api, _write_plaintext_api
    read_ciphertext, write_ciphertext = _read_ciphertext_api, _write_ciphertext_api


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
