"""A receiver that keeps up is written what the kernel takes in one pass (issue 13 point 4):
Twisted sends at most 128 KiB per call by default, which let a busy reactor fall behind a
healthy receiver, pause it, and drop its packets."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.web.connection import tcp_transport
from derpbox.web.transports import SEND_LIMIT, TRANSPORT_BUFFER

from .support import wait_for

TWISTED_SEND_LIMIT = 128 * 1024


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.inlineCallbacks
def test_one_send_takes_more_than_twisteds_128_kib(start_server, tls):
    assert SEND_LIMIT > TRANSPORT_BUFFER * 2
    server = yield start_server(tls=tls)
    client = yield deferToThread(DERPClient.connect, server.url)
    try:
        yield wait_for(lambda: server.stats.current_connections == 1)
        [front] = server.service.front.open_connections
        tcp = tcp_transport(front.transport)
        assert tcp.SEND_LIMIT == SEND_LIMIT and tcp.bufferSize == TRANSPORT_BUFFER
        # Room for well over 128 KiB in the kernel (the system caps it at twice wmem_max).
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        room = tcp.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert room > 2 * TWISTED_SEND_LIMIT
        # The call both write_now and Twisted's doWrite make; its bytes only fill the socket
        # here (the client is closed unread).
        sent = tcp.writeSomeData(bytes(room))
        assert sent > TWISTED_SEND_LIMIT
    finally:
        client.close()
