"""Small HTTP-client helpers shared by the tailscaled and URL backends."""

from __future__ import annotations

import os

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import error as web_error
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesBody:
    """A request body known up front (sent with Content-Length, like Go's bytes.Reader)."""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class BodyTooLong(Exception):
    """The response body went past the reader's limit."""


class _LimitedReader(Protocol):
    """Collects a response body up to ``limit`` bytes, then stops the transfer.

    ``done`` fires with (bytes, None) when the body ended normally or hit the
    limit (the bytes are then exactly ``limit`` long and the connection is
    dropped), or with (bytes so far, Failure) when the transfer broke.
    """

    def __init__(self, limit: int, done: defer.Deferred, complete=None, clock=None):
        self.limit = limit
        self.done = done
        self.complete = complete
        # With a clock, a body whose value is whole may still end in this reactor pass, so
        # its connection can be kept; it is cut only if it has not ended by the next.
        self.clock = clock
        self.buf = bytearray()
        self.finished = False
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.buf += data
        if len(self.buf) >= self.limit:
            self._finish(None, truncate=True)
            # Stop reading: nothing past the limit matters, and the peer may be endless.
            self.transport.stopProducing()
        elif self.complete is not None and self.complete(self.buf):
            # Like Go's json.Decoder: once the value is whole, the rest is not awaited.
            self._finish(None)
            if self.clock is None:
                self.transport.stopProducing()
            else:
                self.clock.callLater(0, self._stop_unless_ended)

    def _stop_unless_ended(self) -> None:
        if not self.ended:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if self.limit <= 0:
            self._finish(None)
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        self.ended = True
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._finish(None)
        else:
            self._finish(reason)

    def stop(self, reason: Failure) -> None:
        """Give up (timeout): report what arrived so far, with ``reason``."""
        if not self.finished:
            self._finish(reason)
            if self.transport is not None:
                self.transport.stopProducing()

    def _finish(self, failure: Failure | None, truncate: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        data = bytes(self.buf[: self.limit]) if truncate else bytes(self.buf)
        self.done.callback((data, failure))


def read_limited(response, limit: int, complete=None, clock=None) -> tuple[_LimitedReader, defer.Deferred]:
    """Start reading ``response``'s body; see _LimitedReader for the result.

    ``complete(buffer)``, if given, may end the read early by returning True; with
    ``clock``, a body that ends in the same pass leaves its connection reusable.
    """
    # Cancelling (the deadline) stops the transfer and reports what arrived so far.
    done: defer.Deferred = defer.Deferred(lambda d: reader.stop(Failure(defer.CancelledError("body read timed out"))))
    reader = _LimitedReader(limit, done, complete, clock)
    response.deliverBody(reader)
    return reader, done


def _unwrap(failure: Failure) -> Failure:
    """The first underlying reason of Twisted's aggregate HTTP client errors."""
    seen = 0
    while seen < 5 and isinstance(failure.value, ResponseFailed) and getattr(failure.value, "reasons", None):
        failure = failure.value.reasons[0]
        seen += 1
    return failure


def describe_failure(failure: Failure) -> str:
    """A short operator-facing description of why a request failed."""
    f = _unwrap(failure)
    value = f.value
    if f.check(error.ConnectionRefusedError):
        return "connection refused"
    if f.check(error.DNSLookupError):
        return "DNS lookup failed"
    if f.check(error.TimeoutError):
        return "connect timed out"
    if f.check(error.NoRouteError):
        return "no route to host"
    if f.check(web_error.SchemeNotSupported):
        return f"unsupported URL scheme ({value})"
    try:
        from OpenSSL import SSL

        if isinstance(value, SSL.Error):
            return "TLS error: " + _ssl_text(value)
    except ImportError:  # pragma: no cover - pyOpenSSL is a dependency
        pass
    try:
        from service_identity import VerificationError

        if isinstance(value, VerificationError):
            return "TLS certificate does not match the host name"
    except ImportError:  # pragma: no cover
        pass
    if f.check(error.ConnectionDone, error.ConnectionLost):
        return "connection closed before a response"
    if f.check(defer.CancelledError):
        return "cancelled"
    if f.check(error.ConnectError):
        os_error = value.osError
        text = os.strerror(os_error).lower() if isinstance(os_error, int) else (os_error or str(value))
        return f"cannot connect: {text}"
    text = f.getErrorMessage()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def _ssl_text(value) -> str:
    """OpenSSL's error queue as one line, e.g. 'certificate verify failed'."""
    try:
        parts = [entry[2] for entry in value.args[0] if len(entry) > 2 and entry[2]]
    except (IndexError, TypeError):
        parts = []
    return ", ".join(parts) or str(value) or "handshake failed"


class Deadline:
    """One overall time limit across several awaited steps (connect, headers, body, redirects).

    ``wait(d)`` arranges for ``d`` to be cancelled when the time runs out;
    ``expired`` then tells a timeout apart from other failures.
    """

    def __init__(self, reactor, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._current: defer.Deferred | None = None
        self._call = reactor.callLater(seconds, self._expire)

    def wait(self, d: defer.Deferred) -> defer.Deferred:
        if self.expired:
            d.cancel()
            return d
        self._current = d
        d.addBoth(self._clear, d)
        return d

    def _clear(self, result, d):
        if self._current is d:
            self._current = None
        return result

    def _expire(self) -> None:
        self.expired = True
        if self._current is not None:
            self._current.cancel()

    def done(self) -> None:
        if self._call.active():
            self._call.cancel()


def seconds_text(seconds: float) -> str:
    return f"{seconds:g} s"
