"""The socket transports of relay connections (derpbox.web.transports).

An idle relay connection's Python objects stay compact (issue 14, idle memory).

CPython stores an object's attributes in a compact array whose names are shared by its
class, but only the names its first few dozen objects set. A name first set later turns
that object's attributes into a dict of its own (0.4-0.8 KiB). The relay's socket and
TLS transports set every name they will use when they are made (derpbox.web.transports,
derpbox.tls.transport); this checks it on a server whose first connections were probes
that never got that far, as a load balancer's health checks are.

A worker's internal link reads with plain recv(), not the recvmsg() Twisted's unix
transport uses for passing descriptors. Writes go out in send()s of at most SEND_LIMIT.
"""

from __future__ import annotations

import gc
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python import sendmsg

from derpbox.client import DERPClient
from derpbox.web.connection import tcp_transport
from derpbox.service import ListenerService
from derpbox.web.transports import READ_SIZE, SEND_LIMIT, TRANSPORT_BUFFER, RelayTCPServer, RelayUNIXServer

from .support import wait_for

# CPython lets a class's shared attribute names grow only while it has made fewer objects.
PROBES = 40


def own_dict(obj) -> bool:
    """Whether ``obj``'s attributes live in a dict of its own (the GC then sees that dict)."""
    return any(type(ref) is dict for ref in gc.get_referents(obj))


def probe(port: int) -> None:
    for _ in range(PROBES):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.inlineCallbacks
def test_relay_connections_keep_compact_attributes_after_probes(start_server, tls):
    server = yield start_server(tls=tls)
    yield deferToThread(probe, server.port)
    yield wait_for(lambda: not server.service.front.open_connections)
    clients = yield deferToThread(lambda: [DERPClient.connect(server.url) for _ in range(2)])
    try:
        yield wait_for(lambda: server.stats.current_connections == 2)
        # One relays to the other, so its transports have written and registered a producer.
        clients[0].send_packet(clients[1].public_key, b"x" * 1000)
        yield deferToThread(clients[1].recv_packet, 5)
        for front in server.service.front.open_connections:
            tcp = tcp_transport(front.transport)
            assert type(tcp) is RelayTCPServer
            assert not own_dict(tcp), "the socket transport's attributes turned into a dict"
            if tls:
                assert not own_dict(front.transport), "the TLS transport's attributes turned into a dict"
    finally:
        for client in clients:
            client.close()


class Echo(Protocol):
    def connectionMade(self):
        self.factory.transports.append(self.transport)

    def dataReceived(self, data):
        self.transport.write(data.upper())


def exchange(path: str, payloads: list[bytes]) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        got = b""
        for payload in payloads:
            sock.sendall(payload)
            while len(got) < sum(map(len, payloads[: payloads.index(payload) + 1])):
                got += sock.recv(65536)
        return got


@pytest_twisted.inlineCallbacks
def test_worker_links_read_and_write_without_recvmsg(tmp_path, monkeypatch):
    def no_recvmsg(*args, **kwargs):
        raise AssertionError("recvmsg used on a worker link")

    monkeypatch.setattr(sendmsg, "recvmsg", no_recvmsg)
    factory = Factory.forProtocol(Echo)
    factory.transports = []
    path = str(tmp_path / "w.sock")
    listener = ListenerService(UNIXServerEndpoint(reactor, path), factory, "test link")
    listener.startService()
    try:
        yield listener.ready
        payloads = [b"forward packet %d " % i * 50 for i in range(20)]
        got = yield deferToThread(exchange, path, payloads)
        assert got == b"".join(payloads).upper()
        assert [type(t) for t in factory.transports] == [RelayUNIXServer]
    finally:
        yield listener.stopService()


class Chunks(Protocol):
    def connectionMade(self):
        self.factory.chunks = []

    def dataReceived(self, data):
        self.factory.chunks.append(len(data))


@pytest_twisted.inlineCallbacks
def test_reads_are_at_most_read_size_below_the_pause_threshold():
    assert READ_SIZE < TRANSPORT_BUFFER
    factory = Factory.forProtocol(Chunks)
    listener = ListenerService(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory, "test")
    listener.startService()
    try:
        port = yield listener.ready
        burst = 4 * TRANSPORT_BUFFER

        def send():
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as sock:
                sock.sendall(bytes(burst))

        yield deferToThread(send)
        yield wait_for(lambda: sum(getattr(factory, "chunks", [])) == burst)
        assert max(factory.chunks) <= READ_SIZE
    finally:
        yield listener.stopService()


class CountingSocket:
    """The transport's socket, recording what each send() was offered and took."""

    def __init__(self, sock):
        self._sock = sock
        self.sends: list[tuple[int, int]] = []

    def send(self, data):
        taken = self._sock.send(data)
        self.sends.append((len(data), taken))
        return taken

    def __getattr__(self, name):
        return getattr(self._sock, name)


class BigWriter(Protocol):
    def connectionMade(self):
        self.transport.socket = self.factory.counting = CountingSocket(self.transport.socket)
        self.factory.transport = self.transport
        self.transport.write(self.factory.payload)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.lost = reason


@inlineCallbacks
def against_big_writer(client):
    """Run ``client(port)`` in a thread against a listener whose connections each write
    2.5 x SEND_LIMIT at once and close; the factory (once the connection is lost) and
    what ``client`` returned."""
    factory = Factory.forProtocol(BigWriter)
    factory.payload = bytes(range(256)) * (10 * SEND_LIMIT // 256 // 4)
    factory.lost = None
    listener = ListenerService(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory, "test")
    listener.startService()
    try:
        port = yield listener.ready
        result = yield deferToThread(client, port.getHost().port)
        yield wait_for(lambda: factory.lost is not None)
        return factory, result
    finally:
        yield listener.stopService()


def receive_all(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
        return bytes(got)


def connect_and_reset(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(1)  # the server is writing
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest_twisted.inlineCallbacks
def test_writes_go_out_whole_in_sends_of_at_most_the_send_limit():
    factory, got = yield against_big_writer(receive_all)
    assert got == factory.payload
    sends = factory.counting.sends
    assert type(factory.transport) is RelayTCPServer
    assert max(offered for offered, _ in sends) == SEND_LIMIT
    assert sum(taken for _, taken in sends) == len(factory.payload)
    assert factory.lost.check(ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_a_write_to_a_reset_peer_loses_the_connection():
    factory, _ = yield against_big_writer(connect_and_reset)
    assert factory.lost.check(ConnectionLost)
