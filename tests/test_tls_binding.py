"""Record I/O through pyOpenSSL's cffi binding (derpbox.tls.binding), and the same four
calls through pyOpenSSL's API (the fallback): both against a real TLS 1.3 session on
memory BIOs, with the same results and pyOpenSSL's own errors."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL

from derpbox.tls import binding

from .certs import make_cert

VARIANTS = {
    "direct": (binding._read_plaintext_direct, binding._write_plaintext_direct,
               binding._read_ciphertext_direct, binding._write_ciphertext_direct),
    "api": (binding._read_plaintext_api, binding._write_plaintext_api,
            binding._read_ciphertext_api, binding._write_ciphertext_api),
}


def test_this_pyopenssl_takes_the_direct_calls():
    # The path the server runs; the fallback exists for a pyOpenSSL whose internals differ.
    assert binding.DIRECT and binding.read_plaintext is binding._read_plaintext_direct


@pytest.fixture(params=sorted(VARIANTS))
def calls(request):
    if request.param == "direct" and not binding.DIRECT:
        pytest.skip("this pyOpenSSL lacks the internals the direct calls use")
    return VARIANTS[request.param]


@pytest.fixture
def contexts(tmp_path):
    _, crt, key = make_cert(tmp_path, "derp.example.com")
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate(x509.load_pem_x509_certificate(crt.read_bytes()))
    server.use_privatekey(load_pem_private_key(key.read_bytes(), None))
    return server, SSL.Context(SSL.TLS_CLIENT_METHOD)


def pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """Move what each side has written to the other (pyOpenSSL's API: the reference)."""
    for src, dst in ((a, b), (b, a)):
        try:
            dst.bio_write(src.bio_read(1 << 20))
        except SSL.WantReadError:
            pass


def session(contexts):
    server = SSL.Connection(contexts[0], None)
    server.set_accept_state()
    client = SSL.Connection(contexts[1], None)
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        pump(client, server)
    assert server.get_protocol_version_name() == "TLSv1.3"
    # The server's session tickets arrive with the client's first read.
    with pytest.raises(SSL.WantReadError):
        client.recv(1)
    return server, client


def sealed(client: SSL.Connection, *plaintexts: bytes) -> bytes:
    for plaintext in plaintexts:
        client.send(plaintext)
    return client.bio_read(1 << 20)


def test_records_in_one_at_a_time_then_none(contexts, calls):
    read_plaintext, _, _, write_ciphertext = calls
    server, client = session(contexts)
    write_ciphertext(server, sealed(client, b"first", b"second" * 1000))
    assert read_plaintext(server) == b"first"
    assert read_plaintext(server) == b"second" * 1000
    assert read_plaintext(server) is None


def test_a_partial_record_needs_more_bytes(contexts, calls):
    read_plaintext, _, _, write_ciphertext = calls
    server, client = session(contexts)
    record = sealed(client, b"x" * 1200)
    write_ciphertext(server, record[:100])
    assert read_plaintext(server) is None
    write_ciphertext(server, record[100:])
    assert read_plaintext(server) == b"x" * 1200


def test_close_notify_is_pyopenssls_zero_return(contexts, calls):
    read_plaintext, _, _, write_ciphertext = calls
    server, client = session(contexts)
    client.shutdown()
    write_ciphertext(server, client.bio_read(1 << 16))
    with pytest.raises(SSL.ZeroReturnError):
        read_plaintext(server)


def test_a_forged_record_raises_pyopenssls_error(contexts, calls):
    read_plaintext, _, _, write_ciphertext = calls
    server, client = session(contexts)
    record = bytearray(sealed(client, b"y" * 100))
    record[-1] ^= 1
    write_ciphertext(server, bytes(record))
    with pytest.raises(SSL.Error) as raised:
        read_plaintext(server)
    assert type(raised.value) is SSL.Error and "bad record mac" in str(raised.value)


def test_sealed_records_reach_the_peer_and_the_output_is_drained(contexts, calls):
    _, write_plaintext, read_ciphertext, _ = calls
    server, client = session(contexts)
    assert read_ciphertext(server) == b""
    payload = bytes(range(256)) * 64
    assert write_plaintext(server, memoryview(payload)[:16384]) == 16384
    assert write_plaintext(server, b"tail") == 4
    client.bio_write(read_ciphertext(server))
    assert read_ciphertext(server) == b""
    got = b""
    while len(got) < 16388:
        got += client.recv(1 << 15)
    assert got == payload[:16384] + b"tail"


def test_more_ciphertext_than_one_read_is_returned_whole(contexts, calls):
    _, write_plaintext, read_ciphertext, _ = calls
    server, client = session(contexts)
    chunk = b"z" * 16384
    for _ in range(2 * binding.CIPHERTEXT_CHUNK // len(chunk)):
        write_plaintext(server, chunk)
    out = read_ciphertext(server)
    assert len(out) > binding.CIPHERTEXT_CHUNK and read_ciphertext(server) == b""
    client.bio_write(out)
    total = 0
    while True:
        try:
            total += len(client.recv(1 << 15))
        except SSL.WantReadError:
            break
    assert total == 2 * binding.CIPHERTEXT_CHUNK


def test_writing_before_the_handshake_wants_a_read(contexts, calls):
    _, write_plaintext, _, _ = calls
    server = SSL.Connection(contexts[0], None)
    server.set_accept_state()
    with pytest.raises(SSL.WantReadError):
        write_plaintext(server, b"too early")
