"""Pebble (a test ACME CA) and pebble-challtestsrv (its DNS) on loopback, for tests.

Follows the recipe in spec/testing-infra.md section 1: challtestsrv answers A
127.0.0.1 for every name (so ``derp.test`` resolves) and no AAAA; its own
challenge responders are off, so the test's listeners own Pebble's
``http_port`` (HTTP-01) and ``tls_port`` (TLS-ALPN-01). Pebble's HTTPS
listener uses a throwaway CA (``ca_file``); Pebble's issuing root is
regenerated on every start, fetch it with :meth:`Pebble.root_pem` after each.

Use the ``pebble`` session fixture (one Pebble for the session), or make a
:class:`Pebble` yourself and call ``start()``/``stop()`` (e.g. to have it down
at first).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from .certs import make_cert

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


def free_port(udp_too: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (also free for UDP with *udp_too*)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class Pebble:
    """Pebble plus challtestsrv on free loopback ports (chosen once, kept across restarts)."""

    def __init__(self, workdir: Path, *, validity: int = 3600, env: dict[str, str] | None = None,
                 eab_keys: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A throwaway CA for Pebble's own HTTPS (its issuing root is another, per start).
        self.ca_file, crt, key = make_cert(self.workdir / "tls", "localhost", "127.0.0.1", "::1")
        self.acme_port = free_port()
        self.management_port = free_port()
        self.http_port = free_port()
        self.tls_port = free_port()
        self.dns_port = free_port(udp_too=True)
        self.challtest_management_port = free_port()
        self.env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", **(env or {})}
        self.config_path = self.workdir / "pebble-config.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.acme_port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(crt),
                        "privateKey": str(key),
                        "httpPort": self.http_port,
                        "tlsPort": self.tls_port,
                        "ocspResponderURL": "",
                        # With keys (kid -> base64url HMAC key) Pebble demands External Account Binding.
                        "externalAccountBindingRequired": bool(eab_keys),
                        "externalAccountMACKeys": eab_keys or {},
                        "certificateValidityPeriod": validity,
                    }
                }
            )
        )
        self._pebble: subprocess.Popen | None = None
        self._challtestsrv: subprocess.Popen | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def start(self, timeout: float = 10.0) -> None:
        if self._challtestsrv is None:
            self._challtestsrv = subprocess.Popen(
                [
                    CHALLTESTSRV,
                    "-defaultIPv4", "127.0.0.1",
                    "-defaultIPv6", "",
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "",
                    "-https01", "",
                    "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{self.challtest_management_port}",
                ],
                stdout=open(self.workdir / "challtestsrv.log", "ab"),
                stderr=subprocess.STDOUT,
            )
            self._wait(lambda: _tcp_open(self.challtest_management_port), timeout, "pebble-challtestsrv")
        self._pebble = subprocess.Popen(
            [PEBBLE, "-config", str(self.config_path), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            env={**os.environ, **self.env},
            stdout=open(self.workdir / "pebble.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        self._wait(self._directory_ready, timeout, "pebble")

    def stop(self) -> None:
        """Stop Pebble (challtestsrv keeps running; see :meth:`close`)."""
        if self._pebble is not None:
            self._pebble.terminate()
            self._pebble.wait(10)
            self._pebble = None

    def close(self) -> None:
        self.stop()
        if self._challtestsrv is not None:
            self._challtestsrv.terminate()
            self._challtestsrv.wait(10)
            self._challtestsrv = None

    def root_pem(self) -> bytes:
        """Pebble's current issuing root (changes on every start)."""
        r = requests.get(f"https://127.0.0.1:{self.management_port}/roots/0", verify=str(self.ca_file), timeout=10)
        r.raise_for_status()
        return r.content

    def log(self) -> str:
        path = self.workdir / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _directory_ready(self) -> bool:
        if self._pebble is not None and self._pebble.poll() is not None:
            raise RuntimeError(f"pebble exited with {self._pebble.returncode}:\n{self.log()}")
        try:
            return requests.get(self.directory_url, verify=str(self.ca_file), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not become ready within {timeout}s")


def _tcp_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


EAB_KID = "kid-derpbox"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"  # base64url, as Pebble wants


@pytest.fixture(scope="session")
def pebble_eab(tmp_path_factory):
    """A Pebble that requires External Account Binding (as Google Trust Services does)."""
    server = Pebble(tmp_path_factory.mktemp("pebble-eab"), eab_keys={EAB_KID: EAB_KEY})
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def pebble(tmp_path_factory):
    """One running Pebble for the test session (its CA is regenerated per start)."""
    server = Pebble(tmp_path_factory.mktemp("pebble"))
    server.start()
    yield server
    server.close()
