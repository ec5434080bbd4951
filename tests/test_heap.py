"""derpbox.heap: freezing the heap must not freeze garbage. Closed connections leave
reference cycles (a TLS connection's failure holds a traceback whose frames refer back to
it); frozen, they would stay until the hourly full collection, and memory would grow with
connection churn."""

from __future__ import annotations

import collections
import gc
import socket
import ssl
import struct
import weakref

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.heap import freeze_young

from .support import wait_for


class Node:
    pass


def cyclic_garbage() -> weakref.ref:
    node = Node()
    node.me = node
    return weakref.ref(node)


def test_young_cyclic_garbage_is_freed_not_frozen():
    gc.collect()
    try:
        ref = cyclic_garbage()
        freeze_young()
        assert ref() is None
        # The control: a plain freeze keeps it (which is what happened before).
        ref = cyclic_garbage()
        gc.freeze()
        assert ref() is not None
    finally:
        gc.unfreeze()
        gc.collect()


def garbage_kinds() -> collections.Counter:
    """The types of what a full collection finds unreachable now (frozen objects included)."""
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def churn(port: int, n: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while s.recv(4096):
                pass


@pytest_twisted.inlineCallbacks
def test_connection_churn_leaves_no_frozen_garbage(start_server):
    server = yield start_server()
    gc.collect()
    try:
        for _ in range(4):
            yield deferToThread(churn, server.port, 50)
            yield deferLater(reactor, 0.2, lambda: None)  # let the last closes finish
            freeze_young()  # what derpbox.heap does every 2 s
        left = garbage_kinds()
    finally:
        gc.unfreeze()
    assert left["Failure"] == left["SendNowTLS"] == 0, left.most_common(8)


def close_in_three_ways(clients) -> None:
    """A clean close, a reset, and a TLS record that fails its check, a third each."""
    for i, client in enumerate(clients):
        raw = client.stream.sock
        if i % 3 == 1:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        elif i % 3 == 2:
            raw.sendall(bytes([23, 3, 3, 0, 40]) + bytes(40))
            raw.close()
        else:
            client.close()


@pytest_twisted.inlineCallbacks
def test_long_lived_connections_leave_no_cycles_when_they_close(start_server):
    """Frozen connections (long-lived, as after derpbox.heap's freezes) are freed by reference
    counting when they close, however they close: nothing of them waits for a full collection."""
    server = yield start_server()
    clients = yield deferToThread(lambda: [DERPClient.connect(server.url) for _ in range(30)])
    yield wait_for(lambda: server.stats.current_connections == 30)
    gc.collect()
    gc.freeze()
    try:
        yield deferToThread(close_in_three_ways, clients)
        yield wait_for(lambda: server.stats.current_connections == 0 and not server.service.front.open_connections)
        yield deferLater(reactor, 0.2, lambda: None)  # let the last closes finish
        left = garbage_kinds()
    finally:
        gc.unfreeze()
    kinds = ("Peer", "SendNowTLS", "FrontConnection", "Server", "Connection", "Failure", "DERPStream")
    assert not [kind for kind in kinds if left[kind]], left.most_common(10)
