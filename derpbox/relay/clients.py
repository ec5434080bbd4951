"""One record per client key known in the region: local connections, mesh forwarders,
and the local connections that received packets from the key.

A key connected here once has one connection, which is active. A key connected more
than once (spec 1.8, "last writer is active") remembers which duplicates have sent
since, most recent last: the most recent sender is active, and while none of them
has spoken since the active one left, none is. A key connected to other nodes of the
region is reachable through the mesh peers that announced it, the first one
preferred (spec 1.10); a local connection always wins. The record lives while the
key has a local connection or a forwarder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .peer import Peer


class ClientSet:
    __slots__ = ("conns", "active", "senders", "forwarders", "receivers", "superseded")

    def __init__(self) -> None:
        # Every connection of the key, oldest first.
        self.conns: list[Peer] = []
        # The connection that receives the key's traffic, or None (see the module docstring).
        self.active: Peer | None = None
        # With duplicates: the connections that have sent since, most recent last; else None.
        self.senders: list[Peer] | None = None
        # Mesh links that announced the key, first seen first (the one used).
        self.forwarders: list = []
        # Local connections that received packets from the key: they get PeerGone
        # when it leaves the region. An ordered set: dict keys, values unused.
        self.receivers: dict[Peer, None] = {}
        # A newer connection of the key is on another worker of this node (derpbox.workers):
        # "last writer is active" across workers, until one of ours speaks again.
        self.superseded = False

    def __repr__(self) -> str:
        return f"<ClientSet conns={len(self.conns)} dup={self.senders is not None} fwd={len(self.forwarders)}>"

    def add(self, peer: Peer) -> None:
        """A new connection of the key: it becomes active (the newest connection wins)."""
        self.conns.append(peer)
        if len(self.conns) == 2:
            self.senders = []
        self.active = peer
        self.superseded = False

    def supersede(self) -> None:
        """Another worker has the key's newest connection: packets go there."""
        if self.conns:
            self.superseded = True
            self.active = None

    def note_sender(self, peer: Peer) -> None:
        """A duplicate connection that speaks becomes the active one."""
        self.superseded = False
        senders = self.senders
        if senders is None:
            self.active = peer
            return
        if not senders or senders[-1] is not peer:
            if peer in senders:
                senders.remove(peer)
            senders.append(peer)
        self.active = peer

    def remove(self, peer: Peer) -> None:
        """Forget a closed connection; the caller drops the record once ``conns`` is empty."""
        conns = self.conns
        conns.remove(peer)
        if not conns:
            # No connection of ours left to step back or come back: nothing is superseded.
            self.active = self.senders = None
            self.superseded = False
            return
        senders = self.senders
        if peer in senders:
            senders.remove(peer)
        if len(conns) == 1:
            self.senders = None
            self.active = None if self.superseded else conns[0]
        elif self.active is peer:
            self.active = senders[-1] if senders else None

    def reinstate(self) -> None:
        """The other worker's connection of the key left: ours receive again."""
        if self.superseded:
            self.superseded = False
            senders = self.senders
            self.active = (senders[-1] if senders else None) if senders is not None else self.conns[0]

    def counted_as(self) -> str | None:
        """"local", "remote" or None: how derp_clients_local/_remote see the key (derper
        counts other nodes' mesh links as clients). A key whose active connection is on
        another worker is that worker's to count; this node's workers and their links are
        no clients, and a key on another worker is the node's own, never remote."""
        if self.conns:
            if self.superseded or all(peer.is_worker for peer in self.conns):
                return None
            return "local"
        if self.forwarders and not any(forwarder.is_worker for forwarder in self.forwarders):
            return "remote"
        return None

    @property
    def duplicated(self) -> bool:
        return self.senders is not None

    def problems(self, key: bytes) -> list[str]:
        """Broken invariants of this record, for the relay's consistency check."""
        name = key.hex()[:8]
        out = []
        if not self.conns and not self.forwarders:
            out.append(f"record for {name} has neither a connection nor a forwarder")
        if len(set(map(id, self.forwarders))) != len(self.forwarders):
            out.append(f"a forwarder of {name} is listed twice")
        if self.active is not None and self.active not in self.conns:
            out.append(f"active connection for {name} is not registered")
        if (len(self.conns) > 1) != (self.senders is not None):
            out.append(f"duplicate state of {name} disagrees with its {len(self.conns)} connections")
        if self.senders is not None and any(p not in self.conns for p in self.senders):
            out.append(f"a sender of {name} is not registered")
        if self.superseded and not self.conns:
            out.append(f"{name} is superseded with no connection here")
        if len(self.conns) == 1 and self.active is not self.conns[0] and not self.superseded:
            out.append(f"the only connection of {name} is not active")
        return out
