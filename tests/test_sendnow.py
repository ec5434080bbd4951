"""Writes that leave in the same reactor pass (derpbox.sendnow, derpbox.tls.transport):
a real TLS listener on loopback, and a client on memory BIOs whose socket the test reads
without letting the reactor run in between."""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from derpbox.tls.certs import ManualCertificateSource
from derpbox.tls.context import ServerTLS
from derpbox.tls.binding import RENEWABLE
from derpbox.tls.transport import RECORDS_PER_PASS, server_tls_factory

from .certs import make_cert


@implementer(IHandshakeListener)
class Held(Protocol):
    """The server side: kept, once its TLS handshake is done, so the test can write to it."""

    def handshakeCompleted(self):
        self.factory.connections.append(self)
        self.received = []
        tls = self.transport._tlsConnection
        self.handshake_bios = (tls._into_ssl, tls._from_ssl)

    def dataReceived(self, data):
        self.received.append(data)


class Client:
    """TLS on memory BIOs over a plain socket: the test decides when the socket is read."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="derp.example.com")

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(65536))
        self.sock.sendall(self.outgoing.read())

    def plaintext(self, raw: bytes) -> bytes:
        self.incoming.write(raw)
        out = b""
        while True:
            try:
                out += self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                return out

    def read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self.plaintext(self.sock.recv(1 << 16))  # the socket's timeout bounds the wait
        return out


@pytest_twisted.inlineCallbacks
def test_tls_records_reach_the_socket_in_the_writing_call(tmp_path):
    make_cert(tmp_path, "derp.example.com")
    source = ManualCertificateSource(tmp_path, "derp.example.com")
    factory = Factory.forProtocol(Held)
    factory.connections = []
    port = reactor.listenTCP(0, server_tls_factory(ServerTLS(source, "derp.example.com", bytes(32)), factory, reactor),
                             interface="127.0.0.1")
    try:
        client = yield threads.deferToThread(Client, port.getHost().port)
        yield threads.deferToThread(client.handshake)
        # Until the server has the client's Finished, its writes would wait for a read.
        while not factory.connections:
            yield threads.deferToThread(lambda: None)
        server = factory.connections[0]
        server.transport.write(b"relayed packet" * 100)
        # Read here, in the reactor's thread: the reactor cannot run until this returns, so
        # what arrives was sent by the write itself, not queued for a later pass.
        assert client.read_exactly(1400) == b"relayed packet" * 100
        # Once the handshake's output was sent, the memory BIOs it grew were swapped for
        # fresh ones (derpbox.tls.binding), and everything below still flows both ways.
        tls = server.transport._tlsConnection
        assert RENEWABLE and server.transport._bios_renewed
        assert (tls._into_ssl, tls._from_ssl) != server.handshake_bios

        # More than the socket takes at once: the rest is queued and follows, in order.
        big = bytes(range(256)) * (32 << 10)  # 8 MiB
        server.transport.write(big)
        received = yield threads.deferToThread(client.read_exactly, len(big))
        assert hashlib.sha256(received).digest() == hashlib.sha256(big).digest()

        # The other way: 50 records that arrive in one socket read are delivered in one call
        # (Go's client seals one record per packet; the relay then works once per read).
        for i in range(50):
            client.tls.write(b"packet %02d;" % i)
        client.sock.sendall(client.outgoing.read())
        expected = b"".join(b"packet %02d;" % i for i in range(50))
        while b"".join(server.received) != expected:
            yield threads.deferToThread(lambda: None)
        assert len(server.received) == 1

        # 1-byte records, more than one pass decrypts: the rest comes in later passes, in order.
        server.received.clear()
        for i in range(3 * RECORDS_PER_PASS + 10):
            client.tls.write(b"%c" % (65 + i % 26))
        client.sock.sendall(client.outgoing.read())
        expected = bytes(65 + i % 26 for i in range(3 * RECORDS_PER_PASS + 10))
        while b"".join(server.received) != expected:
            yield threads.deferToThread(lambda: None)
        # (Usually [256, 256, 256, 10]; a read the kernel split gives smaller pieces, never larger.)
        assert len(server.received) >= 4 and max(map(len, server.received)) == RECORDS_PER_PASS
        client.sock.close()
    finally:
        yield port.stopListening()
