"""Twisted adapter that serves the STUN codec on UDP, like derper's STUN listener."""

import socket

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from .bind_errors import NO_IPV6, ListenError, listen_error
from .counters import counter
from .netaddr import host_port
from .protocol.stun import RESPONSE_LEN_IPV4, build_binding_response, parse_binding_request

log = Logger()

# derper reads into a 64 KiB buffer; Twisted's default (8 KiB) would truncate larger datagrams.
MAX_PACKET_SIZE = 64 * 1024


class STUNStats:
    """Counters behind derper's stun_requests{disposition} and stun_addrfamily{family}."""

    METRICS = (
        counter("requests", "stun_requests", "STUN requests, by disposition.", ("disposition",)),
        counter("addrfamily", "stun_addrfamily", "STUN requests, by address family.", ("family",)),
    )

    def __init__(self) -> None:
        # read_error keeps derper's label set: recvfrom errors never reach a
        # DatagramProtocol (Twisted's UDP port handles them), so it stays 0 here.
        self.requests: dict[str, int] = dict.fromkeys(
            ("success", "not_stun", "read_error", "write_error"), 0
        )
        self.addrfamily: dict[str, int] = dict.fromkeys(("ipv4", "ipv6"), 0)


class STUNProtocol(DatagramProtocol):
    """Answers Tailscale Binding Requests; everything else is only counted.

    Nothing is logged per datagram: scanners and other STUN clients would
    flood the log, and the counters already show them.
    """

    def __init__(self, stats: STUNStats) -> None:
        self.stats = stats

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        txid = parse_binding_request(data)
        if txid is None:
            self.stats.requests["not_stun"] += 1
            return
        host, port = addr
        response = build_binding_response(txid, host, port)
        family = "ipv4" if len(response) == RESPONSE_LEN_IPV4 else "ipv6"
        self.stats.addrfamily[family] += 1
        try:
            self.transport.write(response, addr)
        except OSError:
            self.stats.requests["write_error"] += 1
        else:
            self.stats.requests["success"] += 1


def _listen_udp(reactor, host: str, port: int, stats: STUNStats) -> IListeningPort:
    return reactor.listenUDP(
        port, STUNProtocol(stats), interface=host, maxPacketSize=MAX_PACKET_SIZE
    )


def _listen_ipv6_only_wildcard(reactor, port: int, stats: STUNStats) -> IListeningPort:
    # Twisted cannot set IPV6_V6ONLY before bind, and without it [::] would
    # claim IPv4 too and collide with the 0.0.0.0 socket; so bind it here and
    # hand the socket over (Twisted dups the descriptor, hence the close).
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
        sock.setblocking(False)
        return reactor.adoptDatagramPort(
            sock.fileno(), socket.AF_INET6, STUNProtocol(stats), MAX_PACKET_SIZE
        )


def listen_stun(reactor, host: str, port: int, stats: STUNStats) -> list[IListeningPort]:
    """Listen for STUN on host:port; host "" means every IPv4 and IPv6 interface.

    For "" the IPv6 socket reuses the port the IPv4 one got, so port 0 yields one port
    number. A host without IPv6 (no such family or address) gets STUN over IPv4 alone,
    with a warning; any other failure, such as the port being in use over IPv6, raises
    a ListenError like a failure over IPv4.
    """
    if host:
        return [_listen("STUN", reactor, host, port, stats)]
    ipv4 = _listen("STUN (IPv4)", reactor, "0.0.0.0", port, stats)
    bound = ipv4.getHost().port
    try:
        ipv6 = _listen_ipv6_only_wildcard(reactor, bound, stats)
    except OSError as e:
        if e.errno not in NO_IPV6:
            ipv4.stopListening()
            raise listen_error("STUN (IPv6)", "::", bound, "udp", e) from None
        log.warn("STUN not listening on [::]:{port}, IPv4 only: this host has no IPv6 ({error})",
                 port=bound, error=e.strerror)
        return [ipv4]
    return [ipv4, ipv6]


def _listen(what: str, reactor, host: str, port: int, stats: STUNStats) -> IListeningPort:
    try:
        return _listen_udp(reactor, host, port, stats)
    except (OSError, CannotListenError) as e:
        raise listen_error(what, host, port, "udp", e) from None


class STUNService(service.Service):
    """Runs listen_stun for the lifetime of the service; ``ports`` holds the listeners and
    ``ready`` fires once they listen, or fails with the ListenError that stopped them."""

    def __init__(self, host: str, port: int, stats: STUNStats, reactor=None, adopted=None) -> None:
        self.host = host
        self.port = port
        # (fd, family) of sockets a worker inherited from its supervisor, instead of binding.
        self.adopted = adopted
        self.stats = stats
        self.ports: list[IListeningPort] = []
        self.ready: defer.Deferred | None = None
        self._reactor = reactor

    def startService(self) -> None:
        reactor = self._reactor
        if reactor is None:
            # Imported late so that importing this module never installs a reactor.
            from twisted.internet import reactor
        super().startService()
        try:
            if self.adopted is not None:
                self.ports = [reactor.adoptDatagramPort(fd, family, STUNProtocol(self.stats), MAX_PACKET_SIZE)
                              for fd, family in self.adopted]
            else:
                self.ports = listen_stun(reactor, self.host, self.port, self.stats)
        except ListenError:
            self.ready = defer.fail()
            return
        for port in self.ports:
            addr = port.getHost()
            log.info("STUN listening on {address} (UDP)", address=host_port(addr.host, addr.port))
        self.ready = defer.succeed(self)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
