"""Operator-facing logs: JSON when asked for, repeated noise folded with counts."""

import json
import signal
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from derpbox.protocol import frames as F

from .support import expect_closed, unused_port, wait_until_listening


@pytest_twisted.inlineCallbacks
def test_repeated_bad_clients_are_folded_into_one_line(start_server, log_events):
    server = yield start_server(tls=False)
    for _ in range(5):
        yield deferToThread(expect_closed, server.port, F.ping_frame(b"12345678"))
    lines = [formatEvent(e) for e in log_events if "first frame is PING" in formatEvent(e)]
    assert len(lines) == 1
    assert server.stats.handshake_failures == 5  # every one counted, only one logged
    # Another reason is its own line.
    yield deferToThread(expect_closed, server.port, F.pack_header(2, 10))
    assert any("CLIENT_INFO length 10" in formatEvent(e) for e in log_events)


def test_json_log_format(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpbox", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "-tls=off",
         "-stun=false"],
        env={"PATH": "/usr/bin:/bin", "DERP_LOG_FORMAT": "json", "DERP_LOG_LEVEL": "info"},
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        first = proc.stderr.readline()
        while "listening on" not in first and time.monotonic() < deadline:
            first = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=10)
    lines = [line for line in [first, *rest.splitlines()] if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all(set(r) >= {"time", "level", "logger", "msg"} for r in records)
    assert any(r["msg"].startswith("DERP (plain HTTP) listening on 127.0.0.1:") and r["level"] == "info"
               for r in records)
    assert proc.returncode == 0


def test_log_level_filters(tmp_path):
    port = unused_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpbox", "-c", str(tmp_path / "k"), "-a", f"127.0.0.1:{port}", "-tls=off",
         "-stun=false", "-log-level", "warn"],
        env={"PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Once it accepts connections, the (filtered) "listening on" line was logged.
        wait_until_listening(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "listening on" not in err  # info lines are filtered out
    assert "serving plain HTTP" in err  # the warning stays


@pytest_twisted.inlineCallbacks
def test_repeated_junk_requests_are_folded(start_server, log_events):
    server = yield start_server(tls=False)
    for _ in range(4):
        reply = yield deferToThread(expect_closed, server.port, b"\x16\x03\x01junk\r\n\r\n", upgrade=False)
        assert reply.startswith(b"HTTP/1.1 400")
    lines = [formatEvent(e) for e in log_events if "bad HTTP request" in formatEvent(e)]
    assert len(lines) == 1
