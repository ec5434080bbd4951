"""-rate-config: derper's per-client receive rate limits, enforced by pausing reads."""

import json
import os
import signal
import time

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.config import ConfigError
from derpbox.protocol import frames as F
from derpbox.relay.receive_limit import (
    MIN_BURST,
    RateConfig,
    RateConfigError,
    ReceiveBucket,
    parse_rate_config,
)
from derpbox.relay.relay import Relay
from derpbox.service import SIGHUP_RELOAD

from .support import wait_for
from .test_relay import connect, pub

RATE = 10_000
PACKET = 10_000
FRAME = PACKET + F.KEY_LEN  # what one SendPacket frame charges


# -- the file --------------------------------------------------------------


def test_parse_reads_derpers_fields_case_insensitively_and_null_as_zero():
    config, warnings = parse_rate_config(b'{"perclientratelimitbytespersec": 5000, "PerClientRateBurstBytes": null}', "f")
    assert config == RateConfig(5000, 0) and warnings == []


def test_parse_warns_about_unknown_fields_by_name():
    config, warnings = parse_rate_config('{"PerClientRateLimitBytesPerSec": 1, "PerClientBurst": 9}', "rate.json")
    assert config == RateConfig(1, 0)
    assert warnings == ["rate.json: ignoring unknown field 'PerClientBurst' "
                        "(known: PerClientRateLimitBytesPerSec, PerClientRateBurstBytes)"]


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"),
    ("[1, 2]", "want a JSON object"),
    ('{"PerClientRateLimitBytesPerSec": -1}', "PerClientRateLimitBytesPerSec must be a whole number"),
    ('{"PerClientRateLimitBytesPerSec": 1.5}', "got 1.5"),
    ('{"PerClientRateBurstBytes": "100"}', "PerClientRateBurstBytes must be a whole number"),
    ('{"PerClientRateBurstBytes": true}', "PerClientRateBurstBytes"),
    ('{"PerClientRateLimitBytesPerSec": 18446744073709551616}', "PerClientRateLimitBytesPerSec"),
])
def test_parse_refuses_what_gos_json_refuses_naming_file_and_field(text, words):
    with pytest.raises(RateConfigError) as e:
        parse_rate_config(text, "-rate-config /etc/rate.json")
    assert str(e.value).startswith("-rate-config /etc/rate.json: ") and words in str(e.value)


def test_applied_raises_the_burst_to_one_largest_frame_and_zero_rate_lifts_limits():
    assert MIN_BURST == 65536 + 32
    assert RateConfig(100, 10).applied() == RateConfig(100, MIN_BURST)
    assert RateConfig(100, 1 << 20).applied() == RateConfig(100, 1 << 20)
    assert RateConfig(0, 1 << 20).applied() == RateConfig(0, 0)


def test_bucket_starts_full_goes_into_debt_and_says_how_long_to_wait():
    bucket = ReceiveBucket(RateConfig(1000, 3000), now=0.0)
    assert bucket.take(2000, 0.0) == 0.0
    assert bucket.take(1500, 0.0) == pytest.approx(0.5)  # 500 bytes of debt at 1000 bytes/s
    assert bucket.take(100, 0.5) == pytest.approx(0.1)  # the debt was paid, this frame is owed
    # Refill stops at the burst: a long pause does not bank more than one burst.
    assert bucket.take(3000, 100.0) == 0.0 and bucket.take(1, 100.0) > 0
    # A frame larger than the minimum burst is charged as the minimum burst (derper's clamp).
    big = ReceiveBucket(RateConfig(1000, MIN_BURST), now=0.0)
    assert big.take(10 * MIN_BURST, 0.0) == 0.0


# -- the relay, on a Clock ---------------------------------------------------


MESH_KEY = os.urandom(32)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limited(clock):
    relay = Relay(PrivateKey.generate(), clock, write_timeout=0, mesh_key=MESH_KEY, queue_depth=1000)
    relay.set_rate_limits(RateConfig(RATE, 0))
    return relay


def burst_of(n):
    """n SendPacket frames of PACKET bytes, numbered, in one read."""
    return [bytes([i]) * PACKET for i in range(n)]


def feed_packets(peer, dst_key, packets):
    peer.feed(b"".join(F.send_packet_frame(dst_key, p) for p in packets))
    peer.relay.flush()


def received(conn):
    return [bytes(p[F.KEY_LEN:]) for _, p in conn.take(F.FrameType.RECV_PACKET)]


def test_limited_client_is_paced_to_its_rate_and_its_reads_pause(limited, clock):
    a, conn_a, _ = connect(limited)
    b, conn_b, key_b = connect(limited)
    packets = burst_of(20)
    feed_packets(a, pub(key_b), packets)
    # The burst lets 6 frames through (6 * 10032 <= 65568); the 7th overdraws and waits.
    first = received(conn_b)
    assert first == packets[:6]
    assert not conn_a.reading and limited.rate_limits.waited == 1
    got, timeline = list(first), []
    while len(got) < len(packets):
        assert clock.seconds() < 60, "the limited client never finished"
        clock.advance(0.05)
        new = received(conn_b)
        got += new
        if new:
            timeline.append((clock.seconds(), len(got)))
    assert got == packets  # nothing dropped, order kept
    # Never ahead of the rate: by time t at most burst + rate * t bytes (plus the frame in debt).
    for t, n in timeline:
        assert n * FRAME <= MIN_BURST + RATE * t + FRAME
    # And not much behind it: 20 frames need (20 * 10032 - 65568) / 10000 = 13.5 s.
    assert clock.seconds() == pytest.approx((20 * FRAME - MIN_BURST) / RATE, abs=1.2)
    assert conn_a.reading


def test_mesh_peers_are_exempt(limited, clock):
    mesh, conn_mesh, _ = connect(limited, info={"version": 2, "meshKey": MESH_KEY.hex()})
    b, conn_b, key_b = connect(limited)
    packets = burst_of(20)
    mesh.feed(b"".join(F.forward_packet_frame(os.urandom(32), pub(key_b), p) for p in packets))
    limited.flush()
    assert received(conn_b) == packets
    assert conn_mesh.reading and limited.rate_limits.waited == 0


def test_frames_arriving_while_paused_wait_their_turn(limited, clock):
    a, conn_a, _ = connect(limited)
    b, conn_b, key_b = connect(limited)
    packets = burst_of(10)
    feed_packets(a, pub(key_b), packets[:7])
    assert received(conn_b) == packets[:6] and not conn_a.reading
    # A TLS layer may hand over what it decrypted before the pause took effect.
    feed_packets(a, pub(key_b), packets[7:])
    assert received(conn_b) == []
    clock.advance(10)
    clock.advance(10)
    assert received(conn_b) == packets[6:]


def test_a_new_config_reaches_connected_clients(limited, clock):
    a, conn_a, _ = connect(limited)
    b, conn_b, key_b = connect(limited)
    packets = burst_of(20)
    feed_packets(a, pub(key_b), packets)
    assert len(received(conn_b)) == 6
    # Rate 0 lifts the limits: once the pending wait ends, everything left goes through.
    limited.set_rate_limits(RateConfig(0, 0))
    clock.advance((FRAME * 7 - MIN_BURST) / RATE)
    assert len(received(conn_b)) == 14 and conn_a.reading
    feed_packets(a, pub(key_b), packets)
    assert len(received(conn_b)) == 20
    # A limit set later applies to a client connected before it, with a full bucket.
    limited.set_rate_limits(RateConfig(RATE, 0))
    feed_packets(a, pub(key_b), packets)
    assert len(received(conn_b)) == 6 and not conn_a.reading


def test_unlimited_relay_keeps_no_bucket(clock):
    relay = Relay(PrivateKey.generate(), clock)
    a, conn_a, _ = connect(relay)
    b, conn_b, key_b = connect(relay)
    assert a.bucket is None and relay.rate_limits is None
    feed_packets(a, pub(key_b), burst_of(20))
    assert len(received(conn_b)) == 20


def test_closing_while_throttled_cancels_the_wait(limited, clock):
    a, conn_a, _ = connect(limited)
    b, conn_b, key_b = connect(limited)
    feed_packets(a, pub(key_b), burst_of(20))
    a.connection_lost()
    assert not [call for call in clock.getDelayedCalls() if call.func == a._go_on]
    clock.advance(60)
    assert len(received(conn_b)) == 6


# -- a real server ----------------------------------------------------------------


def write_config(path, rate, burst=0):
    path.write_text(json.dumps({"PerClientRateLimitBytesPerSec": rate, "PerClientRateBurstBytes": burst}))
    return str(path)


def test_a_bad_rate_config_stops_start_up(start_server, tmp_path):
    bad = tmp_path / "rate.json"
    bad.write_text('{"PerClientRateLimitBytesPerSec": "fast"}')
    with pytest.raises(ConfigError, match=r"rate\.json: PerClientRateLimitBytesPerSec must be a whole number"):
        start_server("-rate-config", str(bad))
    with pytest.raises(ConfigError, match=r"-rate-config .*missing\.json: No such file"):
        start_server("-rate-config", str(tmp_path / "missing.json"))


@pytest_twisted.inlineCallbacks
def test_limited_client_is_throttled_while_a_mesh_peer_is_not(start_server, tmp_path, log_lines):
    mesh_key = os.urandom(32)
    (tmp_path / "mesh.key").write_text(mesh_key.hex())
    rate = 200_000
    server = yield start_server("-rate-config", write_config(tmp_path / "rate.json", rate),
                                "-mesh-psk-file", str(tmp_path / "mesh.key"))
    assert any("rate config applied: client-rate=200000 bytes/sec, client-burst=65568 bytes" in line
               for line in log_lines)
    count, size = 60, 10_000  # 601,920 frame bytes: (601920 - 65568) / 200000 = 2.7 s at the limit

    def transfer(sender_mesh_key):
        sender = DERPClient.connect(server.url, mesh_key=sender_mesh_key)
        receiver = DERPClient.connect(server.url)
        started = time.monotonic()
        for i in range(count):
            if sender_mesh_key:
                sender.send_frame(F.FrameType.FORWARD_PACKET, sender.public_key + receiver.public_key + bytes([i]) * size)
            else:
                sender.send_packet(receiver.public_key, bytes([i]) * size)
        got = [receiver.recv_packet(timeout=20)[1][0] for _ in range(count)]
        elapsed = time.monotonic() - started
        sender.close()
        receiver.close()
        return got, elapsed

    got, limited_time = yield deferToThread(transfer, None)
    assert got == list(range(count))
    assert limited_time >= (count * (size + 32) - 65568) / rate * 0.95
    waited = server.relay.rate_limits.waited
    assert waited > 0
    got, mesh_time = yield deferToThread(transfer, mesh_key)
    assert got == list(range(count))
    assert server.relay.rate_limits.waited == waited
    assert mesh_time < limited_time / 2

    varz = server.service.metrics.vars()
    assert varz["derp_rate_limit_per_client_bytes_per_second"] == rate
    assert varz["derp_rate_limit_per_client_burst_bytes"] == 65568
    assert varz["derp_rate_limit_per_client_waited"] == waited
    assert b"# TYPE derp_rate_limit_per_client_bytes_per_second untyped" in server.service.metrics.exposition()


@pytest_twisted.inlineCallbacks
def test_sighup_rereads_the_file_and_a_bad_one_keeps_the_limits(start_server, tmp_path, log_lines):
    path = tmp_path / "rate.json"
    server = yield start_server("-rate-config", write_config(path, 50_000))
    assert server.relay.rate_limits.config == RateConfig(50_000, MIN_BURST)
    write_config(path, 80_000, 1 << 20)
    os.kill(os.getpid(), signal.SIGHUP)
    yield wait_for(lambda: server.relay.rate_limits.config == RateConfig(80_000, 1 << 20))
    path.write_text("{broken")
    assert SIGHUP_RELOAD.sources and server.service.rate_config in SIGHUP_RELOAD.sources
    os.kill(os.getpid(), signal.SIGHUP)
    yield wait_for(lambda: any("not JSON" in line and "keeping the rate limits in force" in line for line in log_lines))
    assert server.relay.rate_limits.config == RateConfig(80_000, 1 << 20)


@pytest_twisted.inlineCallbacks
def test_no_rate_config_no_rate_metrics(start_server):
    server = yield start_server()
    assert server.relay.rate_limits is None
    assert "derp_rate_limit_per_client_waited" not in server.service.metrics.vars()
