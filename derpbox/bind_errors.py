"""One line for a listener that cannot start: which listener, which address, and why.

A relay that lost one of its sockets must not keep running as if it were serving: the
caller logs this line and exits non-zero, so a restart policy or a health check sees it.
"""

from __future__ import annotations

import errno
import os

from twisted.internet.error import CannotListenError

from .netaddr import host_port

LOW_PORTS = (
    "ports below 1024 need the net.ipv4.ip_unprivileged_port_start sysctl, "
    "the CAP_NET_BIND_SERVICE capability, or a higher port"
)


# A host without IPv6 (a container with it off): the IPv6 half of a wildcard STUN listener
# is skipped with a warning; any other error there is a failure like one over IPv4.
NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


class ListenError(Exception):
    """A listener could not be opened; ``str()`` is the whole line to log."""


def listen_error(what: str, host: str, port: int, proto: str, error: BaseException) -> ListenError:
    """``error`` (an OSError, or Twisted's CannotListenError around one) as one line."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        error = error.socketError
    address = host_port(host or "*", port)
    code = getattr(error, "errno", None)
    if code == errno.EADDRINUSE:
        holder = port_holder(proto, port)
        cause = f"port in use{f' by {holder}' if holder else ''}"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied ({LOW_PORTS})" if port and port < 1024 else "permission denied"
    elif code == errno.EADDRNOTAVAIL:
        cause = "no such address on this host"
    else:
        cause = getattr(error, "strerror", None) or str(error)
    return ListenError(f"{what} on {proto.upper()} {address}: {cause}")


def port_holder(proto: str, port: int) -> str | None:
    """The process that has ``port`` (``pid 123 (nginx)``), when /proc lets this user see it."""
    inodes = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    # TCP: only a listening socket (state 0A) holds the port; UDP: any bound one.
                    if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or state == "0A"):
                        inodes.add(f"socket:[{inode}]")
        except (OSError, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, _listdir("/proc")):
        for fd in _listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return f"pid {pid} ({_command(pid)})"
            except OSError:
                continue
    return "another process (not visible to this user)"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
