"""SIGTERM, as `docker stop` sends it: stop accepting, tell clients, exit 0 in bounded time."""

import signal
import socket
import subprocess
import sys
import time

from derpbox.client import DERPClient
from derpbox.protocol.frames import FrameType, parse_restarting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_sends_restarting_and_exits_zero(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpbox", "-a", f"127.0.0.1:{port}", "-certmode", "manual", "-hostname", "127.0.0.1",
         "-certdir", str(tmp_path / "certs"), "-c", str(tmp_path / "k"), "-http-port", "-1", "-stun=false"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                a = DERPClient.connect(f"https://127.0.0.1:{port}/derp")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "derpbox did not come up"
                time.sleep(0.1)
        b = DERPClient.connect(f"https://127.0.0.1:{port}/derp")
        a.send_packet(b.public_key, b"before")
        assert b.recv_packet()[1] == b"before"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        frames = [c.recv_until(FrameType.RESTARTING, timeout=5) for c in (a, b)]
        assert all(parse_restarting(f.payload) == (500, 30000) for f in frames)
        assert a.is_closed_by_server(5) and b.is_closed_by_server(5)
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert elapsed < 10, elapsed
    assert "telling 2 clients the server is restarting" in err
    # It stopped accepting before saying goodbye.
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused
