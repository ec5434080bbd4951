"""The node's listening sockets, opened by the supervisor and inherited by the workers.

Each worker gets its own socket per port, all bound with SO_REUSEPORT, so the kernel
spreads new connections (and STUN datagrams) evenly over the workers; one shared
socket would wake them all and leave the connections to whichever is quickest. The
supervisor keeps every socket open, so connections that arrive for a worker while it
restarts wait in its queue for the new process instead of being refused.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..bind_errors import NO_IPV6
from ..oslimits import listen_backlog



@dataclass(frozen=True)
class InheritedSocket:
    name: str  # "main", "port80", "stun", "stun6"
    fd: int
    family: int
    kind: int  # SOCK_STREAM or SOCK_DGRAM

    def text(self) -> str:
        return f"{self.name}:{self.fd}:{int(self.family)}:{int(self.kind)}"

    @classmethod
    def parse(cls, text: str) -> InheritedSocket:
        name, fd, family, kind = text.split(":")
        return cls(name, int(fd), int(family), int(kind))


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket as the single-process server would open: "" is every address."""
    family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Dual stack, as Twisted's TCP6 port on "::": IPv4 clients arrive mapped.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or "::", port))
        sock.listen(listen_backlog())
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_sockets(host: str, port: int) -> list[socket.socket]:
    """STUN's sockets: one for ``host``, or IPv4 and IPv6-only wildcards for "" (same port)."""
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [_udp(family, host, port)]
    v4 = _udp(socket.AF_INET, "0.0.0.0", port)
    try:
        return [v4, _udp(socket.AF_INET6, "::", v4.getsockname()[1], v6only=True)]
    except OSError as e:
        if e.errno in NO_IPV6:
            return [v4]  # a host without IPv6: STUN over IPv4 only, as the single process
        v4.close()
        raise


def _udp(family: int, host: str, port: int, v6only: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
