"""The TLS transport under DERP connections: encrypt and send in the pass that writes.

Twisted's default (``BufferingTLSTransport``) holds small writes for a ``callLater(0)``
and then queues the ciphertext until the socket reports EPOLLOUT: a relayed packet leaves
two reactor passes and two ``epoll_ctl`` calls after it was routed. The relay already
writes each connection once per pass (``Peer.flush``), so that aggregation buys nothing
here; this transport encrypts at once and hands the records to the socket directly when
nothing is queued before them (``derpbox.sendnow``).
"""

from __future__ import annotations

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ..sendnow import write_now

# What one read of OpenSSL's send buffer takes: several full records at once.
SEND_CHUNK = 1 << 17


class SendNowTLS(TLSMemoryBIOProtocol):
    def _flushSendBIO(self) -> None:
        # Twisted's hook between OpenSSL's output buffer and the transport below.
        try:
            data = self._tlsConnection.bio_read(SEND_CHUNK)
        except WantReadError:
            return  # nothing to send
        write_now(self.transport, data)


def server_tls_factory(options, wrapped_factory) -> TLSMemoryBIOFactory:
    factory = TLSMemoryBIOFactory(options, False, wrapped_factory)
    factory.protocol = SendNowTLS
    return factory
