"""The project's image, built and run with podman (../shared/spec/testing-infra.md section 8).

No registry is reachable where the tests run, so the Dockerfile's base image (a build
argument) is made from Debian packages with mmdebstrap, once, and kept with podman's
storage in a cache directory between runs; the derpbox image is built from the working
tree for every session. Containers publish their ports on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/debian-python:bookworm"
IMAGE = "localhost/derpbox:test"
SOURCES = "/etc/apt/sources.list.d/debian.sources"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "derpbox-tests" / "podman"


class Podman:
    """podman with this test run's storage and engine settings (runc, the host's fd limit)."""

    def __init__(self, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        storage, engine = work / "storage.conf", work / "containers.conf"
        storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{work}/storage"\nrunroot = "{work}/run"\n')
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        # HTTPS from builds and containers goes through the host's CA bundle (an intercepting proxy here).
        volumes = '["/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"]' \
            if os.path.exists("/etc/ssl/certs/ca-certificates.crt") else "[]"
        engine.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
                          f'volumes = {volumes}\n[engine]\nruntime = "runc"\n')
        self.work = work
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(storage), CONTAINERS_CONF=str(engine))

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def has_image(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def build_base(self) -> None:
        """Debian bookworm with Python, from the mirror apt uses (about a minute, once)."""
        rootfs = self.work / "rootfs.tar"
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
             "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
             "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
             "bookworm", str(rootfs), SOURCES],
            check=True, capture_output=True, timeout=600)
        self.run("import", "-q", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', str(rootfs), BASE)
        rootfs.unlink()

    def build_image(self) -> None:
        self.run("build", "--format", "docker", "--pull=never", "--build-arg", f"BASE={BASE}", "-t", IMAGE, str(ROOT),
                 timeout=600)


def podman_or_skip(tmp_root: Path) -> Podman:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no container engine: {', '.join(missing)} not installed "
                    "(apt-get install podman runc mmdebstrap; scripts/test.sh does)")
    if not os.path.exists(SOURCES):
        pytest.skip(f"no Debian mirror configured ({SOURCES}) to build the base image from")
    podman = Podman(cache_dir())
    if not podman.has_image(BASE):
        podman.build_base()
    podman.build_image()
    return podman


class Container:
    """One container of the image, named uniquely, removed (with its volume if asked) at the end."""

    def __init__(self, podman: Podman, *args: str, volume: str | None = None):
        self.podman = podman
        self.name = f"derpbox-test-{uuid.uuid4().hex[:8]}"
        self.volume = volume
        self.args = args
        self.start()

    def start(self) -> None:
        mount = ["-v", f"{self.volume}:/var/lib/derpbox"] if self.volume else []
        self.id = self.podman.run("run", "-d", "--name", self.name, *mount, *self.args, IMAGE).stdout.strip()

    def remove(self) -> None:
        self.podman.run("rm", "-f", "-t", "5", self.name, check=False)

    def exec(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.podman.run("exec", self.name, *args, check=check, timeout=60)

    def logs(self) -> str:
        proc = self.podman.run("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def state(self, field: str) -> str:
        return self.podman.run("inspect", "--format", "{{.State.%s}}" % field, self.name).stdout.strip()

    def wait_healthy(self, timeout: float = 60) -> str:
        """Retries ``derpbox healthcheck`` inside until it passes; its output."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.exec("derpbox", "healthcheck")
            if proc.returncode == 0:
                return proc.stdout + proc.stderr
            assert self.state("Running") == "true", f"the container stopped:\n{self.logs()[-3000:]}"
            assert time.monotonic() < deadline, f"never healthy:\n{proc.stdout}{proc.stderr}\n{self.logs()[-3000:]}"
            time.sleep(0.5)
