"""RFC 6455 WebSocket framing for DERP-over-WebSocket (spec 2.1), sans-IO.

DERP rides in binary messages whose boundaries mean nothing: the payload of each
complete binary or continuation frame is handed on as a chunk of the DERP byte
stream. The handshake mirrors what derper's WebSocket library does: subprotocol
"derp", any Origin, never any extension (so no compression).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from .upgrade import Headers, HTTPHeadError, RequestHead, header_values, split_head

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "derp"
# A DERP frame of up to 1 MiB plus its header, with a little slack.
DEFAULT_MAX_FRAME_SIZE = (1 << 20) + 64
MAX_CONTROL_PAYLOAD = 125

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_OPCODES = frozenset(Opcode)


class CloseCode(IntEnum):
    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009


class WebSocketError(Exception):
    """The peer broke the protocol: send `encode_close(code, reason)` and drop it."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


@dataclass(frozen=True, slots=True)
class BinaryData:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int | None  # None: the close frame had no body
    reason: str


Event = BinaryData | Ping | Pong | Close


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + GUID).digest()).decode("ascii")


def _tokens(headers: Headers, name: str) -> list[str]:
    return [t.strip().lower() for value in header_values(headers, name) for t in value.split(",")]


def negotiated_subprotocol(head: RequestHead) -> str | None:
    """"derp" if the client offered it, else None: then close with 1008 after the 101."""
    return SUBPROTOCOL if SUBPROTOCOL in _tokens(head.headers, "Sec-WebSocket-Protocol") else None


def accept_response(head: RequestHead) -> bytes:
    """The 101 accepting a WebSocket handshake, or HTTPHeadError (checked in Go's order)."""
    upgrade_hint = (("Upgrade", "websocket"),)
    if head.version == "HTTP/1.0":
        raise HTTPHeadError(426, "WebSocket handshake needs HTTP/1.1", upgrade_hint)
    if "upgrade" not in _tokens(head.headers, "Connection"):
        raise HTTPHeadError(426, "Connection header does not contain Upgrade", upgrade_hint)
    if "websocket" not in _tokens(head.headers, "Upgrade"):
        raise HTTPHeadError(426, "Upgrade header does not contain websocket", upgrade_hint)
    if head.method != "GET":
        raise HTTPHeadError(405, "WebSocket handshake must use GET")
    if head.get("Sec-WebSocket-Version") != "13":
        # RFC 6455 4.4: tell the client which version we speak.
        raise HTTPHeadError(
            400, "unsupported WebSocket version", (("Sec-WebSocket-Version", "13"),)
        )
    key = head.get("Sec-WebSocket-Key") or ""
    try:
        key_ok = len(base64.b64decode(key, validate=True)) == 16
    except (ValueError, binascii.Error):
        key_ok = False
    if not key_ok:
        raise HTTPHeadError(400, "invalid Sec-WebSocket-Key")
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if negotiated_subprotocol(head):
        lines.append(f"Sec-WebSocket-Protocol: {SUBPROTOCOL}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _xor_mask(data: bytes | memoryview, mask: bytes) -> bytes:
    # One big-int XOR instead of a per-byte Python loop: this is the per-packet path.
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _valid_close_code(code: int) -> bool:
    # 1004-1006 and 1015 are reserved and must never appear on the wire.
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte body")
    (code,) = _U16.unpack_from(payload)
    if not _valid_close_code(code):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CloseCode.INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return Close(code, reason)


class WebSocketDecoder:
    """Turns received bytes into events. Server side by default (frames must be masked);
    `client=True` expects the unmasked frames a server sends.

    After a Close event further input is ignored; after a WebSocketError, feed re-raises it.

    One ``feed`` parses at most ``frames_per_feed`` frame headers; when it stops for that,
    ``more`` is true and ``feed(b"")`` goes on where it stopped (the caller's next turn).
    """

    def __init__(self, *, client: bool = False, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 frames_per_feed: int = 0):
        self._expect_masked = not client
        self._max_frame_size = max_frame_size
        self._frames_per_feed = frames_per_feed  # 0: no limit
        self.more = False
        self._buf = bytearray()
        self._in_message = False  # a fragmented binary message awaits continuations
        # Inside a data frame's payload: bytes still to come, its mask (rotated to the next
        # byte), and whether the frame ends its message. The payload is a byte stream to
        # DERP, so it is passed on as it arrives and never held whole.
        self._remaining = 0
        self._mask = b""
        self._fin = True
        self._closed = False
        self._error: WebSocketError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise self._error
        if self._closed:
            return []
        self._buf += data
        events: list[Event] = []
        try:
            consumed = self._parse(events)
        except WebSocketError as e:
            self._error = e
            self._buf.clear()
            raise
        del self._buf[:consumed]
        return events

    def _parse(self, events: list[Event]) -> int:
        buf = self._buf
        pos = 0
        budget = self._frames_per_feed or -1
        self.more = False
        while not self._closed:
            if self._remaining:
                pos = self._payload(buf, pos, events)
                if self._remaining:
                    break
                continue
            if len(buf) - pos < 2:
                break
            if not budget:
                self.more = True
                break
            budget -= 1
            b0, b1 = buf[pos], buf[pos + 1]
            # Judge the header from its first two bytes, before buffering anything more.
            self._check_header(b0, b1)
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if len(buf) < start + 2:
                    break
                (length,) = _U16.unpack_from(buf, start)
                start += 2
            elif length == 127:
                if len(buf) < start + 8:
                    break
                (length,) = _U64.unpack_from(buf, start)
                start += 8
                if length >> 63:
                    raise WebSocketError(CloseCode.PROTOCOL_ERROR, "64-bit length has its top bit set")
            if length > self._max_frame_size:
                raise WebSocketError(CloseCode.MESSAGE_TOO_BIG, "frame too large")
            masked = b1 & 0x80
            if len(buf) < start + (4 if masked else 0):
                break
            mask = bytes(buf[start : start + 4]) if masked else b""
            if masked:
                start += 4
            if b0 & 0x0F in (Opcode.BINARY, Opcode.CONTINUATION):
                # A data frame: its payload streams through, whatever its size.
                self._in_message = True
                self._remaining, self._mask, self._fin = length, mask, bool(b0 & 0x80)
                pos = start
                if not length:
                    self._in_message = not self._fin
                continue
            end = start + length  # a control frame: at most 125 bytes, taken whole
            if len(buf) < end:
                break
            # Slices of a memoryview die here, so the bytearray can be resized afterwards.
            payload = _xor_mask(memoryview(buf)[start:end], mask) if masked else bytes(memoryview(buf)[start:end])
            pos = end
            self._dispatch(b0, payload, events)
        return pos

    def _payload(self, buf: bytearray, pos: int, events: list[Event]) -> int:
        """Pass on what has arrived of the current data frame's payload; the new position."""
        n = min(self._remaining, len(buf) - pos)
        if n:
            chunk = memoryview(buf)[pos : pos + n]
            mask = self._mask
            events.append(BinaryData(_xor_mask(chunk, mask) if mask else bytes(chunk)))
            chunk.release()
            if mask:
                shift = n % 4
                self._mask = mask[shift:] + mask[:shift]
            self._remaining -= n
            if not self._remaining:
                self._in_message = not self._fin
        return pos + n

    def _check_header(self, b0: int, b1: int) -> None:
        if b0 & 0x70:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        opcode = b0 & 0x0F
        if opcode == Opcode.TEXT:
            raise WebSocketError(CloseCode.UNSUPPORTED_DATA, "text messages are not supported")
        if opcode not in _OPCODES:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode >= Opcode.CLOSE:
            if not (b0 & 0x80):
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if (b1 & 0x7F) > MAX_CONTROL_PAYLOAD:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "control frame too long")
        elif opcode == Opcode.CONTINUATION and not self._in_message:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "continuation frame outside a message")
        elif opcode == Opcode.BINARY and self._in_message:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "new message before the last one ended")
        if bool(b1 & 0x80) != self._expect_masked:
            side = "client frame not masked" if self._expect_masked else "server frame masked"
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, side)

    def _dispatch(self, b0: int, payload: bytes, events: list[Event]) -> None:
        opcode = b0 & 0x0F
        if opcode == Opcode.PING:
            events.append(Ping(payload))
        elif opcode == Opcode.PONG:
            events.append(Pong(payload))
        elif opcode == Opcode.CLOSE:
            events.append(_parse_close(payload))
            self._closed = True


def encode_frame(opcode: Opcode, payload: bytes = b"", *, fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """One frame; `mask` (4 bytes) for client-to-server frames, None for server frames."""
    if opcode >= Opcode.CLOSE and (len(payload) > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames carry at most 125 bytes and cannot be fragmented")
    b0 = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        header = bytes((b0, mask_bit | n))
    elif n < 1 << 16:
        header = bytes((b0, mask_bit | 126)) + _U16.pack(n)
    else:
        header = bytes((b0, mask_bit | 127)) + _U64.pack(n)
    if mask is None:
        return header + payload
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    return header + mask + _xor_mask(payload, mask)


def encode_binary(payload: bytes) -> bytes:
    return encode_frame(Opcode.BINARY, payload)


def encode_pong(payload: bytes = b"") -> bytes:
    return encode_frame(Opcode.PONG, payload)


def encode_close(code: int | None = CloseCode.NORMAL, reason: str = "") -> bytes:
    """A close frame; code None sends an empty body (the reply to a bodiless close)."""
    if code is None:
        return encode_frame(Opcode.CLOSE)
    return encode_frame(Opcode.CLOSE, _U16.pack(code) + reason.encode("utf-8"))


# Client side: the project's DERP client and the tests.


def new_client_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def client_handshake_request(host: str, path: str = "/derp", *, key: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        "\r\n"
    ).encode("latin-1")


def check_client_handshake_response(buf: bytes | bytearray, key: str) -> int | None:
    """Validate the server's handshake answer at the start of `buf`.

    Returns the head length (frames may follow it in `buf`), None while incomplete;
    raises WebSocketError(1002) if the server did not accept as RFC 6455 4.1 requires.
    """
    try:
        split = split_head(buf)
    except HTTPHeadError as e:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"bad handshake response: {e}") from None
    if split is None:
        return None
    status_line, headers, head_length = split
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/1.") or rest.partition(b" ")[0] != b"101":
        raise WebSocketError(
            CloseCode.PROTOCOL_ERROR,
            f"server refused the upgrade: {status_line.decode('latin-1')}",
        )
    if "websocket" not in _tokens(headers, "Upgrade"):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "response Upgrade is not websocket")
    if "upgrade" not in _tokens(headers, "Connection"):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "response Connection lacks Upgrade")
    if header_values(headers, "Sec-WebSocket-Accept") != [accept_key(key)]:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "wrong Sec-WebSocket-Accept")
    if header_values(headers, "Sec-WebSocket-Protocol") != [SUBPROTOCOL]:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "server did not select the derp subprotocol")
    if header_values(headers, "Sec-WebSocket-Extensions"):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "server enabled an extension we never offered")
    return head_length


def encode_masked_binary(payload: bytes, mask: bytes | None = None) -> bytes:
    """A client binary frame; a fresh random mask unless one is given (tests)."""
    return encode_frame(Opcode.BINARY, payload, mask=os.urandom(4) if mask is None else mask)
