"""Client verification end to end: derpbox with its admission backends, real sockets.

tailscaled's LocalAPI and Headscale cannot run here, so their contract fakes
(tests/fakes) stand in; everything on derpbox's side is real.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient

from .fakes.headscale import BlackHole
from .fakes.tailscaled import FakeTailscaled
from .tailcat import Tailcat, derp_map, needs_tailcat, ping
from .support import SteadyPair, wait_for


def nodekey(key: PrivateKey) -> str:
    return "nodekey:" + bytes(key.public_key).hex()


def try_connect(url, key, **kw):
    """True when derpbox admitted the client (ServerInfo arrived), False when it was cut off."""
    try:
        client = DERPClient.connect(url, key, **kw)
    except (ConnectionError, OSError):
        return False
    client.close()
    return True


@pytest_twisted.inlineCallbacks
def test_verify_url_admits_tailnet_and_sends_real_source(start_server, headscale, log_events):
    member, stranger = PrivateKey.generate(), PrivateKey.generate()
    hs = headscale([nodekey(member)])
    server = yield start_server("-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
    admitted = yield deferToThread(try_connect, server.url, member, source=("127.0.0.2", 0))
    rejected = yield deferToThread(try_connect, server.url, stranger)
    assert admitted and not rejected
    bodies = [json.loads(r.body) for r in hs.requests if r.body]
    assert {"NodePublic": nodekey(member), "Source": "127.0.0.2"} in bodies
    stats = server.service.admission.stats
    assert stats.decisions[("url", "allow")] >= 1 and stats.decisions[("url", "reject")] == 1
    assert server.stats.admission_rejections == 1
    from twisted.logger import formatEvent

    lines = [formatEvent(e) for e in log_events]
    assert any(f"{nodekey(stranger)} from 127.0.0.1 rejected by url check" in line for line in lines)
    assert any("fail-open is off: clients will be REJECTED" in line for line in lines)


# (backend behaviour, fail-open) -> admitted?
MATRIX = {
    ("refused", True): True,
    ("refused", False): False,
    ("silent", True): True,
    ("silent", False): False,
    ("500", True): False,
    ("500", False): False,
    ("bad json", True): False,
    ("bad json", False): False,
    ("allow false", True): False,
    ("allow false", False): False,
    ("allow true", True): True,
    ("allow true", False): True,
}


@pytest.mark.parametrize("behaviour, fail_open", list(MATRIX))
@pytest_twisted.inlineCallbacks
def test_fail_open_matrix(start_server, headscale, request, behaviour, fail_open):
    key = PrivateKey.generate()
    if behaviour == "refused":
        hs = headscale()
        url = hs.url
        yield hs.stop()
    elif behaviour == "silent":
        hole = BlackHole().start()
        request.addfinalizer(lambda: pytest_twisted.blockon(hole.stop()))
        url = hole.url
    else:
        hs = headscale([nodekey(key)] if behaviour == "allow true" else [])
        url = hs.url
        if behaviour == "500":
            hs.force_status = 500
            hs.force_body = b'{"Allow":true}'
        elif behaviour == "bad json":
            hs.force_body = b"not json"
    server = yield start_server("-verify-client-url", url, f"-verify-client-url-fail-open={str(fail_open).lower()}")
    admitted = yield deferToThread(try_connect, server.url, key)
    assert admitted == MATRIX[(behaviour, fail_open)]
    decisions = server.service.admission.stats.decisions
    expected_outcome = "fail_open" if behaviour in ("refused", "silent") and fail_open else (
        "allow" if admitted else ("error" if behaviour in ("refused", "silent", "500", "bad json") else "reject")
    )
    assert decisions[("url", expected_outcome)] == 1, decisions


@pytest_twisted.inlineCallbacks
def test_tailscaled_socket_recreated_while_running(start_server, tmp_path):
    member = PrivateKey.generate()
    path = str(tmp_path / "ts" / "tailscaled.sock")
    os.makedirs(os.path.dirname(path))
    fake = FakeTailscaled(path, nodes=[nodekey(member)]).start()
    server = yield start_server("-verify-clients", "-socket", path)
    assert (yield deferToThread(try_connect, server.url, member))
    yield fake.stop()
    assert not os.path.exists(path)
    assert not (yield deferToThread(try_connect, server.url, member))
    fake = FakeTailscaled(path, nodes=[nodekey(member)]).start()
    try:
        assert (yield deferToThread(try_connect, server.url, member))
        assert not (yield deferToThread(try_connect, server.url, PrivateKey.generate()))
        whois = [r for r in fake.requests if r.path == "/localapi/v0/whois"]
        assert whois and all(r.header("Referer") is None and r.header("Origin") is None for r in whois)
    finally:
        yield fake.stop()


@pytest_twisted.inlineCallbacks
def test_one_relay_for_two_tailnets(start_server, tmp_path):
    """-socket lists one tailscaled per tailnet (tailscale/tailscale#11810)."""
    members = [PrivateKey.generate(), PrivateKey.generate()]
    os.makedirs(tmp_path / "ts")
    fakes = [FakeTailscaled(str(tmp_path / "ts" / f"{i}.sock"), nodes=[nodekey(m)]).start()
             for i, m in enumerate(members)]
    try:
        server = yield start_server("-verify-clients", "-socket", ",".join(f.path for f in fakes))
        admitted = yield deferToThread(lambda: [try_connect(server.url, k) for k in (*members, PrivateKey.generate())])
        assert admitted == [True, True, False]
        assert server.service.admission.stats.decisions[("tailscaled", "reject")] == 1
    finally:
        for fake in fakes:
            yield fake.stop()


@pytest_twisted.inlineCallbacks
def test_admitted_pair_keeps_relaying_while_admission_is_slow(start_server, headscale):
    waiting = PrivateKey.generate()
    hs = headscale()
    server = yield start_server("-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
    pair_keys = (PrivateKey.generate(), PrivateKey.generate())
    hs.nodes.update(nodekey(k) for k in pair_keys)
    hs.nodes.add(nodekey(waiting))

    pair = yield deferToThread(SteadyPair, server.url, pair_keys)
    hs.delay = 4.0

    def slow_admission():
        before = len(pair.received)
        start = time.monotonic()
        ok = try_connect(server.url, waiting)
        return ok, time.monotonic() - start, len(pair.received) - before

    ok, waited, flowed = yield deferToThread(slow_admission)
    sent, received = yield deferToThread(pair.stop)
    assert ok and waited >= 3.9
    # The pair paces one round trip every ~2 ms: hundreds of packets in 4 s.
    assert flowed > 300, flowed
    assert received == list(range(len(received)))


@pytest_twisted.inlineCallbacks
def test_allowlist_reload_and_broken_file(start_server, tmp_path, log_events):
    a, b = PrivateKey.generate(), PrivateKey.generate()
    allow = tmp_path / "nodes.json"
    allow.write_text(json.dumps([nodekey(a)]))
    server = yield start_server("-verify-allowlist-file", str(allow))
    assert (yield deferToThread(try_connect, server.url, a))
    assert not (yield deferToThread(try_connect, server.url, b))
    allow.write_text(json.dumps([nodekey(a), nodekey(b)]))
    stats = server.service.admission.stats
    yield wait_for(lambda: stats.allowlist_reloads >= 1, timeout=5)
    assert (yield deferToThread(try_connect, server.url, b))
    allow.write_text('["nodekey:broken"')
    yield wait_for(lambda: stats.allowlist_reload_errors >= 1, timeout=5)
    assert (yield deferToThread(try_connect, server.url, b))  # the previous list stays
    assert any(str(allow) in str(e.get("log_format", "")) + str(e) for e in log_events if e.get("log_level") and e["log_level"].name in ("warn", "error"))


def test_broken_allowlist_stops_start_up(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "nodes.json"
    bad.write_text("{not a list")
    result = subprocess.run(
        [sys.executable, "-m", "derpbox", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "-tls=off", "-stun=false",
         "-verify-allowlist-file", str(bad)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and str(bad) in result.stderr


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_tailcat_tailnet_members_relay_and_stranger_is_refused(start_server, headscale, serve_map, tmp_path):
    hs = headscale()
    server = yield start_server("-verify-client-url", hs.url, "-verify-client-url-fail-open=false")
    tc = Tailcat(tmp_path / "tc", serve_map(derp_map(server.port, server.service.stun_port)))
    server_key = yield deferToThread(tc.node, "member-server", server=True)
    client_key = yield deferToThread(tc.node, "member-client", server=False)
    yield deferToThread(tc.node, "stranger", server=False)
    hs.nodes.update({server_key, client_key})
    out = yield deferToThread(ping, tc, server_home="member-server", client_home="member-client")
    assert "via DERP(dbx)" in out, out
    stats = server.service.admission.stats
    members_checked = stats.decisions[("url", "allow")]
    assert members_checked >= 2 and server.stats.admission_rejections == 0
    out = yield deferToThread(ping, tc, 6, server_home="member-server", client_home="stranger")
    assert "via DERP" not in out
    assert stats.decisions[("url", "reject")] >= 1 and server.stats.admission_rejections >= 1
    probe_key = "nodekey:" + "00" * 32  # derpbox's start-up probe of the backend
    rejected = {json.loads(r.body)["NodePublic"] for r in hs.requests if r.body} - hs.nodes - {probe_key}
    assert len(rejected) == 1  # only the stranger's key was refused
