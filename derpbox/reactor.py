"""The reactor derpbox serves with: Twisted's epoll reactor, minus one wrapper per event.

Twisted calls each ready descriptor's doRead/doWrite inside ``log.callWithLogger``, which
asks the descriptor for its log prefix and pushes it as the "system" of Twisted's legacy
log API for the length of the call: about 1.4 us per event, more than a tenth of relaying
one packet at a moderate rate, where every packet is an event of its own. derpbox logs
with ``twisted.logger``, whose events carry their namespace; only Twisted's own legacy
messages from inside a read (an unhandled exception's traceback) lose the connection's
prefix, and keep everything else.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor


class RelayReactor(EPollReactor):
    def doPoll(self, timeout):
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            # Gone already: an earlier event of this pass closed it.
            if selectable is not None:
                handle(selectable, fd, event)

    doIteration = doPoll


def install_relay_reactor():
    """Install RelayReactor as Twisted's global reactor and return it; if a reactor is
    installed already, return that one."""
    installed = sys.modules.get("twisted.internet.reactor")
    if installed is not None:
        return installed
    from twisted.internet.main import installReactor

    reactor = RelayReactor()
    installReactor(reactor)
    return reactor
