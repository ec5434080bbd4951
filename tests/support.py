"""Helpers shared by the end-to-end tests: waiting on the reactor, a steady relayed
pair that counts its losses, raw connections the server must close, and reading a
child process's log until a line appears."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from derpbox.client import DERPClient


@pytest_twisted.inlineCallbacks
def wait_for(predicate, timeout=5.0):
    """Let the reactor run until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        yield deferLater(reactor, 0.01, lambda: None)


class SteadyPair:
    """Two clients relaying a numbered packet every few ms in a thread; counts losses."""

    def __init__(self, url, keys=(None, None), **connect):
        self.a = DERPClient.connect(url, keys[0], **connect)
        self.b = DERPClient.connect(url, keys[1], **connect)
        self.sent = 0
        self.received = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.a.send_packet(self.b.public_key, self.sent.to_bytes(4, "big"))
            self.sent += 1
            src, data = self.b.recv_packet(timeout=5)
            self.received.append(int.from_bytes(data, "big"))
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.a.close()
        self.b.close()
        return self.sent, self.received


def expect_closed(port, payload: bytes, *, upgrade=True, tls=False) -> bytes:
    """Send ``payload`` (after a DERP upgrade unless told otherwise); return what came
    back once the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if upgrade:
            s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"server did not close; got {data[:100]!r}")


def read_until_line(stream, text: str, timeout: float = 15.0) -> list[str]:
    """Lines read from a child's pipe up to the first holding ``text`` (and any that came in
    the same read). Read from the file descriptor itself: a buffered ``readline`` after
    ``select`` can leave the awaited line in Python's buffer while select waits for more."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        lines = data.decode(errors="replace").splitlines(keepends=True)
        if any(text in line for line in lines):
            return lines
        left = deadline - time.monotonic()
        assert left > 0, f"no line with {text!r} in time; got {lines}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"the process closed its output before a line with {text!r}; got {lines}"
        data += chunk


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(port: int, proc, timeout: float = 15.0) -> None:
    """Until a TCP connect to 127.0.0.1:port succeeds (the child is serving)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, "the process exited"
            assert time.monotonic() < deadline, f"nothing listened on {port} in time"
            time.sleep(0.05)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to 127.0.0.1:``port`` and return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
