"""derper's kernel-side metrics: TCP_INFO, derp_tcp_rtt, /debug/traffic; and the queue figures
derp_average_queue_duration_ms and derp_buffered_write_frames."""

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.application.internet import TimerService
from nacl.public import PrivateKey
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.protocol import frames as F
from derpbox.relay.relay import Relay
from derpbox.tcpinfo import NEEDED, parse_tcp_info, read_tcp_info
from derpbox.web.debug import MAX_TRAFFIC_WATCHERS
from derpbox.web.tcp_stats import RTT_LABELS, RTTStats, rtt_label

from .support import wait_for
from .test_metrics import http_get
from .test_relay import connect, pub


@pytest.fixture
def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def test_tcp_info_matches_what_ss_reports(tcp_pair):
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    client, server = tcp_pair
    client.sendall(b"x" * 100_000)
    got = 0
    while got < 100_000:
        got += len(server.recv(65536))
    server.sendall(b"y" * 777)
    assert client.recv(1000) == b"y" * 777
    info = read_tcp_info(client)
    port = client.getsockname()[1]
    out = subprocess.run(["ss", "-tin", "src", f"127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(cwnd|bytes_acked|bytes_received):(\d+)", out))
    rtt_ms = float(re.search(r"\brtt:([\d.]+)/", out).group(1))
    assert info.bytes_acked == int(fields["bytes_acked"]) == 100_001  # the SYN counts one
    assert info.bytes_received == int(fields["bytes_received"]) == 777
    assert info.snd_cwnd == int(fields["cwnd"])
    assert info.rtt_us / 1000 == pytest.approx(rtt_ms, abs=0.0015)


def test_short_tcp_info_is_refused():
    with pytest.raises(ValueError, match=f"fewer than the {NEEDED}"):
        parse_tcp_info(bytes(NEEDED - 1))


@pytest.mark.parametrize("rtt_us, label", [(0, "10ms"), (10_000, "10ms"), (10_001, "20ms"), (49_999, "50ms"),
                                           (150_000, "150ms"), (250_001, "500ms"), (500_001, "inf")])
def test_rtt_labels_are_derpers(rtt_us, label):
    assert rtt_label(rtt_us) == label


def peer_on(sock):
    """A peer as the sampler sees it: its stream's transport holds the socket."""
    return SimpleNamespace(conn=SimpleNamespace(transport=SimpleNamespace(socket=sock)))


def test_samples_by_rtt_non_tcp_and_error(tcp_pair):
    stats = RTTStats()
    client, _ = tcp_pair
    stats.sample(peer_on(client))
    unix_a, unix_b = socket.socketpair()
    stats.sample(peer_on(unix_a))  # another worker's link
    closed = socket.socket()
    closed.close()
    stats.sample(peer_on(closed))
    unix_a.close()
    unix_b.close()
    assert stats.tcp_rtt == {**dict.fromkeys(RTT_LABELS, 0), "10ms": 1, "non-tcp": 1, "error": 1}


@pytest_twisted.inlineCallbacks
def test_every_connection_is_sampled(start_server):
    server = yield start_server()
    clients = yield deferToThread(lambda: [DERPClient.connect(server.url) for _ in range(3)])
    try:
        yield wait_for(lambda: server.stats.current_connections == 3)
        yield server.service.rtt_sampler.sample_all()
        varz = server.service.metrics.vars()
        assert varz["derp_tcp_rtt"]["le=10ms"] == 3
        assert sum(varz["derp_tcp_rtt"].values()) == 3
        # Sampled again every 10 s, as derper: the service's loop calls the same walk.
        [timer] = [s for s in server.service if isinstance(s, TimerService)
                   and s.call[0] == server.service.rtt_sampler.sample_all]
        assert timer.step == 10.0
    finally:
        for c in clients:
            c.close()


@pytest_twisted.inlineCallbacks
def test_rtt_sampling_off_by_envknob(start_server):
    server = yield start_server(environ={"TS_DERP_DISABLE_RTT_STATS": "1"})
    assert server.service.rtt_sampler is None
    assert "derp_tcp_rtt" not in server.service.metrics.vars()


# -- /debug/traffic ------------------------------------------------------------------


def traffic_lines(port, target="/debug/traffic?once=1"):
    status, headers, body = http_get(port, target, tls=True)
    return status, headers, [json.loads(line) for line in body.splitlines()]


@pytest_twisted.inlineCallbacks
def test_debug_traffic_once_lists_each_connection_with_its_tcp_figures(start_server):
    server = yield start_server()

    def go():
        a = DERPClient.connect(server.url)
        b = DERPClient.connect(server.url)
        a.send_packet(b.public_key, b"z" * 5000)
        b.recv_packet()
        result = traffic_lines(server.port)
        a.close()
        b.close()
        return a.public_key, b.public_key, result

    key_a, key_b, (status, headers, rows) = yield deferToThread(go)
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    by_key = {row["Key"]: row for row in rows}
    assert set(by_key) == {"nodekey:" + key_a.hex()[:16], "nodekey:" + key_b.hex()[:16]}
    a, b = by_key["nodekey:" + key_a.hex()[:16]], by_key["nodekey:" + key_b.hex()[:16]]
    assert a["Addr"].startswith("127.0.0.1:") and not a["Mesh"]
    assert b["UniqueSenders"] == 1 and a["UniqueSenders"] == 0
    assert a["DERPBytesIn"] >= 5000 + 32 and b["DERPBytesOut"] >= 5000 + 32
    for row in (a, b):
        tcp = row["TCP"]
        assert 0 < tcp["RTTMs"] < 10 and tcp["Cwnd"] >= 1
    # The kernel's count of bytes received has the TLS handshake and records on top of the
    # DERP bytes. (Sent counts only acknowledged bytes, which a delayed ACK may hold back.)
    assert a["TCP"]["Recv"] > a["DERPBytesIn"] and b["TCP"]["Recv"] > b["DERPBytesIn"]
    assert b["TCP"]["Sent"] > 0


@pytest_twisted.inlineCallbacks
def test_debug_traffic_streams_every_2s_and_is_bounded(start_server):
    server = yield start_server()
    debug = server.service.site.resource._debug

    def stream_two_rounds():
        client = DERPClient.connect(server.url)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
        conn.request("GET", "/debug/traffic")
        resp = conn.getresponse()
        times = [json.loads(resp.readline())["Time"] for _ in range(2)]
        conn.close()
        client.close()
        return resp.status, times

    status, times = yield deferToThread(stream_two_rounds)
    assert status == 200 and times[1] - times[0] == pytest.approx(2.0, abs=0.5)
    yield wait_for(lambda: debug._traffic_watchers == 0)

    # A few watchers at most; one round (?once=1) is always served.
    socks = []

    def open_watchers():
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for _ in range(MAX_TRAFFIC_WATCHERS):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port)))
            s.sendall(b"GET /debug/traffic HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)

    yield deferToThread(open_watchers)
    yield wait_for(lambda: debug._traffic_watchers == MAX_TRAFFIC_WATCHERS)
    refused = yield deferToThread(http_get, server.port, "/debug/traffic", tls=True)
    assert refused[0] == 503 and b"?once=1" in refused[2]
    once = yield deferToThread(http_get, server.port, "/debug/traffic?once=1", tls=True)
    assert once[0] == 200
    for s in socks:
        s.close()
    yield wait_for(lambda: debug._traffic_watchers == 0)


@pytest_twisted.inlineCallbacks
def test_debug_traffic_follows_the_debug_access_rule(start_server):
    server = yield start_server()
    status, _, _ = yield deferToThread(http_get, server.port, "/debug/traffic?once=1", tls=True,
                                       headers={"X-Forwarded-For": "198.51.100.1"})
    assert status == 403


# -- queue figures, on a Clock ------------------------------------------------------------


def test_average_queue_duration_moves_per_packet_as_derpers():
    clock = Clock()
    relay = Relay(PrivateKey.generate(), clock, write_timeout=0)
    a, _, _ = connect(relay)
    b, conn_b, key_b = connect(relay)
    assert relay.stats.average_queue_duration_ms == 0.0
    b.pauseProducing()  # b's socket buffer is full: its packets wait
    a.feed(b"".join(F.send_packet_frame(pub(key_b), bytes([i]) * 10) for i in range(3)))
    relay.flush()
    clock.advance(0.5)
    b.resumeProducing()
    # Three packets that waited 500 ms: 500 * (1 - 0.9^3).
    assert relay.stats.average_queue_duration_ms == pytest.approx(500 * (1 - 0.9 ** 3))
    assert len(conn_b.take(F.FrameType.RECV_PACKET)) == 3
    # A packet written in the pass it arrived waited 0 ms and pulls the average down by a tenth.
    before = relay.stats.average_queue_duration_ms
    a.feed(F.send_packet_frame(pub(key_b), b"now"))
    relay.flush()
    assert relay.stats.average_queue_duration_ms == pytest.approx(before * 0.9)


def test_buffered_write_frames_counts_the_frames_of_each_write():
    clock = Clock()
    relay = Relay(PrivateKey.generate(), clock, write_timeout=0)
    a, _, _ = connect(relay)
    b, conn_b, key_b = connect(relay)
    histogram = relay.stats.buffered_write_frames
    before = (histogram.count, histogram.sum, list(histogram.counts))
    a.feed(b"".join(F.send_packet_frame(pub(key_b), b"p") for _ in range(3)))
    relay.flush()
    assert conn_b.writes and len(conn_b.take(F.FrameType.RECV_PACKET)) == 3
    assert (histogram.count, histogram.sum) == (before[0] + 1, before[1] + 3)
    # Buckets 0..10, 15, 20, 25, 50, 100: three frames land in le=3.
    assert [n - m for n, m in zip(histogram.counts, before[2])] == [0, 0, 0, 1] + [0] * 12
    # 200 frames in one write land only in +Inf (the count), in no bucket.
    b.pauseProducing()
    a.feed(b"".join(F.send_packet_frame(pub(key_b), b"p") for _ in range(20)))
    relay.flush()
    counts = list(histogram.counts)
    b.resumeProducing()
    assert histogram.counts == counts[:12] + [counts[12] + 1] + counts[13:]  # 20 frames: le=20
