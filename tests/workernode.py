"""``derpbox -workers N`` run as a real process for the tests: its log, and each worker's
view through its internal unix socket (which answers /debug/ for this user)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from derpbox.client import DERPClient

from .support import unused_port


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


class Node:
    """``derpbox -workers N`` on 127.0.0.1 (plain HTTP unless ``tls`` gives the client's
    server_name and cafile), its log and its workers."""

    def __init__(self, tmp_path, workers: int, *flags: str, tls: dict | None = None, port: int | None = None):
        self.port = port or unused_port()
        self.count = workers
        self.tls = tls
        self.log_path = tmp_path / "derpbox.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "derpbox", "-a", f"127.0.0.1:{self.port}", "-tls", "off", "-c",
             str(tmp_path / "derper.key"), "-stun-port", "0", "-http-port", "0", "-workers", str(workers),
             *(("-tls", "on") if tls else ()), *flags],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        try:
            line = self.wait_for_log(r"internal mesh sockets in (\S+)")
            self.mesh_dir = re.search(r"internal mesh sockets in (\S+)", line)[1]
            # Every worker dials every other one.
            self.wait_for_log(r"connected to", count=workers * (workers - 1))
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/derp"

    def log_text(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [m[0] for m in re.finditer(f".*{pattern}.*", self.log_text())]
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.poll() is None, f"derpbox exited: {self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {count} lines matching {pattern!r}: {self.log_text()[-3000:]}"
            time.sleep(0.05)

    def vars(self, index: int) -> dict:
        conn = UnixHTTPConnection(os.path.join(self.mesh_dir, f"worker{index}.sock"))
        conn.request("GET", "/debug/vars?scope=worker")
        body = conn.getresponse().read()
        conn.close()
        return json.loads(body)

    def clients(self) -> list[int]:
        """Client connections per worker (the other workers' mesh links left out)."""
        return [self.vars(i)["derp_current_connections"] - (self.count - 1) for i in range(self.count)]

    def connect(self, key=None) -> tuple[DERPClient, int]:
        """A client, and the worker it landed on."""
        before = self.clients()
        client = DERPClient.connect(self.url, key, **(self.tls or {}))
        deadline = time.monotonic() + 5
        while (after := self.clients()) == before:
            assert time.monotonic() < deadline, "no worker registered the client"
            time.sleep(0.01)
        [worker] = [i for i, (a, b) in enumerate(zip(after, before)) if a > b]
        return client, worker

    def connect_on(self, worker: int, tries: int = 60) -> DERPClient:
        """A client that landed on ``worker`` (the kernel picks; the others are closed)."""
        for _ in range(tries):
            client, landed = self.connect()
            if landed == worker:
                return client
            client.close()
        raise AssertionError(f"no connection landed on worker {worker} in {tries} tries")

    def worker_pids(self) -> set[int]:
        pids = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.add(int(entry))
        return pids

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def node(tmp_path):
    started = []

    def start(workers, *flags, **options):
        n = Node(tmp_path, workers, *flags, **options)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()
    # A worker's traceback is a bug whatever the test checked (one went unseen in every
    # worker's log at start until this looked).
    for n in started:
        assert "Traceback" not in n.log_path.read_text(), n.log_path.read_text()[-3000:]
