"""The README's two commands: the development relay really starts from its script, and
the test script (which ran before this suite, in CI) left no proxy or Prometheus service
enabled at boot."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:4] == ["    bash scripts/dev.sh", "    bash scripts/test.sh"]


def test_the_dev_script_runs_a_relay_on_loopback():
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "dev.sh")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "listening on 127.0.0.1:3340" in line:
                break
        else:
            pytest.fail("the development relay never listened")
        with urllib.request.urlopen("http://127.0.0.1:3340/derp/probe", timeout=5) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("unit", ["nginx", "haproxy", "prometheus"])
def test_the_test_script_leaves_the_packaged_services_disabled(unit):
    if shutil.which("dpkg-query") is None or subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", unit], capture_output=True, text=True).stdout != "install ok installed":
        pytest.skip(f"{unit} is not installed from a Debian package here")
    assert glob.glob(f"/etc/systemd/system/*.wants/{unit}.service") == []
    assert glob.glob(f"/etc/rc[2-5].d/S*{unit}") == []
