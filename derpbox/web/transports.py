"""The socket transports under relay connections: Twisted's, with derpbox's buffer limits.

Every listener's port makes its connections with these classes (``relay_transports``).
"""

from __future__ import annotations

from errno import ENOBUFS, EWOULDBLOCK

from twisted.internet import main, tcp, unix

# What one recv() takes: about 50 packets. Twisted reads bufferSize, which is also where
# it pauses the producer; at 256 KiB one read could carry 200 packets for one receiver,
# and one client's burst made one long reactor pass.
READ_SIZE = 64 << 10
# Twisted pauses a producer once this many bytes wait in user space, before it has even
# tried the socket; one read can relay a whole READ_SIZE to a single receiver, and more
# than that may be waiting already, so the default (64 KiB) would pause (and drop) on a
# healthy connection.
TRANSPORT_BUFFER = 256 << 10
# What one send() may take (Twisted: 128 KiB, also for a write that finds the socket idle).
# Above what one read can relay to one receiver plus what waits already, so a receiver that
# keeps up gets a pass's packets in that pass and never falls behind because the reactor
# is busy with others (issue: healthy receivers paused by other clients' load).
SEND_LIMIT = 4 << 20


class _RelayTransport:
    bufferSize = TRANSPORT_BUFFER
    SEND_LIMIT = SEND_LIMIT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # CPython keeps an object's attributes in a compact array whose names its class
        # shares, but only names its first few dozen objects set; a name first set later
        # turns that object's attributes into a dict of its own (0.8 KiB here). Twisted
        # sets these at registerProducer or the first buffered write, which a server's
        # first connections (health checks, probes) often never reach.
        self.producer = None
        self.streamingProducer = False
        self.producerPaused = False
        self.dataBuffer = b""
        self.offset = 0

    def doRead(self):
        # Twisted's tcp.Connection.doRead, reading READ_SIZE rather than bufferSize. Also a
        # unix link's: plain recv(), not the recvmsg() Twisted's unix transport uses for
        # passing descriptors (1.5 us more per read), which a worker's link never does.
        try:
            data = self.socket.recv(READ_SIZE)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return self._dataReceived(data)

    def writeSomeData(self, data):
        # Twisted's tcp.Connection.writeSomeData without its per-call wrappers: a memoryview
        # slice even of data that fits, and a retry loop for EINTR, which Python retries by
        # itself (PEP 475). 0.5 us less per send(), and every relayed write is one.
        try:
            return self.socket.send(data if len(data) <= SEND_LIMIT else memoryview(data)[:SEND_LIMIT])
        except OSError as e:
            if e.args[0] in (EWOULDBLOCK, ENOBUFS):
                return 0
            return main.CONNECTION_LOST


class RelayTCPServer(_RelayTransport, tcp.Server):
    pass


class RelayUNIXServer(_RelayTransport, unix.Server):
    """A worker's internal mesh link (derpbox.workers), which never passes descriptors:
    plain send() and recv(), not the sendmsg()/recvmsg() of Twisted's unix transport."""


_RELAY_CLASSES = {tcp.Server: RelayTCPServer, unix.Server: RelayUNIXServer}


def relay_transports(port) -> None:
    """Make ``port``'s future connections with the relay transport classes."""
    port.transport = _RELAY_CLASSES.get(port.transport, port.transport)
