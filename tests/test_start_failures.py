"""A server that cannot start exits at once, non-zero, with one line saying why, and leaves
no process behind: a restart policy or a health check must see it (real processes and
sockets; the ports are taken by this test)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from .support import unused_port

TIMEOUT = 20


@pytest.fixture
def taken():
    """A TCP port with a listener on it and a UDP port bound, both on 127.0.0.1."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    yield tcp.getsockname()[1], udp.getsockname()[1]
    tcp.close()
    udp.close()


def start(tmp_path, *flags, preexec=()):
    """derpbox with ``flags``; its exit code and output once it exits (it must, by itself)."""
    cmd = [*preexec, sys.executable, "-m", "derpbox", "-tls", "off", "-c", str(tmp_path / "derper.key"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    # Nothing it started may outlive it: no process names this test's key file.
    marker = str(tmp_path / "derper.key").encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert marker not in f.read(), f"process {pid} is still running"
        except OSError:
            continue
    return proc.returncode, proc.stdout + proc.stderr


def the_line(output: str) -> str:
    assert "Traceback" not in output and "FirstError" not in output, output
    [line] = [line for line in output.splitlines() if "cannot start" in line]
    return line.split("cannot start: ", 1)[1]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stun_port_in_use(tmp_path, taken, workers):
    _, udp = taken
    code, out = start(tmp_path, "-a", "127.0.0.1:0", "-stun-port", str(udp), "-workers", workers)
    assert code == 1
    assert the_line(out) == f"STUN on UDP 127.0.0.1:{udp}: port in use by pid {os.getpid()} ({_comm()})"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_derp_port_in_use(tmp_path, taken, workers):
    tcp, _ = taken
    code, out = start(tmp_path, "-a", f"127.0.0.1:{tcp}", "-stun-port", "0", "-workers", workers)
    assert code == 1
    line = the_line(out)
    assert line.startswith("DERP") and line.endswith(f"on TCP 127.0.0.1:{tcp}: port in use by pid {os.getpid()} ({_comm()})")


def test_metrics_port_in_use(tmp_path, taken):
    tcp, _ = taken
    code, out = start(tmp_path, "-a", "127.0.0.1:0", "-stun-port", "0", "-metrics-addr", f"127.0.0.1:{tcp}")
    assert code == 1
    assert the_line(out).startswith(f"metrics (/metrics, /healthz) on TCP 127.0.0.1:{tcp}: port in use by pid")
    # The listeners that did start were up, and said so, before the failure was noticed.
    assert "DERP (plain HTTP) listening on" in out


def low_port_forbidden() -> list[str]:
    """A way to run derpbox without the right to bind ports below 1024, or a skip."""
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 81:
            pytest.skip("net.ipv4.ip_unprivileged_port_start lets anyone bind port 81 here")
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and no setpriv to drop CAP_NET_BIND_SERVICE")
    return ["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_low_port_without_permission(tmp_path, workers):
    preexec = low_port_forbidden()
    code, out = start(tmp_path, "-a", "127.0.0.1:81", "-stun-port", "0", "-workers", workers, preexec=preexec)
    assert code == 1
    line = the_line(out)
    assert line.endswith("on TCP 127.0.0.1:81: permission denied (ports below 1024 need the "
                         "net.ipv4.ip_unprivileged_port_start sysctl, the CAP_NET_BIND_SERVICE capability, "
                         "or a higher port)"), line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_corrupt_key_file(tmp_path, workers):
    (tmp_path / "derper.key").write_text("not a key")
    code, out = start(tmp_path, "-a", "127.0.0.1:0", "-stun-port", "0", "-workers", workers)
    assert code == 2
    assert the_line(out).startswith(f"key file {tmp_path / 'derper.key'}: not JSON")


def test_every_listener_is_logged_when_up(tmp_path):
    """The counterpart: started, each listener says where it listens, STUN included, and
    SIGTERM stops it cleanly (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "derpbox", "-tls", "off", "-c", str(tmp_path / "derper.key"),
                             "-a", "127.0.0.1:0", "-stun-port", "0", "-metrics-addr", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if sum(w in "".join(lines) for w in ("DERP (plain HTTP) listening", "STUN listening", "metrics")) == 3:
                break
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
    text = "".join(lines)
    assert "STUN listening on 127.0.0.1:" in text and "(UDP)" in text
    assert "metrics (/metrics, /healthz) listening on 127.0.0.1:" in text


def _comm() -> str:
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


def test_open_files_and_listen_backlog_are_the_systems_maximum(tmp_path):
    """The soft RLIMIT_NOFILE is raised to the hard limit (as Go's runtime does) and every TCP
    listener uses net.core.somaxconn as its backlog (Twisted's default is 50)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 512:
        pytest.skip("the hard open-file limit is too low to see a raise")
    if shutil.which("ss") is None:
        pytest.skip("no ss (iproute2) to read the listen backlog")
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    proc = subprocess.Popen([sys.executable, "-m", "derpbox", "-tls", "off", "-c", str(tmp_path / "derper.key"),
                             "-a", "127.0.0.1:0", "-stun-port", "0", "-metrics-addr", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=low_soft_limit)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "metrics (/metrics, /healthz) listening" in line:
                break
        text = "".join(lines)
        assert f"open files: up to {hard} (soft limit raised from 512)" in text, text
        with open(f"/proc/{proc.pid}/limits") as f:
            row = next(r for r in f if r.startswith("Max open files"))
        assert row.split()[3:5] == [str(hard), str(hard)]
        ports = [int(line.rsplit(":", 1)[1]) for line in text.splitlines() if " listening on 127.0.0.1:" in line
                 and "(UDP)" not in line]
        assert len(ports) == 2
        for port in ports:
            out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert out.split()[2] == str(somaxconn), out  # Send-Q of a listening socket: its backlog
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_connections_refused_at_the_open_file_limit_are_counted_in_one_line(tmp_path):
    """At its open-file limit Twisted closes each waiting connection and logs three lines for
    it; derpbox counts them (derpbox_accept_refusals_fd_limit) and logs one folded line."""
    import resource
    import time
    import urllib.request

    limit = 64
    port = unused_port()

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    log = tmp_path / "derpbox.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "derpbox", "-tls", "off", "-c", str(tmp_path / "derper.key"),
                                 "-a", f"127.0.0.1:{port}", "-stun=false"], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=low_limit)
    held = []
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # Connections that say nothing: each holds one of the server's descriptors.
        for _ in range(limit + 40):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        deadline = time.monotonic() + 20
        while "refusing new connections" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/varz", timeout=5) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        refused = next(float(line.split()[1]) for line in text.splitlines()
                       if line.startswith("derpbox_accept_refusals_fd_limit "))
        assert refused >= 1
        lines = log.read_text()
        assert lines.count("refusing new connections: the open-file limit is reached") == 1
        assert "EMFILE" not in lines
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(TIMEOUT)
