"""The derpbox command as an operator runs it: bad settings stop start-up clearly."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from derpbox.client import DERPClient
from derpbox.protocol import stun

from .support import read_until_line


def run(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "derpbox", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["-stun-port", "abc"], {}, ["-stun-port", "abc"]),
        (["-certmode", "acme"], {}, ["-certmode", "acme", "letsencrypt"]),
        (["-home", "ftp://x"], {}, ["-home", "ftp://x"]),
        (["-stun", "false"], {}, ["-stun=false"]),
        (["-nosuchflag"], {}, ["nosuchflag"]),
        ([], {"DERP_STUN_PORT": "70000"}, ["DERP_STUN_PORT", "70000"]),
        ([], {"DERP_ADDR": "nonsense"}, ["DERP_ADDR", "nonsense"]),
    ],
)
def test_invalid_settings_exit_2_naming_setting_and_value(args, env, expected, tmp_path):
    result = run("-c", str(tmp_path / "k"), *args, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 2, result
    for word in expected:
        assert word in result.stderr, (word, result.stderr)


def test_bad_mesh_key_file_stops_start_up(tmp_path):
    (tmp_path / "mesh").write_text("tooshort\n")
    result = run("-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "-tls=off", "-stun=false",
                 "-mesh-psk-file", str(tmp_path / "mesh"))
    assert result.returncode == 2
    assert f"mesh key file {tmp_path / 'mesh'}: mesh key must be exactly 64 hex digits" in result.stderr


def test_manual_mode_without_cert_files_names_the_file(tmp_path):
    result = run("-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "-stun=false", "-http-port=-1",
                 "-certmode", "manual", "-certdir", str(tmp_path), "-hostname", "derp.example.com")
    assert result.returncode == 2
    assert str(tmp_path / "derp.example.com.crt") in result.stderr


def test_help_and_version():
    result = run("-h")
    assert result.returncode == 0 and "-hostname" in result.stdout and "DERP_DOMAIN" in result.stdout
    result = run("-version")
    assert result.returncode == 0 and result.stdout.startswith("derpbox ")


def test_dev_mode_serves_plain_derp_and_stun_on_localhost(tmp_path):
    """`derpbox -dev`, the README's first command: DERP over plain HTTP on
    127.0.0.1:3340 and STUN on 3478, with a key that lives only in memory."""
    proc = subprocess.Popen([sys.executable, "-m", "derpbox", "-dev"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                a = DERPClient.connect("http://127.0.0.1:3340/derp")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "derpbox -dev did not come up"
                time.sleep(0.1)
        b = DERPClient.connect("http://127.0.0.1:3340/derp")
        a.send_packet(b.public_key, b"dev")
        assert b.recv_packet() == (a.public_key, b"dev")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(stun.build_binding_request(b"x" * 12), ("127.0.0.1", 3478))
            assert stun.parse_binding_response(s.recv(100))[0] == b"x" * 12
        a.close()
        b.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert os.listdir(tmp_path) == []  # no key file written in -dev


def test_derper_flags_that_act_now_raise_no_unsupported_warning(tmp_path):
    rate = tmp_path / "rate.json"
    rate.write_text('{"PerClientRateLimitBytesPerSec": 1000000}')
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpbox", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "-tls=off", "-stun=false",
         "-rate-config", str(rate), "-accept-connection-limit", "10"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        # Start-up is over once it listens: every start-up warning was written before.
        first = read_until_line(proc.stderr, "listening on")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=10)
    err = "".join(first) + rest
    assert "not supported" not in err, err
    assert "rate config applied: client-rate=1000000 bytes/sec" in err
    assert "apply to the TLS listener only" in err


def test_help_says_which_derper_flags_are_refused_and_nothing_is_ignored():
    out = subprocess.run([sys.executable, "-m", "derpbox", "-h"], capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert "not supported" not in text and "no effect" not in text
    lines = text.splitlines()
    for flag in ("-ace", "-secrets-url"):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " ") or line.strip() == flag)
        assert "refused" in " ".join(lines[at:at + 3]), lines[at:at + 3]
