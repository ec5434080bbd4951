"""The TLS transport under DERP connections: encrypt and send in the pass that writes,
and hand over what one socket read decrypted in one piece.

Twisted's default (``BufferingTLSTransport``) holds small writes for a ``callLater(0)``
and then queues the ciphertext until the socket reports EPOLLOUT: a relayed packet leaves
two reactor passes and two ``epoll_ctl`` calls after it was routed. The relay already
writes each connection once per pass (``Peer.flush``), so that aggregation buys nothing
here; this transport encrypts at once and hands the records to the socket directly when
nothing is queued before them (``derpbox.sendnow``).

On the way in, Twisted calls the protocol once per TLS record, and Go's client seals one
record per packet: the relay would parse, route and flush once per packet. Here the
records that one socket read brought are decrypted first and delivered together, at
most ``RECORDS_PER_PASS`` of them in one reactor pass: a client sending 1-byte records
gets its socket paused and the rest decrypted in the next pass, after everyone else.

Records go in and out through ``derpbox.tls.binding``, which calls OpenSSL without
pyOpenSSL's per-call costs (more than the cipher's for one packet per record).
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ..sendnow import write_now
from .binding import RENEWABLE, read_ciphertext, read_plaintext, renew_bios, write_ciphertext, write_plaintext

# Plaintext sealed between two sends to the socket, as Twisted does: one full record. Also
# what OpenSSL's output buffer grows to, for as long as the connection lives.
SEAL_CHUNK = 1 << 14
# Records decrypted for one connection per reactor pass. One socket read (64 KiB,
# derpbox.web.transports.READ_SIZE) holds about 50 records of real packets, and about
# 3,000 of 1-byte records (about 1.5 us of CPU each); what the TLS layer buffered from
# earlier reads comes on top.
RECORDS_PER_PASS = 256


class SendNowTLS(TLSMemoryBIOProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every attribute set here, including Twisted's that it sets later, so that the
        # object keeps its compact attribute array (see derpbox.web.transports).
        self._producer = None
        self._handshakeDone = False
        # Reading the socket stops for either of two reasons: the application asked (flow
        # control, admission, a rate limit) or this connection spent its records for the pass.
        self._app_paused = False
        self._budget_call = None
        # Whether the handshake's memory BIOs were swapped for fresh ones (derpbox.tls.binding).
        self._bios_renewed = not RENEWABLE

    def pauseProducing(self) -> None:
        """The application's read pause (Twisted would pass it straight to the socket)."""
        self._app_paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._app_paused = False
        if self._budget_call is None:
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone:
            super().dataReceived(data)
            return
        # Twisted's, after the handshake, with the bytes handed to OpenSSL directly.
        write_ciphertext(self._tlsConnection, data)
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop over SSL_read, delivering once at the end instead of per record;
        # its handling of a TLS shutdown and of errors is kept, after what came before them.
        chunks: list[bytes] = []
        conn = self._tlsConnection
        while not self._lostTLSConnection:
            if len(chunks) == RECORDS_PER_PASS:
                self._next_pass()
                break
            try:
                plaintext = read_plaintext(conn)
            except ZeroReturnError:
                self._deliver(chunks)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(chunks)
                self._tlsShutdownFinished(Failure())
            else:
                if plaintext is None:
                    break
                chunks.append(plaintext)
        self._deliver(chunks)
        self._flushSendBIO()

    def _next_pass(self) -> None:
        """Decrypt the rest in the next reactor pass, with the socket paused meanwhile."""
        if self._budget_call is None:
            self.transport.pauseProducing()
            self._budget_call = self.factory.clock.callLater(0, self._budget_renewed)

    def _budget_renewed(self) -> None:
        self._budget_call = None
        if self._lostTLSConnection or self._aborted:
            return
        self._flushReceiveBIO()
        if self._budget_call is None and not self._app_paused:
            self.transport.resumeProducing()

    def connectionLost(self, reason) -> None:
        if self._budget_call is not None and self._budget_call.active():
            self._budget_call.cancel()
        self._budget_call = None
        super().connectionLost(reason)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            ProtocolWrapper.dataReceived(self, data)

    def _write(self, data) -> None:
        # Twisted's: seal a record's worth, send it, repeat; through derpbox.tls.binding,
        # and over a memoryview rather than slices copied out of the data.
        if self._lostTLSConnection:
            return
        conn = self._tlsConnection
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += write_plaintext(conn, view[done:done + SEAL_CHUNK])
            except WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                # As Twisted: the connection is lost, with the error as the reason.
                self._tlsShutdownFinished(Failure())
                break
            self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        # Twisted's hook between OpenSSL's output buffer and the transport below.
        data = read_ciphertext(self._tlsConnection)
        if data:
            write_now(self.transport, data)
        if not self._bios_renewed and self._handshakeDone and not self._lostTLSConnection:
            # Once the handshake is over and both BIOs are empty (renew_bios checks), give
            # back what the handshake made them grow to.
            self._bios_renewed = renew_bios(self._tlsConnection)


def server_tls_factory(options, wrapped_factory, clock) -> TLSMemoryBIOFactory:
    factory = TLSMemoryBIOFactory(options, False, wrapped_factory, clock)
    factory.protocol = SendNowTLS
    # Schedules a connection's next pass when it spent its records for this one.
    factory.clock = clock
    return factory
