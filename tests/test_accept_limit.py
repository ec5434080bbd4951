"""-accept-connection-limit / -accept-connection-burst: derper's token bucket on the TLS listener."""

import math
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.web.accept_limit import AcceptBucket


def test_bucket_starts_full_and_refills_at_the_limit():
    bucket = AcceptBucket(2.0, 3, now=0.0)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.4) is False  # 0.8 of a token
    assert bucket.allow(0.5) is True  # 1.0
    assert bucket.allow(0.5) is False
    # Refill stops at the burst.
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_edges_follow_gos_rate_limiter():
    assert all(AcceptBucket(math.inf, 0, now=0.0).allow(0.0) for _ in range(1000))
    assert not AcceptBucket(5.0, 0, now=0.0).allow(10.0)
    zero_rate = AcceptBucket(0.0, 2, now=0.0)
    assert [zero_rate.allow(t) for t in (0.0, 1.0, 1000.0)] == [True, True, False]


def raw_tls_attempt(port: int) -> str:
    """What a TLS client sees: "handshake" when the server completed one, else "closed"."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                return "handshake"
        except (ssl.SSLError, ConnectionError, OSError):
            return "closed"


@pytest_twisted.inlineCallbacks
def test_over_the_limit_connections_are_closed_at_once_and_counted(start_server, log_lines):
    server = yield start_server("-accept-connection-limit", "0", "-accept-connection-burst", "3")
    tls_stats = server.service.tls_stats
    assert any("accepting at most 0 TLS connections a second, burst 3" in line for line in log_lines)

    def go():
        a = DERPClient.connect(server.url)
        b = DERPClient.connect(server.url)
        third = raw_tls_attempt(server.port)
        refused = [raw_tls_attempt(server.port) for _ in range(5)]
        # The clients accepted before the limit was reached keep working.
        a.send_packet(b.public_key, b"still relayed")
        got = b.recv_packet()
        a.close()
        b.close()
        return third, refused, got, a.public_key

    third, refused, got, a_key = yield deferToThread(go)
    assert third == "handshake"
    assert refused == ["closed"] * 5
    assert got == (a_key, b"still relayed")
    assert tls_stats.accepted_connections == 3
    assert tls_stats.rejected_connections == 5
    assert server.service.metrics.vars()["tls_listener_rejected_connections"] == 5
    refusal_lines = [line for line in log_lines if "accept limit reached" in line]
    assert len(refusal_lines) == 1 and "closed 1 new connection(s) at once" in refusal_lines[0]


@pytest_twisted.inlineCallbacks
def test_plain_http_listener_is_not_limited_as_derper(start_server, log_lines):
    server = yield start_server("-accept-connection-limit", "0", "-accept-connection-burst", "0", tls=False)
    assert any("apply to the TLS listener only" in line for line in log_lines)

    def go():
        clients = [DERPClient.connect(server.url) for _ in range(3)]
        for c in clients:
            c.close()
        return len(clients)

    assert (yield deferToThread(go)) == 3


@pytest.mark.parametrize("flags", [(), ("-accept-connection-limit", "+Inf")])
@pytest_twisted.inlineCallbacks
def test_default_flags_add_no_limit(start_server, flags, log_lines):
    server = yield start_server(*flags)
    assert not any("accepting at most" in line for line in log_lines)
    results = yield deferToThread(lambda: [raw_tls_attempt(server.port) for _ in range(20)])
    assert results == ["handshake"] * 20
    assert server.service.tls_stats.rejected_connections == 0
