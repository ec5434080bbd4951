"""The outbound side of the mesh: one ``MeshPeer`` per peer node, kept connected.

As derper's mesh client: each peer is dialled at ``https://host[:port]/derp`` with
this server's own node key and the mesh key; every key the peer announces
(PeerPresent) becomes reachable through it, PeerGone or a broken link forgets it.
A peer whose server key is our own is this node (listing yourself is normal): it
is logged once and not dialled again. A broken link is redialled after 5 s plus
jitter, so a restarted region does not reconnect in lockstep.

``MeshService`` holds the peers of ``-mesh-with`` and the peers file, and changes
them without a restart: SIGHUP or a changed peers file adds and removes peers, and
a removed peer's keys are forgotten at once.
"""

from __future__ import annotations

import os
import random

from nacl.public import PrivateKey
from twisted.application.service import Service
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..counters import counter, gauge
from ..logs import LogThrottle
from ..protocol.frames import PRESENT_BEFORE_LINK, PeerGoneReason, PeerPresentFlags
from ..relay.relay import Relay
from ..tls.client import VerifiedClientTLS
from .link import MeshLink
from .spec import MeshPeerSpec, parse_peers_file

log = Logger()

RETRY_INTERVAL = 5.0
RETRY_JITTER = 1.0
# Another worker of this node is at most restarting: try again soon.
WORKER_RETRY_INTERVAL = 0.2
CONNECT_TIMEOUT = 10.0
PEERS_FILE_POLL = 1.0

DOWN, CONNECTING, UP, SELF, STOPPED = "down", "connecting", "up", "self", "stopped"


class MeshStats:
    """Per-peer figures, keyed by the peer's entry as written."""

    METRICS = (
        gauge("up", "derpbox_mesh_peer_up", "1 while the mesh link to the peer is connected and watching.",
              ("peer",)),
        gauge("keys", "derpbox_mesh_peer_keys", "Client keys the peer announced (reachable through it).", ("peer",)),
        counter("connects", "derpbox_mesh_peer_connects", "Mesh links established to the peer.", ("peer",)),
        counter("failures", "derpbox_mesh_peer_failures", "Mesh links to the peer that failed or broke.", ("peer",)),
    )

    def __init__(self) -> None:
        self.up: dict[str, int] = {}
        self.keys: dict[str, int] = {}
        self.connects: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def forget(self, name: str) -> None:
        for figures in (self.up, self.keys, self.connects, self.failures):
            figures.pop(name, None)


class MeshPeer:
    """One peer node: its link, the keys it announced, and the redial timer."""

    def __init__(self, spec: MeshPeerSpec, relay: Relay, private_key: PrivateKey, mesh_key: bytes, *,
                 reactor, ca_file: str, stats: MeshStats, noise: LogThrottle):
        self.spec = spec
        self.name = spec.entry
        self.relay = relay
        self.private_key = private_key
        # Workers share the node key: for them a peer with our key is another worker, not us.
        self.own_key = None if spec.unix_path else relay.public_key
        self.mesh_key = mesh_key
        self.clock = reactor
        self.ca_file = ca_file
        self.stats = stats
        self.noise = noise
        self.host_header = spec.host if spec.port == 443 else f"{spec.host}:{spec.port}"
        self.state = DOWN
        self.keys: set[bytes] = set()
        self.last_error = ""
        self.server_key: bytes | None = None
        self._link: MeshLink | None = None
        self._dialing = None
        self._redial = None
        stats.up[self.name] = 0
        stats.keys[self.name] = 0
        stats.connects.setdefault(self.name, 0)
        stats.failures.setdefault(self.name, 0)

    def __repr__(self) -> str:
        return f"<MeshPeer {self.name} {self.state}>"

    @property
    def is_worker(self) -> bool:
        """Another worker of this node (derpbox.workers), not another node of the region."""
        return bool(self.spec.unix_path)

    # -- dialling -----------------------------------------------------------

    def start(self) -> None:
        if self.state in (DOWN, STOPPED):
            self.state = DOWN
            self._dial()

    def _dial(self) -> None:
        self._redial = None
        self.state = CONNECTING
        spec = self.spec
        if spec.unix_path:
            # Another worker of this node: a local socket only this user can open, no TLS.
            endpoint = UNIXClientEndpoint(self.clock, spec.unix_path, timeout=CONNECT_TIMEOUT)
            self._dialing = endpoint.connect(Factory.forProtocol(lambda: MeshLink(self, None)))
        else:
            endpoint = HostnameEndpoint(self.clock, spec.dial_host, spec.port, timeout=CONNECT_TIMEOUT)
            tls = VerifiedClientTLS(spec.host, cert_name=spec.cert_name, ca_file=self.ca_file)
            factory = Factory.forProtocol(lambda: MeshLink(self, tls))
            self._dialing = wrapClientTLS(tls, endpoint).connect(factory)
        self._dialing.addErrback(self._dial_failed)

    def _dial_failed(self, failure) -> None:
        self._dialing = None
        if self.state == STOPPED:
            return
        self._failed(failure.getErrorMessage())

    def _schedule_redial(self) -> None:
        if self.state in (STOPPED, SELF) or self._redial is not None:
            return
        self.state = DOWN
        base = self._retry_interval()
        # Jitter in proportion, so a region (or a node's workers) does not redial in lockstep.
        self._redial = self.clock.callLater(base * (1 + random.random() * RETRY_JITTER / RETRY_INTERVAL), self._dial)

    def _retry_interval(self) -> float:
        return WORKER_RETRY_INTERVAL if self.is_worker else RETRY_INTERVAL

    # -- what the link reports ------------------------------------------------

    def link_connected(self, link: MeshLink) -> None:
        self._dialing = None
        if self.state == STOPPED:
            link.close()
            return
        self._link = link

    def link_ready(self, link: MeshLink, server_key: bytes) -> None:
        self.state = UP
        self.server_key = server_key
        self.last_error = ""
        self.stats.up[self.name] = 1
        self.stats.connects[self.name] += 1
        log.info("mesh({peer}): connected to {key}, watching its clients", peer=self.name, key=server_key.hex()[:16])

    def self_connected(self) -> None:
        self.state = SELF
        log.info("mesh({peer}): detected self-connect; ignoring this entry", peer=self.name)

    def link_failed(self, link: MeshLink, reason: str) -> None:
        self.last_error = reason

    def link_lost(self, link: MeshLink, reason) -> None:
        if link is not self._link:
            return
        self._link = None
        was_up = self.state == UP
        self.stats.up[self.name] = 0
        self._forget_keys()
        if self.state in (STOPPED, SELF):
            return
        if not self.last_error:
            self.last_error = self._describe_loss(link, reason, was_up)
        self._failed(self.last_error)

    def _describe_loss(self, link: MeshLink, reason, was_up: bool) -> str:
        text = reason.getErrorMessage()
        if was_up and link.frames_seen == 0:
            # A server closes a non-mesh client that sends WatchConns ("insufficient permissions").
            return f"the peer closed the link right after WatchConns ({text}): is the mesh key the same on both nodes?"
        if not link.ready:
            return f"closed during the DERP handshake ({text}): a wrong mesh key, or client verification refusing this server's key?"
        return f"link broken: {text}"

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.stats.failures[self.name] += 1
        self.noise.warn(f"{self.name}:{reason}", "mesh({peer}): {reason}; retrying in about {t:g} s",
                        peer=self.name, reason=reason, t=self._retry_interval())
        self._schedule_redial()

    # -- the keys the peer announced -----------------------------------------

    def present(self, key: bytes, flags: int | None = None) -> None:
        if self.is_worker and flags is not None and flags & PeerPresentFlags.IS_MESH_PEER:
            # Another worker's mesh links (to us, to other workers, to other nodes) are no clients.
            return
        if key not in self.keys:
            self.keys.add(key)
            self.stats.keys[self.name] = len(self.keys)
        self.relay.add_forwarder(key, self, before_link=bool(self.is_worker and flags and flags & PRESENT_BEFORE_LINK))

    @property
    def precedes(self) -> bool:
        return self.spec.precedes

    def gone(self, key: bytes, reason: int) -> None:
        if reason == PeerGoneReason.NOT_HERE:
            log.debug("mesh({peer}): {key} is not connected there", peer=self.name, key=key.hex()[:16])
        self.keys.discard(key)
        self.stats.keys[self.name] = len(self.keys)
        self.relay.remove_forwarder(key, self)

    def _forget_keys(self) -> None:
        keys, self.keys = self.keys, set()
        self.stats.keys[self.name] = 0
        for key in keys:
            self.relay.remove_forwarder(key, self)

    # The relay's forwarder interface.
    def forward_packet(self, src: bytes, dst: bytes, packet, disco: bool, sender=None) -> None:
        link = self._link
        if link is None or not link.ready:
            self.relay.stats.drop("write_error", disco, len(packet))
            return
        link.forward(src, dst, packet, disco, sender)

    # -- stopping ---------------------------------------------------------------

    def stop(self) -> None:
        self.state = STOPPED
        self.stats.up[self.name] = 0
        if self._redial is not None and self._redial.active():
            self._redial.cancel()
        self._redial = None
        if self._dialing is not None:
            self._dialing.cancel()
            self._dialing = None
        link, self._link = self._link, None
        self._forget_keys()
        if link is not None:
            link.close()

    def status(self) -> dict:
        return {
            "peer": self.name,
            "url": self.spec.url,
            "dial": self.spec.dial_host,
            "state": self.state,
            "server_key": self.server_key.hex() if self.server_key else "",
            "keys": len(self.keys),
            "connects": self.stats.connects[self.name],
            "failures": self.stats.failures[self.name],
            "last_error": self.last_error,
        }

    def problems(self) -> list[str]:
        """Keys this peer announced that the relay does not route through it, and the reverse."""
        out = []
        for key in self.keys:
            if self not in self.relay.forwarders(key):
                out.append(f"mesh({self.name}): announced {key.hex()[:8]} but is not its forwarder")
        return out


class MeshService(Service):
    """Every mesh peer of this node; ``update`` and the peers file change them live."""

    reload_label = "mesh peers"

    def __init__(self, relay: Relay, private_key: PrivateKey, mesh_key: bytes, reactor, *,
                 specs: tuple[MeshPeerSpec, ...] = (), peers_file: str = "", ca_file: str = ""):
        self.relay = relay
        self.private_key = private_key
        self.mesh_key = mesh_key
        self.reactor = reactor
        self.ca_file = ca_file
        self.static_specs = specs
        self.peers_file = peers_file
        self.stats = MeshStats()
        self.peers: dict[str, MeshPeer] = {}
        # Redial failures repeat every 5 s per peer: one line per peer and reason a minute.
        self.noise = LogThrottle(log)
        self._file_state = None
        self._file_specs: tuple[MeshPeerSpec, ...] = ()
        self._poll = None

    def startService(self) -> None:
        super().startService()
        if self.peers_file:
            self._file_specs = self._read_peers_file() or ()
            self._poll = LoopingCall(self._poll_peers_file)
            self._poll.clock = self.reactor
            self._poll.start(PEERS_FILE_POLL, now=False)
        self._apply()

    def stopService(self) -> None:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for peer in self.peers.values():
            peer.stop()
        self.peers.clear()

    def reload(self) -> None:
        """SIGHUP: read the peers file again and apply it."""
        if self.peers_file:
            specs = self._read_peers_file()
            if specs is not None:
                self._file_specs = specs
        self._apply()

    def update(self, specs: tuple[MeshPeerSpec, ...]) -> None:
        """Replace the peers given outside the peers file (``-mesh-with``)."""
        self.static_specs = specs
        self._apply()

    def _apply(self) -> None:
        wanted = {spec.entry: spec for spec in (*self.static_specs, *self._file_specs)}
        for name in list(self.peers):
            if name not in wanted or self.peers[name].spec != wanted[name]:
                log.info("mesh({peer}): removed", peer=name)
                self.peers.pop(name).stop()
                self.stats.forget(name)
        for name, spec in wanted.items():
            if name not in self.peers:
                peer = MeshPeer(spec, self.relay, self.private_key, self.mesh_key, reactor=self.reactor,
                                ca_file=self.ca_file, stats=self.stats, noise=self.noise)
                self.peers[name] = peer
                if self.running:
                    log.info("mesh({peer}): dialling {url} via {dial}", peer=name, url=spec.url, dial=spec.dial_host)
                    peer.start()

    def _read_peers_file(self) -> tuple[MeshPeerSpec, ...] | None:
        """The file's peers, or None (logged, the current peers kept) when it cannot be used."""
        try:
            st = os.stat(self.peers_file)
            with open(self.peers_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            self._file_state = None
            log.error("mesh peers file {path}: {error}; keeping the current peers", path=self.peers_file,
                      error=e.strerror or str(e))
            return None
        self._file_state = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            return parse_peers_file(text, self.peers_file)
        except ValueError as e:
            log.error("mesh peers file: {error}; keeping the current peers", error=str(e))
            return None

    def _poll_peers_file(self) -> None:
        try:
            st = os.stat(self.peers_file)
            state = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            state = None
        if state != self._file_state:
            self.reload()

    def status(self) -> list[dict]:
        """Each peer's state, keys learned and last error, for /debug/mesh and the healthcheck."""
        return [peer.status() for peer in self.peers.values()]

    def problems(self) -> list[str]:
        out = []
        for peer in self.peers.values():
            out += peer.problems()
        return out
