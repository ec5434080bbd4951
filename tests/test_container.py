"""The image, really built and run (podman; tests/container.py): the user it runs as, its
health check, DERP and STUN through ports published on 127.0.0.1, a real tailcat pair
through it, SIGTERM, the node key on the named volume, and the compose file as shipped.

Skipped, with the reason, only where podman cannot run (scripts/test.sh installs it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from derpbox.client import DERPClient
from derpbox.protocol import stun
from derpbox.protocol.frames import FrameType

from .container import IMAGE, ROOT, Container, podman_or_skip
from .support import unused_port
from .tailcat import Tailcat, derp_map, needs_tailcat, transfer
from .test_workers import serve_in_thread

pytestmark = pytest.mark.timeout(900)  # the first run builds the base image (about a minute)


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    return podman_or_skip(tmp_path_factory.mktemp("podman"))


def published(derp: int, stun_port: int) -> list[str]:
    return ["-p", f"127.0.0.1:{derp}:443/tcp", "-p", f"127.0.0.1:{stun_port}:3478/udp",
            "--sysctl", "net.ipv4.ip_unprivileged_port_start=0",
            "-e", "DERP_DOMAIN=127.0.0.1", "-e", "DERP_CERT_MODE=manual", "-e", "DERP_STRICT_ENV=true"]


@pytest.fixture
def volume(podman):
    name = f"derpbox-test-{uuid.uuid4().hex[:8]}"
    podman.run("volume", "create", name)
    yield name
    podman.run("volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def relay(podman):
    """One container of the image: an IP-only node with its pinned self-signed certificate,
    two worker processes under the supervisor as PID 1."""
    derp, stun_port = unused_port(), unused_udp_port()
    volume = f"derpbox-test-{uuid.uuid4().hex[:8]}"
    podman.run("volume", "create", volume)
    container = Container(podman, *published(derp, stun_port), "-e", "DERP_WORKERS=2", volume=volume)
    try:
        container.wait_healthy()
        yield container, derp, stun_port
    finally:
        container.remove()
        podman.run("volume", "rm", "-f", volume, check=False)


def test_the_server_runs_as_uid_10001(relay):
    container, _, _ = relay
    processes = container.exec("ps", "-eo", "pid=,ppid=,uid=,args=", check=False)
    if processes.returncode != 0:  # no procps in a minimal base: read /proc instead
        processes = container.exec("sh", "-c", 'for p in /proc/[0-9]*; do echo "${p#/proc/} '
                                   '$(sed -n "s/^PPid:\\t//p" $p/status) $(sed -n "s/^Uid:\\t\\([0-9]*\\).*/\\1/p" '
                                   '$p/status) $(tr "\\0" " " < $p/cmdline)"; done', check=True)
    rows = [line.split(None, 3) for line in processes.stdout.splitlines() if "derpbox" in line]
    # The entrypoint exec'd derpbox: the supervisor is PID 1, and its two workers stay up.
    supervisor = [r for r in rows if r[0] == "1"]
    workers = [r for r in rows if r[1] == "1"]
    assert supervisor and supervisor[0][3].split()[1:3] == ["-m", "derpbox"], rows
    assert len(workers) == 2, rows
    assert {r[2] for r in supervisor + workers} == {"10001"}


def test_the_health_check_passes_inside(relay, podman):
    container, _, _ = relay
    out = container.wait_healthy()
    for step in ("tls", "stun", "relay"):
        assert step in out, out
    # The image's own HEALTHCHECK (kept because the image is built with --format docker).
    assert podman.run("healthcheck", "run", container.name, check=False).returncode == 0


def relayed(a, b, payload: bytes, attempts: int = 20):
    """What ``b`` receives once ``a`` sends to it. With workers the two may be on different
    ones, and ``b``'s presence reaches ``a``'s worker a moment after ``b`` connected (as
    between derper nodes of a region): until then a packet for ``b`` is dropped, so send again."""
    for _ in range(attempts):
        a.send_packet(b.public_key, payload)
        try:
            return b.recv_packet(timeout=0.5)
        except TimeoutError:
            continue
    raise AssertionError(f"nothing relayed in {attempts} tries")


def test_derp_and_stun_answer_through_ports_on_loopback(relay):
    _, derp, stun_port = relay
    url = f"https://127.0.0.1:{derp}/derp"
    a, b = DERPClient.connect(url, cafile=None), DERPClient.connect(url, cafile=None)
    try:
        assert relayed(a, b, b"through the container") == (a.public_key, b"through the container")
    finally:
        a.close()
        b.close()
    txid = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(stun.build_binding_request(txid), ("127.0.0.1", stun_port))
        reply, _ = s.recvfrom(2048)
    assert stun.parse_binding_response(reply)[0] == txid


@needs_tailcat
def test_a_real_tailcat_pair_relays_through_the_container(relay, tmp_path):
    _, derp, stun_port = relay
    tc = Tailcat(tmp_path / "tc", serve_in_thread(tmp_path, derp_map(derp, stun_port)))
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(256 * 1024 + 3))
    transfer(tc, payload, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()


def test_sigterm_tells_clients_and_exits_zero(podman):
    derp, stun_port = unused_port(), unused_udp_port()
    container = Container(podman, *published(derp, stun_port))
    try:
        container.wait_healthy()
        client = DERPClient.connect(f"https://127.0.0.1:{derp}/derp", cafile=None)
        stop = subprocess.Popen(["podman", "stop", "-t", "20", container.name], env=podman.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        frame = client.recv_until(FrameType.RESTARTING, timeout=15)
        assert frame.type == FrameType.RESTARTING
        client.close()
        assert stop.wait(30) == 0
        assert container.state("ExitCode") == "0", container.logs()[-3000:]
        assert "telling 1 clients the server is restarting" in container.logs()
    finally:
        container.remove()


def test_the_node_key_and_certificate_survive_recreating_the_container(podman, volume):
    derp, stun_port = unused_port(), unused_udp_port()

    def identity() -> tuple[bytes, str]:
        container = Container(podman, *published(derp, stun_port), volume=volume)
        try:
            container.wait_healthy()
            client = DERPClient.connect(f"https://127.0.0.1:{derp}/derp", cafile=None)
            key = client.connected.server_key
            client.close()
            node = json.loads(container.exec("derpbox", "derpmap", "--format", "json", check=True).stdout)
            return key, json.dumps(node, sort_keys=True)
        finally:
            container.remove()

    first, second = identity(), identity()
    assert first[0] == second[0]
    assert "sha256-raw:" in first[1] and first[1] == second[1]  # the same pinned certificate


def test_the_compose_file_comes_up_as_shipped(podman, tmp_path):
    """compose/docker-compose.yml with podman-compose. The override file moves the ports to
    127.0.0.1 (the shipped ones publish on every address), names a throwaway volume, and
    sets what an operator's .env would: an IP-only node (no ACME CA is reachable here)."""
    podman.run("tag", IMAGE, "localhost/derpbox:latest")
    derp, http, stun_port = unused_port(), unused_port(), unused_udp_port()
    override = tmp_path / "loopback.yml"
    override.write_text(
        "services:\n  derpbox:\n    environment:\n      DERP_CERT_MODE: manual\n    ports: !override\n"
        f'      - "127.0.0.1:{derp}:443/tcp"\n      - "127.0.0.1:{http}:80/tcp"\n'
        f'      - "127.0.0.1:{stun_port}:3478/udp"\n'
        "volumes:\n  derpbox-data:\n    name: " + f"derpbox-test-{uuid.uuid4().hex[:8]}\n")
    project = f"derpbox-test-{uuid.uuid4().hex[:8]}"
    env = dict(podman.env, DERP_DOMAIN="127.0.0.1")
    base = ["podman-compose", "-p", project, "-f", str(ROOT / "compose" / "docker-compose.yml"), "-f", str(override)]

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=300)
        assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    try:
        compose("up", "-d", "--no-build")
        name = podman.run("ps", "--filter", f"label=io.podman.compose.project={project}",
                          "--format", "{{.Names}}").stdout.split()[0]
        deadline = time.monotonic() + 60
        while podman.run("exec", name, "derpbox", "healthcheck", check=False).returncode != 0:
            assert time.monotonic() < deadline, podman.run("logs", name, check=False).stderr[-3000:]
            time.sleep(0.5)
        a = DERPClient.connect(f"https://127.0.0.1:{derp}/derp", cafile=None)
        b = DERPClient.connect(f"https://127.0.0.1:{derp}/derp", cafile=None)
        assert relayed(a, b, b"compose") == (a.public_key, b"compose")
        a.close()
        b.close()
    finally:
        compose("down", "-v", "-t", "5", check=False)
