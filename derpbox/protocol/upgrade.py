"""The HTTP/1.x request head in front of a DERP connection, and the answers to it.

Sans-IO: feed the bytes received so far to `parse_request_head` until it returns a
`RequestHead`; everything from `head_length` on is already the DERP (or WebSocket)
stream (spec 2.1: a fast-start client sends ClientInfo in the same write).

Line endings follow Go's net/textproto, which derper uses: a line ends at LF and
one CR before it is dropped, so bare-LF heads are accepted. Unlike Go, obs-fold
continuation lines are refused with 400 (RFC 9112 5.2 allows either; no DERP
client folds). A bare CR anywhere else is an invalid byte and also gets 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from .frames import KEY_LEN, PROTOCOL_VERSION

MAX_HEAD = 16 * 1024

Headers = tuple[tuple[str, str], ...]

_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 field-content: HTAB, SP, VCHAR and obs-text; every other control byte is refused.
_VALUE_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_TARGET_BYTES = bytes(range(0x21, 0x7F))


class HTTPHeadError(Exception):
    """A request head we refuse; answer with `error_response(status, reason, headers)`."""

    def __init__(self, status: int, reason: str, headers: Headers = ()):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def header_values(headers: Headers, name: str) -> list[str]:
    """All values of header `name` (case-insensitive), in the order received."""
    name = name.lower()
    return [value for key, value in headers if key.lower() == name]


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: Headers
    head_length: int

    def get(self, name: str) -> str | None:
        """First value of header `name`, like Go's Header.Get."""
        values = header_values(self.headers, name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return header_values(self.headers, name)


def split_head(buf: bytes | bytearray) -> tuple[bytes, Headers, int] | None:
    """Split an HTTP/1.x message head at the start of `buf`.

    Returns (start line, headers, head length) or None while incomplete. The start
    line is not validated here; header lines are.
    """
    end = _find_blank_line(buf)
    if end is None:
        # Refuse as soon as the head cannot fit any more, so nobody makes us buffer forever.
        if len(buf) >= MAX_HEAD:
            raise HTTPHeadError(431, "header fields too large")
        return None
    content_end, head_length = end
    lines = bytes(buf[:content_end]).split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return lines[0], tuple(_parse_field(line) for line in lines[1:]), head_length


def _find_blank_line(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(end of the content before the first blank line, end of that blank line), within MAX_HEAD."""
    for blank in (b"\n", b"\r\n"):
        if buf.startswith(blank):
            return 0, len(blank)
    # bytes.find, not a regex: callers re-parse on every read, so the scan must be cheap.
    found = [
        (i, i + len(sep)) for sep in (b"\n\n", b"\n\r\n") if (i := buf.find(sep, 0, MAX_HEAD)) != -1
    ]
    return min(found, default=None)


def _parse_field(line: bytes) -> tuple[str, str]:
    if line.startswith((b" ", b"\t")):
        raise HTTPHeadError(400, "obsolete line folding is not accepted")
    name, colon, value = line.partition(b":")
    if not colon:
        raise HTTPHeadError(400, "malformed header line")
    if not name or name.translate(None, _TOKEN):
        raise HTTPHeadError(400, "invalid header name")
    value = value.strip(b" \t")
    if value.translate(None, _VALUE_BYTES):
        raise HTTPHeadError(400, "invalid header value")
    return name.decode("ascii"), value.decode("latin-1")


def parse_request_head(buf: bytes | bytearray) -> RequestHead | None:
    """Parse the request head at the start of `buf`; None while it is incomplete.

    Raises only HTTPHeadError: 400 malformed, 431 longer than MAX_HEAD, 505 not HTTP/1.x.
    """
    split = split_head(buf)
    if split is None:
        return None
    line, headers, head_length = split
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPHeadError(400, "malformed request line")
    method, target, version = parts
    version_match = _VERSION.fullmatch(version)
    if version_match is None:
        raise HTTPHeadError(400, "malformed HTTP version")
    if not method or method.translate(None, _TOKEN):
        raise HTTPHeadError(400, "invalid method")
    if not target or target.translate(None, _TARGET_BYTES):
        raise HTTPHeadError(400, "invalid request target")
    if version_match[1] != b"1":
        raise HTTPHeadError(505, "unsupported protocol version")
    target_str = target.decode("ascii")
    path, _, query = target_str.partition("?")
    return RequestHead(
        method=method.decode("ascii"),
        target=target_str,
        path=path,
        query=query,
        version=version.decode("ascii"),
        headers=headers,
        head_length=head_length,
    )


def classify_derp_request(head: RequestHead) -> str:
    """"websocket", "derp" (raw DERP after the upgrade) or "none" (answer 426)."""
    if head.path != "/derp":
        return "none"
    upgrade = (head.get("Upgrade") or "").lower()
    if upgrade == "websocket" and "derp" in (head.get("Sec-WebSocket-Protocol") or ""):
        return "websocket"
    # Very old clients said "websocket" but spoke raw DERP framing after the 101.
    if upgrade in ("derp", "websocket"):
        return "derp"
    return "none"


def is_fast_start(head: RequestHead) -> bool:
    """True if the client wants no 101 and sends DERP frames straight away."""
    return head.get("Derp-Fast-Start") == "1"


def ideal_node(head: RequestHead) -> str | None:
    return head.get("Ideal-Node") or None


def derp_switching_response(server_public_key: bytes) -> bytes:
    """The hand-written 101 derper sends when the client did not ask for fast start."""
    if len(server_public_key) != KEY_LEN:
        raise ValueError(f"server public key must be {KEY_LEN} bytes")
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: %d\r\n"
        b"Derp-Public-Key: %s\r\n"
        b"\r\n"
    ) % (PROTOCOL_VERSION, server_public_key.hex().encode("ascii"))


def _plain_response(status: int, body: str, headers: Headers = ()) -> bytes:
    # Mirrors Go's http.Error, plus an explicit length and close.
    payload = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in headers),
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def upgrade_required_response() -> bytes:
    return _plain_response(426, "DERP requires connection upgrade\n")


def error_response(status: int, reason: str, headers: Headers = ()) -> bytes:
    """The answer to an HTTPHeadError (pass its status, reason and headers)."""
    return _plain_response(status, f"{status} {HTTPStatus(status).phrase}: {reason}\n", headers)


# Client side: the request a DERP client sends, and the server's answer.


def upgrade_request(host_header: str, path: str = "/derp", *, user_agent: str, fast_start: bool = False,
                    headers: dict[str, str] | None = None) -> bytes:
    """The HTTP request that asks the server to switch the connection to DERP (spec 2.1)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {user_agent}",
             "Connection: Upgrade", "Upgrade: DERP"]
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response_status(head: bytes) -> tuple[int, str]:
    """(status, reason) of a response head; ValueError for anything but an HTTP status line."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {line[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""
