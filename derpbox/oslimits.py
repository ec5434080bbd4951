"""What the operating system allows a relay: the listen backlog and open files.

Both default low for a server that takes thousands of connections: Twisted listens with a
backlog of 50 (a burst of connects then waits a second for a SYN retry), and the soft
open-file limit is usually 1,024. Go's runtime raises the soft limit to the hard one at
start and its listeners use the system's maximum backlog; derpbox does the same.
"""

from __future__ import annotations

import resource
import socket

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def listen_backlog() -> int:
    """The system's maximum listen backlog (net.core.somaxconn), as Go's listeners use."""
    try:
        with open(SOMAXCONN_PATH) as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def raise_open_files() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, hard
    return soft, soft
