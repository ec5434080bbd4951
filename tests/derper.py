"""Running Tailscale's own DERP server (`derper`, built unmodified) beside derpbox.

Found through DERPER_BIN, which .ci/run sets to ../shared/goref/derper; tests
that need it skip with the reason when it is not there.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

DERPER = os.environ.get("DERPER_BIN", "")

needs_derper = pytest.mark.skipif(
    not (DERPER and os.access(DERPER, os.X_OK)),
    reason="Tailscale's derper is not available: set DERPER_BIN to it (.ci/run uses ../shared/goref/derper)",
)


class Derper:
    """One derper process on 127.0.0.1 with a manual certificate for ``hostname``."""

    def __init__(self, workdir: Path, port: int, *, hostname: str, crt: Path, key: Path, ca: Path,
                 mesh_key_file: Path | None = None, mesh_with: str = ""):
        self.workdir = workdir
        self.port = port
        self.hostname = hostname
        self.ca = ca
        certs = workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        (certs / f"{hostname}.crt").write_bytes(crt.read_bytes())
        (certs / f"{hostname}.key").write_bytes(key.read_bytes())
        self.cmd = [DERPER, "-a", f"127.0.0.1:{port}", "-hostname", hostname, "-certmode", "manual",
                    "-certdir", str(certs), "-c", str(workdir / "derper.key"), "-stun-port", "0",
                    "-http-port", "-1"]
        if mesh_key_file is not None:
            self.cmd += ["-mesh-psk-file", str(mesh_key_file)]
        if mesh_with:
            self.cmd += ["-mesh-with", mesh_with]
        self.log_path = workdir / "derper.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Derper:
        # Go's certificate verification takes extra roots from SSL_CERT_FILE.
        env = dict(os.environ, SSL_CERT_FILE=str(self.ca))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None, f"derper exited: {self.log_text()}"
                assert time.monotonic() < deadline, "derper did not listen in time"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/derp"

    def _get(self, path: str) -> bytes:
        """GET over TLS with the SNI derper's manual certificate needs (urllib sends none for an IP)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=self.hostname) as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.hostname}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        if b"chunked" in head.lower():
            body = _unchunk(body)
        return body

    def varz(self) -> dict[str, float]:
        """derper's /debug/varz (loopback may read it), unlabelled samples by name."""
        values = {}
        for line in self._get("/debug/varz").decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                values[name] = float(value)
        return values


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out
