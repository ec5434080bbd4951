"""packaging/systemd/derpbox.service: systemd's own verifier accepts it, and it keeps the
hardening an operator expects."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "derpbox.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's derpbox.
    derpbox = shutil.which("derpbox", path=str(Path(sys.executable).parent)) or shutil.which("derpbox")
    assert derpbox, "derpbox is not installed as a command"
    unit = tmp_path / "derpbox.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/opt/derpbox/bin/derpbox", f"ExecStart={derpbox}"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stdout + proc.stderr


def test_the_unit_is_hardened():
    s = settings()
    assert s["DynamicUser"] == ["yes"] and s["StateDirectory"] == ["derpbox"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"] == s["CapabilityBoundingSet"]
    assert s["Restart"] == ["on-failure"] and s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    # The key and certificates in the state directory, as in the container's volume.
    assert "DERP_CONFIG_PATH=/var/lib/derpbox/derper.key" in s["Environment"][0]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
