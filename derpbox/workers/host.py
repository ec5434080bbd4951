"""The host as the worker processes see it: how many CPUs this process may use (its
affinity, bounded by a cgroup CPU quota), and a worker's tie to its supervisor."""

from __future__ import annotations

import ctypes
import math
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """``os.sched_getaffinity`` (taskset, cpusets), then ``cpu.max`` (cgroup v2) or
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (v1), as a container's ``--cpus`` sets them."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def die_with_parent(supervisor: int) -> None:
    """SIGTERM this process when its parent, the supervisor (pid ``supervisor``), dies, even
    by SIGKILL: an orphaned worker would keep the node's port open with nobody restarting it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        # The supervisor died before the call above took effect (and in a container it is
        # PID 1 itself, so "reparented to 1" says nothing).
        os.kill(os.getpid(), signal.SIGTERM)
