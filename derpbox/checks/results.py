"""A check's outcome: its Result, the CheckFailed a check raises, and error texts."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from OpenSSL import SSL

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_LABEL = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}


@dataclass
class Result:
    name: str
    status: str
    detail: str
    diagnosis: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{_LABEL[self.status]} {self.name}: {self.detail}"

    def as_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "diagnosis": list(self.diagnosis), "data": self.data}


class CheckFailed(Exception):
    """A check's failure: message, and optional diagnosis lines."""

    def __init__(self, message: str, *diagnosis: str, status: str = FAIL, data: dict | None = None):
        super().__init__(message)
        self.diagnosis = [d for d in diagnosis if d]
        self.status = status
        self.data = data or {}


def describe_error(e: BaseException) -> str:
    """A short text for a network step's exception."""
    if isinstance(e, socket.timeout | TimeoutError):
        return f"timed out ({e})" if str(e) else "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, SSL.Error):
        return f"TLS error: {_ssl_error_text(e)}"
    return str(e) or type(e).__name__


def _ssl_error_text(e: SSL.Error) -> str:
    try:
        parts = [p[2] for p in e.args[0] if len(p) >= 3]
        if parts:
            return "; ".join(parts)
    except (IndexError, TypeError):
        pass
    return str(e) or type(e).__name__
