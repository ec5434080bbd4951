"""PROXY protocol on a listener: a wrapper placed under TLS (the header precedes the ClientHello).

``ProxyProtocolFactory(wrapped_factory, mode, trusted_networks)`` wraps the factory a
port listens with (``TLSMemoryBIOFactory(...)`` on the main listener, the port-80 Site).
Per connection, by the TCP peer's address:

* **not in trusted_networks**: the connection is direct. The wrapped protocol is
  connected at once (its own timeouts apply) and sees the TCP peer; the first bytes
  are peeked, and if they start a PROXY v1 or v2 signature the connection is closed
  with ``PROXY header from untrusted <ip>`` (someone trying to spoof an address).
* **trusted**: the header is parsed first (``mode`` v1, v2 or auto; at most
  MAX_V2_LENGTH bytes, HEADER_TIMEOUT seconds), then the wrapped protocol is built
  and connected with the header's source address, and gets the bytes that follow.
  A malformed header closes the connection with a log line naming the problem.
  v2 LOCAL, v1 UNKNOWN and non-TCP families keep the proxy's own address; in auto
  mode a connection without a header is passed through unchanged.

``getPeer()`` returns the client address from the header (IPv4Address/IPv6Address),
so TLS, ``derpbox.netaddr.remote_address()`` and twisted.web above all see the real client;
``getHost()`` is the listener's address as before. ``via_proxy`` is True for every
connection whose TCP peer is a trusted proxy (with a header or not): such a
connection's address never grants address-based debug access (see debug.py).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from ..logs import LogThrottle
from ..netaddr import in_networks, parse_ip
from ..protocol.proxy import (
    ProxyHeader,
    ProxyHeaderError,
    looks_like_proxy_header,
    parse_proxy_header,
)

__all__ = ["HEADER_TIMEOUT", "ProxyProtocolFactory", "ProxyProtocolWrapper", "came_via_proxy"]

log = Logger()

HEADER_TIMEOUT = 5.0


def _address(source: tuple[str, int]):
    host, port = source
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def came_via_proxy(transport) -> bool:
    """True when the connection under *transport* (any layer) arrived from a trusted proxy."""
    while isinstance(transport, ProtocolWrapper):
        if isinstance(transport, ProxyProtocolWrapper):
            return transport.via_proxy
        transport = transport.transport
    return False


class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection: the TCP transport's protocol, and the wrapped protocol's transport."""

    def __init__(self, factory: ProxyProtocolFactory):
        # wrappedProtocol is built once the real client address is known.
        super().__init__(factory, None)
        self.via_proxy = False
        self.proxy_header: ProxyHeader | None = None
        self._peer = None
        self._buf = b""
        self._state = "new"  # parse (trusted) | peek (untrusted) | open | closed
        self._timer = None
        self._tcp_ip = ""

    def logPrefix(self):
        return "ProxyProtocol"

    def makeConnection(self, transport):
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self):
        peer = self.transport.getPeer()
        ip = parse_ip(getattr(peer, "host", ""))
        self._tcp_ip = str(ip) if ip is not None else getattr(peer, "host", "")
        factory = self.factory
        if in_networks(ip, factory.trusted):
            self.via_proxy = True
            self._state = "parse"
            self._timer = factory.clock.callLater(factory.timeout, self._header_timeout)
        else:
            self._state = "peek"
            self._connect_wrapped(peer)

    # -- transport for the wrapped protocol ----------------------------------

    def getPeer(self):
        return self._peer if self._peer is not None else self.transport.getPeer()

    # -- protocol for the TCP transport --------------------------------------

    def dataReceived(self, data):
        state = self._state
        if state == "open":
            self.wrappedProtocol.dataReceived(data)
        elif state == "parse":
            self._parse(data)
        elif state == "peek":
            self._peek(data)

    def _peek(self, data: bytes) -> None:
        buf = self._buf + data
        verdict = looks_like_proxy_header(buf)
        if verdict is None:
            self._buf = buf
            return
        self._buf = b""
        if verdict:
            self.factory.noise.warn(
                f"untrusted:{self._tcp_ip}",
                "PROXY header from untrusted {ip}: closing (only -trusted-proxies may send one)",
                ip=self._tcp_ip,
            )
            self._close()
            return
        self._state = "open"
        self.wrappedProtocol.dataReceived(buf)

    def _parse(self, data: bytes) -> None:
        buf = self._buf + data
        try:
            header = parse_proxy_header(buf, self.factory.mode)
        except ProxyHeaderError as e:
            self._buf = b""
            self.factory.noise.warn(
                f"bad:{self._tcp_ip}", "bad PROXY header from {ip}: {problem}", ip=self._tcp_ip, problem=str(e)
            )
            self._close()
            return
        if header is None:
            self._buf = buf
            return
        self._buf = b""
        self._cancel_timer()
        self.proxy_header = header
        if header.source is not None:
            self._peer = _address(header.source)
        self._state = "open"
        self._connect_wrapped(self.getPeer())
        rest = buf[header.length :]
        if rest and self._state == "open":
            self.wrappedProtocol.dataReceived(rest)

    def _header_timeout(self) -> None:
        self._timer = None
        self.factory.noise.info(
            f"timeout:{self._tcp_ip}",
            "no complete PROXY header from {ip} within {t:g} s: closing",
            ip=self._tcp_ip,
            t=self.factory.timeout,
        )
        self._close()

    def _connect_wrapped(self, addr) -> None:
        protocol = self.factory.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            self._close()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)

    def _close(self) -> None:
        self._state = "closed"
        self._cancel_timer()
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def connectionLost(self, reason):
        self._state = "closed"
        self._cancel_timer()
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        self._buf = b""
        if wrapped is not None:
            wrapped.connectionLost(reason)


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory so trusted proxies can name the real client."""

    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(self, wrapped_factory, mode: str, trusted_networks, *, clock=None, timeout: float = HEADER_TIMEOUT):
        if mode not in ("v1", "v2", "auto"):
            raise ValueError(f"PROXY protocol mode {mode!r}: expected v1, v2 or auto")
        super().__init__(wrapped_factory)
        self.mode = mode
        self.trusted = tuple(
            n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else ipaddress.ip_network(n, strict=False)
            for n in trusted_networks
        )
        if clock is None:
            # Imported late so that importing this module never installs a reactor.
            from twisted.internet import reactor as clock
        self.clock = clock
        self.timeout = timeout
        self.noise = LogThrottle(Logger("derpbox.web.proxied"))

    def buildProtocol(self, addr):
        return ProxyProtocolWrapper(self)

    def registerProtocol(self, p):  # no bookkeeping: connections free themselves
        pass

    def unregisterProtocol(self, p):
        pass
