"""Writing to a Twisted socket transport in the same reactor pass.

``FileDescriptor.write`` only queues: it registers the socket for EPOLLOUT, and the bytes
go out on a later pass, after two ``epoll_ctl`` calls. A socket with nothing queued and
room in its kernel buffer can take them at once, which is the common case for the
workers' internal links (many small ForwardPacket batches, a reader that keeps up).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once if nothing is queued before it."""
    if _idle_socket_transport(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            data = data[sent:]
        # Otherwise (an exception for a lost connection): write() queues, and the loss is
        # reported the usual way.
    transport.write(data)


def _idle_socket_transport(transport) -> bool:
    # Only the socket itself: a TLS transport (a protocol wrapper, which hands attribute
    # lookups to the socket below it) must encrypt first. Then the FileDescriptor's two
    # buffers, bytes being sent and the writes queued after them, must both be empty.
    return (isinstance(transport, FileDescriptor) and transport.connected and not transport.disconnecting
            and not transport._tempDataBuffer and len(transport.dataBuffer) == transport.offset)
