"""derpbox's reactor (derpbox.reactor): Twisted's epoll reactor without the legacy log
context per event, still dispatching and reporting as Twisted's does."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.python import log

from derpbox.reactor import RelayReactor


class Reader(FileDescriptor):
    """A socket end that records what doRead saw, and closes another on request."""

    def __init__(self, reactor, sock, log_list, *, fail=False, closes=None):
        super().__init__(reactor)
        self.sock = sock
        self.log = log_list
        self.fail = fail
        self.closes = closes
        self.lost = None

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.log.append((self, self.sock.recv(100)))
        if self.closes is not None:
            self.reactor.removeReader(self.closes)
        if self.fail:
            raise RuntimeError("broken reader")

    def connectionLost(self, reason):
        self.lost = reason
        self.reactor.removeReader(self)


@pytest.fixture
def relay_reactor():
    reactor = RelayReactor()
    yield reactor
    reactor._poller.close()
    reactor.waker.connectionLost(None)


@pytest.fixture
def pairs():
    made = [socket.socketpair() for _ in range(3)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def test_ready_descriptors_are_read_in_one_pass(relay_reactor, pairs):
    seen = []
    readers = [Reader(relay_reactor, b, seen) for _, b in pairs]
    for reader in readers:
        relay_reactor.addReader(reader)
    for i, (a, _) in enumerate(pairs):
        a.send(b"packet %d" % i)
    relay_reactor.doIteration(0)
    assert sorted(data for _, data in seen) == [b"packet 0", b"packet 1", b"packet 2"]


def test_a_failing_read_loses_that_connection_only_and_is_logged(relay_reactor, pairs):
    seen, errors = [], []
    bad = Reader(relay_reactor, pairs[0][1], seen, fail=True)
    good = Reader(relay_reactor, pairs[1][1], seen)
    relay_reactor.addReader(bad)
    relay_reactor.addReader(good)
    log.addObserver(errors.append)
    try:
        pairs[0][0].send(b"x")
        pairs[1][0].send(b"y")
        relay_reactor.doIteration(0)
    finally:
        log.removeObserver(errors.append)
    assert bad.lost is not None and bad.lost.check(RuntimeError)
    assert good.lost is None and (good, b"y") in seen
    assert any(e.get("isError") and "broken reader" in str(e.get("failure", "")) for e in errors)


def test_a_descriptor_removed_earlier_in_the_pass_is_not_called(relay_reactor, pairs):
    seen = []
    second = Reader(relay_reactor, pairs[1][1], seen)
    first = Reader(relay_reactor, pairs[0][1], seen, closes=second)
    relay_reactor.addReader(first)
    relay_reactor.addReader(second)
    # Both are ready in the same pass; whichever epoll reports first, "second" is read at
    # most once and never after "first" removed it.
    pairs[0][0].send(b"a")
    pairs[1][0].send(b"b")
    relay_reactor.doIteration(0)
    order = [r for r, _ in seen]
    assert order in ([first], [second, first])


def test_install_makes_it_twisteds_reactor():
    code = ("from derpbox.reactor import RelayReactor, install_relay_reactor\n"
            "r = install_relay_reactor()\n"
            "from twisted.internet import reactor\n"
            "assert r is reactor and type(reactor) is RelayReactor\n"
            "assert install_relay_reactor() is reactor\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
