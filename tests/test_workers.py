"""Worker processes behind one port (derpbox -workers N): real processes, real sockets.

Each worker has an internal unix socket (in the directory the supervisor logs) that
also answers /debug/ for this user: that is how the tests see which worker a client
landed on.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from nacl.public import PrivateKey

from derpbox.protocol import stun
from derpbox.protocol.frames import FrameType
from derpbox.workers.host import available_cpus

from .certs import make_cert
from .support import SteadyPair, unused_port
from .tailcat import Tailcat, derp_map, needs_tailcat, transfer


def serve_in_thread(tmp_path, the_map: dict) -> str:
    """The DERP map over HTTP from a thread (these tests block; the reactor does not run)."""
    (tmp_path / "map.json").write_text(json.dumps(the_map))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/map.json"


@pytest.mark.parametrize("workers", [2, 3])
def test_clients_on_different_workers_relay_to_each_other(node, workers):
    n = node(workers)
    clients = [n.connect_on(i) for i in range(workers)]
    for src in clients:
        for dst in clients:
            if src is not dst:
                src.send_packet(dst.public_key, b"from %s" % src.public_key[:4])
                assert dst.recv_packet() == (src.public_key, b"from %s" % src.public_key[:4])
    forwarded = sum(n.vars(i)["derp_packets_forwarded_out"] for i in range(workers))
    assert forwarded == workers * (workers - 1)
    for c in clients:
        c.close()


def test_peer_gone_reaches_a_client_on_another_worker(node):
    n = node(2)
    x, y = n.connect_on(0), n.connect_on(1)
    y.send_packet(x.public_key, b"hello from worker 1")
    assert x.recv_packet() == (y.public_key, b"hello from worker 1")
    y.close()
    gone = x.recv_until(FrameType.PEER_GONE)
    assert gone.payload == y.public_key + b"\x00"
    x.close()


def test_a_killed_worker_is_restarted_and_others_lose_nothing(node):
    n = node(2)
    # A steady pair both on worker 0; worker 1 is killed under it.
    for _ in range(30):
        before = n.clients()
        pair = SteadyPair(n.url)
        time.sleep(0.1)
        after = n.clients()
        if after[0] - before[0] == 2:
            break
        pair.stop()
    else:
        pytest.fail("no steady pair landed on one worker")
    other = n.connect_on(1)
    old = n.worker_pids()
    victim = next(pid for pid in old if f"pid {pid})" in n.log_text() and
                  re.search(rf"worker 1 started \(pid {pid}\)", n.log_text()))
    os.kill(victim, signal.SIGKILL)
    assert other.is_closed_by_server(5)
    n.wait_for_log(r"worker 1 exited")
    n.wait_for_log(r"worker 1 started", count=2)
    n.wait_for_log(r"connected to", count=2 + 2)  # the new worker 1 and worker 0 link up again
    again = n.connect_on(1)
    sent, received = pair.stop()
    assert sent > 20 and received == list(range(len(received))) and len(received) >= sent - 1
    assert n.vars(0)["derp_current_connections"] >= 1
    again.close()


def test_sigterm_tells_every_client_and_exits_zero(node):
    n = node(2)
    clients = [n.connect_on(0), n.connect_on(1)]
    started = time.monotonic()
    n.proc.send_signal(signal.SIGTERM)
    for c in clients:
        frame = c.recv_until(FrameType.RESTARTING, timeout=10)
        assert len(frame.payload) == 8
        c.close()
    assert n.proc.wait(15) == 0
    assert time.monotonic() - started < 15
    assert "every worker stopped" in n.log_text()


def test_sighup_and_a_replaced_certificate_reach_every_worker(node, tmp_path):
    certs = tmp_path / "certs"
    n = node(2, "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(certs), tls={"cafile": None})
    # One certificate for the node: the supervisor made it before the workers loaded it.
    assert len(set(re.findall(r"sha256-raw:([0-9a-f]{64})", n.log_text()))) == 1
    # Replace it (key first, then certificate, each atomically) and signal the supervisor.
    _, new_crt, new_key = make_cert(tmp_path / "new", "127.0.0.1")
    os.replace(new_key, certs / "127.0.0.1.key")
    os.replace(new_crt, certs / "127.0.0.1.crt")
    n.proc.send_signal(signal.SIGHUP)
    for i in range(2):
        n.wait_for_log(rf"\[worker{i}\] SIGHUP received: reloading TLS certificates")
    wanted = x509.load_pem_x509_certificate((certs / "127.0.0.1.crt").read_bytes()).serial_number
    for i in range(2):
        deadline = time.monotonic() + 10
        while True:
            client = n.connect_on(i)
            served = client.connected.peer_chain[0].to_cryptography().serial_number
            client.close()
            if served == wanted:
                break
            assert time.monotonic() < deadline, f"worker {i} still serves the old certificate"
            time.sleep(0.2)


@pytest.mark.parametrize("cpu_max, expected", [
    ("max 100000\n", None),
    ("150000 100000\n", 2),
    ("50000 100000\n", 1),
    ("100000000 100000\n", None),
])
def test_auto_honours_the_cgroup_quota(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == min(affinity, expected or affinity)


def test_auto_honours_a_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response.status, body


def _sample(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


def test_one_scrape_shows_the_node_totals(node):
    metrics_port = unused_port()
    n = node(2, "-metrics-addr", f"127.0.0.1:{metrics_port}", "-metrics-allow", "127.0.0.1")
    a, b = n.connect_on(0), n.connect_on(1)
    same = n.connect_on(0)
    for i in range(7):
        a.send_packet(b.public_key, b"%d" % i)   # across the workers
        b.recv_packet()
    for i in range(5):
        a.send_packet(same.public_key, b"%d" % i)  # on worker 0
        same.recv_packet()
    for _, text in (_get(n.port, "/debug/varz"), _get(metrics_port, "/metrics")):
        assert _sample(text, "derp_packets_received") == 12
        assert _sample(text, "derp_packets_sent") == 12
        assert _sample(text, "derp_packets_forwarded_out") == 7
        assert 'derpbox_workers_up{worker="0"} 1' in text and 'derpbox_workers_up{worker="1"} 1' in text
        # Each worker's links to the others, per worker (the healthcheck fails a worker without them).
        assert 'derpbox_worker_links_up{worker="0"} 1' in text and 'derpbox_worker_links_up{worker="1"} 1' in text
        # Three clients on the node; the workers' links to each other are not clients.
        assert _sample(text, "derp_clients_local") == 3 and _sample(text, "derp_clients_total") == 3
        assert _sample(text, "derp_clients_remote") == 0
    # Each worker alone (as the others ask it) tells its own part.
    parts = [n.vars(i) for i in range(2)]
    assert sorted(p["derp_packets_received"] for p in parts) == [0, 12]
    status, body = _get(n.port, "/debug/check")
    assert status == 200 and "okay" in body
    for c in (a, b, same):
        c.close()


def test_healthcheck_reports_each_worker(node, tmp_path):
    n = node(2)
    argv = ["-a", f"127.0.0.1:{n.port}", "-tls", "off", "-c", str(tmp_path / "derper.key"), "-stun=false",
            "-workers", "2"]
    out = subprocess.run([sys.executable, "-m", "derpbox", "healthcheck", *argv], capture_output=True, text=True,
                         timeout=30)
    assert "ok   worker 0: up," in out.stdout and "ok   worker 1: up," in out.stdout, out.stdout
    assert out.returncode == 0, out.stdout


@needs_tailcat
def test_real_clients_relay_through_a_node_of_three_workers(node, tmp_path):
    n = node(3, "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path / "certs"),
             tls={"cafile": None})
    tc = Tailcat(tmp_path / "tc", serve_in_thread(tmp_path, derp_map(n.port, None)))
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(1024 * 1024 + 7))
    # The kernel places each client on a worker: transfer until one crossed between workers
    # (each try does with probability 2/3).
    for attempt in range(6):
        out = tmp_path / f"out{attempt}.bin"
        transfer(tc, payload, out)
        assert out.read_bytes() == payload.read_bytes()
        if sum(n.vars(i)["derp_packets_forwarded_out"] for i in range(3)) > 100:
            break
    else:
        pytest.fail("six transfers and the clients always shared a worker")


def test_duplicate_keys_on_two_workers_last_writer_wins(node):
    n = node(2)
    key = PrivateKey.generate()
    older = newer = None
    for _ in range(60):
        c, landed = n.connect(key)
        if landed == 0 and older is None:
            older = c
        elif landed == 1 and older is not None:
            newer = c
            break
        else:
            c.close()
    assert older is not None and newer is not None, "the key did not land on both workers"
    on_0, on_1 = n.connect_on(0), n.connect_on(1)

    def delivered_to(sender, payload):
        """Which connection of the key receives ``payload`` from ``sender``."""
        sender.send_packet(key.public_key.encode(), payload)
        for conn in (newer, older):
            try:
                if conn.recv_packet(timeout=1)[1] == payload:
                    return conn
            except TimeoutError:
                continue
        return None

    # The newest connection receives, from either worker's clients.
    assert delivered_to(on_0, b"1") is newer and delivered_to(on_1, b"2") is newer
    # Three distinct keys on the node: the key on two workers is counted once.
    assert _sample(_get(n.port, "/debug/varz")[1], "derp_clients_local") == 3
    # The older one speaks: it is the last writer now, on both workers.
    older.send_packet(on_0.public_key, b"I am back")
    assert on_0.recv_packet() == (key.public_key.encode(), b"I am back")
    deadline = time.monotonic() + 5
    while delivered_to(on_1, b"3") is not older:
        assert time.monotonic() < deadline, "the other worker kept the newer connection"
    assert delivered_to(on_0, b"4") is older
    assert _sample(_get(n.port, "/debug/varz")[1], "derp_clients_local") == 3
    for c in (older, newer, on_0, on_1):
        c.close()


def test_an_admission_decision_made_on_one_worker_is_a_hit_on_the_other(node, tmp_path):
    key = PrivateKey.generate()
    allowlist = tmp_path / "nodes.json"
    allowlist.write_text(json.dumps(["nodekey:" + key.public_key.encode().hex()]))
    n = node(2, "-verify-allowlist-file", str(allowlist), "-verify-cache-ttl", "5m")
    first = other = None
    for _ in range(60):
        c, worker = n.connect(key)
        c.close()
        if first is None:
            first = worker  # this worker asks the allowlist
        elif worker != first:
            other = worker
            break
    assert other is not None, "the key never landed on the second worker"
    # The second worker never had to decide: the first one's decision was in the shared cache.
    assert n.vars(first)["derpbox_admission_cache_misses"] == 1
    assert n.vars(other)["derpbox_admission_cache_misses"] == 0
    assert n.vars(other)["derpbox_admission_cache_hits"] >= 1


def test_acme_with_two_workers_one_order_both_serve(node, pebble, tmp_path):
    n = node(2, "-certmode", "letsencrypt", "-hostname", "derp.test", "-certdir", str(tmp_path / "acme"),
             "-acme-directory", pebble.directory_url, "-acme-ca-file", str(pebble.ca_file),
             "-http-port", str(pebble.http_port), "-acme-challenge", "http-01",
             tls={"server_name": "derp.test"})
    deadline = time.monotonic() + 60
    while not all(n.vars(i)["derpbox_tls_certificate_not_after_seconds"] > 0 for i in range(2)):
        assert time.monotonic() < deadline, f"not both workers got the certificate: {n.log_text()[-3000:]}"
        time.sleep(0.2)
    # Worker 0 ordered it, once; worker 1 only followed the files.
    assert n.vars(0)["derpbox_acme_orders"] == 1
    assert "derpbox_acme_orders" not in n.vars(1)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    n.tls["cafile"] = str(root)
    for i in range(2):
        client = n.connect_on(i)  # the chain verifies against Pebble's root on either worker
        assert client.connected.tls_version == "TLSv1.3"
        client.close()


def worker_pid(n, index: int) -> int:
    return int(re.findall(rf"worker {index} started \(pid (\d+)\)", n.log_text())[-1])


def test_a_frozen_worker_holds_back_senders_instead_of_dropping(node):
    """Worker 1 stops reading (SIGSTOP): worker 0's link to it fills, and worker 0 stops
    reading the client whose packets wait for it (its data stays in TCP, as with derper's
    blocking mesh writes) instead of reading on and dropping at the link. Thawed within the link's 5 s
    stall limit, every packet arrives, in order, and nothing was dropped."""
    n = node(2)
    x, y = n.connect_on(0), n.connect_on(1)
    x.send_packet(y.public_key, b"warm")
    assert y.recv_packet() == (x.public_key, b"warm")
    # 7.2 MB: past what worker 0's link may queue (4 MiB) plus the unix socket's buffer.
    count, pad = 6000, bytes(1196)
    sender = threading.Thread(
        target=lambda: [x.send_packet(y.public_key, i.to_bytes(4, "big") + pad) for i in range(count)])
    frozen = worker_pid(n, 1)
    os.kill(frozen, signal.SIGSTOP)
    try:
        sender.start()
        deadline = time.monotonic() + 3
        while n.vars(0)["derpbox_mesh_forward_holds"] == 0:
            assert time.monotonic() < deadline, "worker 0 never held the sender back"
            time.sleep(0.05)
    finally:
        os.kill(frozen, signal.SIGCONT)
    got = [int.from_bytes(y.recv_packet(timeout=10)[1][:4], "big") for _ in range(count)]
    sender.join(10)
    assert got == list(range(count))
    for i in range(2):
        assert sum(n.vars(i)["derp_packets_dropped"].values()) == 0
    x.close()
    y.close()


def test_stun_is_answered_by_every_worker(node):
    n = node(2)
    port = int(re.search(r"stun0 (\d+)", n.log_text())[1])
    txids = [os.urandom(12) for _ in range(24)]
    for txid in txids:
        # A socket (source port) per request: the kernel spreads them over the workers.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(stun.build_binding_request(txid), ("127.0.0.1", port))
            assert stun.parse_binding_response(s.recv(100))[0] == txid
    answered = [n.vars(i)["stun_requests"]["disposition=success"] for i in range(2)]
    assert sum(answered) == 24 and min(answered) > 0


def test_healthcheck_fails_for_a_worker_that_does_not_answer(node, tmp_path):
    n = node(2)
    pid = int(re.search(r"worker 1 started \(pid (\d+)\)", n.log_text())[1])
    argv = ["-a", f"127.0.0.1:{n.port}", "-tls", "off", "-c", str(tmp_path / "derper.key"), "-stun=false",
            "-workers", "2"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The healthcheck's own connections land on either worker: until one reached worker 0,
        # which then names worker 1.
        for _ in range(10):
            out = subprocess.run([sys.executable, "-m", "derpbox", "healthcheck", *argv], capture_output=True,
                                 text=True, timeout=30)
            if "worker 1:" in out.stdout:
                break
        assert "FAIL worker 1: not answering" in out.stdout and "ok   worker 0: up" in out.stdout, out.stdout
        assert out.returncode == 1
    finally:
        os.kill(pid, signal.SIGCONT)


def test_acme_tls_alpn_with_two_workers_and_port_80_off(node, pebble, tmp_path):
    # Pebble's validator dials its tlsPort, where both workers listen; either may take it.
    n = node(2, "-certmode", "letsencrypt", "-hostname", "derp.test", "-certdir", str(tmp_path / "acme"),
             "-acme-directory", pebble.directory_url, "-acme-ca-file", str(pebble.ca_file),
             "-http-port", "-1", port=pebble.tls_port, tls={"server_name": "derp.test"})
    deadline = time.monotonic() + 60
    while not all(n.vars(i)["derpbox_tls_certificate_not_after_seconds"] > 0 for i in range(2)):
        assert time.monotonic() < deadline, f"not both workers got the certificate: {n.log_text()[-3000:]}"
        time.sleep(0.2)
    assert n.vars(0)["derpbox_acme_issued"] == 1


def test_healthcheck_fails_a_worker_not_yet_linked_to_the_others():
    from derpbox.checks.healthcheck import _one_line_each
    from derpbox.checks.results import FAIL, OK, Result

    data = {"workers": [{"worker": "0", "up": True, "connections": 3, "links": 2, "others": 2},
                        {"worker": "1", "up": True, "connections": 1, "links": 1, "others": 2},
                        {"worker": "2", "up": False, "connections": None, "links": None, "others": 2}]}
    lines = _one_line_each(Result("workers", OK, "3 workers", data=data))
    assert [(r.name, r.status) for r in lines] == [("worker 0", OK), ("worker 1", FAIL), ("worker 2", FAIL)]
    assert lines[1].detail == "up, but linked to 1 of the 2 other workers"
