"""DERP framing: frame types, header codec, payload layouts and their bounds.

A frame is one type byte, a big-endian uint32 payload length, then the payload.
Everything here is pure bytes in, bytes out (spec sections 1.1, 1.2, 1.5).
"""

from __future__ import annotations

import struct
from enum import IntEnum

MAGIC = b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
HEADER_LEN = 5
KEY_LEN = 32
NONCE_LEN = 24
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
CLIENT_INFO_MIN = KEY_LEN + NONCE_LEN
CLIENT_INFO_MAX = 256 << 10
PING_MIN, PING_MAX = 8, 1000
# Go clients refuse received frames longer than this; we never send one.
CLIENT_MAX_RECV_FRAME = 1 << 20

DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01


class PeerPresentFlags(IntEnum):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


# derpbox's own PeerPresent flag, sent only between the workers of one node: the connection
# was there before the link came up (the WatchConns dump), so it is not known to be newer.
PRESENT_BEFORE_LINK = 0x80


class FrameError(ValueError):
    """A frame violates the protocol; the connection that sent it must close."""


_header = struct.Struct(">BI")
pack_header = _header.pack
unpack_header_from = _header.unpack_from
# A RecvPacket frame's header and source key: the relay packs it once per delivered packet.
RECV_HEADER = struct.Struct(">BI32s")

# Inclusive (min, max) payload lengths the server accepts from a client, spec 1.5.
# Types absent here are read and discarded whatever their length.
CLIENT_FRAME_BOUNDS: dict[int, tuple[int, int]] = {
    FrameType.CLIENT_INFO: (CLIENT_INFO_MIN, CLIENT_INFO_MAX),
    FrameType.SEND_PACKET: (KEY_LEN, KEY_LEN + MAX_PACKET_SIZE),
    FrameType.FORWARD_PACKET: (2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE),
    FrameType.NOTE_PREFERRED: (1, 1),
    FrameType.PING: (PING_MIN, PING_MAX),
    FrameType.WATCH_CONNS: (0, 0),
    FrameType.CLOSE_PEER: (KEY_LEN, KEY_LEN),
}

# Bounds a client applies to what a server sends (the package client uses them).
SERVER_FRAME_BOUNDS: dict[int, tuple[int, int]] = {
    FrameType.SERVER_KEY: (len(MAGIC) + KEY_LEN, 1 << 10),
    FrameType.SERVER_INFO: (NONCE_LEN, NONCE_LEN + MAX_INFO_LEN),
    FrameType.RECV_PACKET: (KEY_LEN, KEY_LEN + MAX_PACKET_SIZE),
    FrameType.PEER_GONE: (KEY_LEN, KEY_LEN + 1),
    FrameType.PEER_PRESENT: (KEY_LEN, 1 << 10),
    FrameType.PING: (PING_MIN, PING_MIN),
    FrameType.PONG: (PING_MIN, PING_MIN),
    FrameType.HEALTH: (0, CLIENT_MAX_RECV_FRAME),
    FrameType.RESTARTING: (8, 8),
    FrameType.KEEP_ALIVE: (0, 0),
}


def frame_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"unknown(0x{ftype:02x})"


class FrameReader:
    """Splits a byte stream into frames.

    ``feed`` returns complete frames as ``(type, payload)`` pairs, where payload is
    a memoryview valid until the next call. Lengths are checked against ``bounds``
    as soon as a header arrives, so an oversize frame is refused before any of it
    is buffered. Frames of types not in ``bounds`` are skipped without buffering.

    One call returns at most ``limit`` frames (a caller's work for one turn); the rest
    stays buffered, ``more`` says so, and ``feed(b"")`` goes on. A frame that arrives
    in many small pieces is collected in place, not copied again with every piece.
    """

    __slots__ = ("bounds", "more", "_pending", "_need", "_skip")

    def __init__(self, bounds: dict[int, tuple[int, int]]):
        self.bounds = bounds
        self.more = False
        self._pending = bytearray()
        # How many bytes _pending must hold before parsing can make progress.
        self._need = 0
        self._skip = 0

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def hold(self, data: bytes) -> None:
        """Buffer ``data`` behind what is pending, without parsing (the caller is not ready)."""
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        self._pending += data
        self.more = True

    def unread(self, frames) -> None:
        """Put frames this reader returned back in front of what is pending."""
        self._pending[:0] = b"".join(pack_header(ftype, len(payload)) + payload for ftype, payload in frames)
        self._need = 0
        self.more = True

    def feed(self, data: bytes, limit: int = 1 << 30) -> list[tuple[int, memoryview]]:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
        pending = self._pending
        if pending:
            if len(pending) + len(data) < self._need:
                pending += data  # still short of the frame it waits for: no parse, no copy of the rest
                return []
            pending += data
            data = bytes(pending)
            pending.clear()
        self.more = False
        view = memoryview(data)
        end = len(data)
        off = 0
        frames = []
        bounds = self.bounds
        need = HEADER_LEN
        while end - off >= HEADER_LEN:
            if len(frames) == limit:
                self.more = True
                break
            ftype, length = unpack_header_from(data, off)
            limits = bounds.get(ftype)
            body = off + HEADER_LEN
            if limits is None:
                if body + length > end:
                    self._skip = body + length - end
                    off = end
                    break
                off = body + length
                continue
            if not limits[0] <= length <= limits[1]:
                raise FrameError(
                    f"{frame_name(ftype)} frame length {length} outside [{limits[0]}, {limits[1]}]"
                )
            if body + length > end:
                need = body + length - off
                break
            off = body + length
            frames.append((ftype, view[body:off]))
        self._need = need
        if off < end:
            pending += view[off:]
        return frames


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    return pack_header(ftype, len(payload)) + payload


def server_key_frame(server_public: bytes) -> bytes:
    return encode_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def send_packet_frame(dst: bytes, packet: bytes) -> bytes:
    return pack_header(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def forward_packet_frame(src: bytes, dst: bytes, packet: bytes) -> bytes:
    return pack_header(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


KEEP_ALIVE_FRAME = pack_header(FrameType.KEEP_ALIVE, 0)
WATCH_CONNS_FRAME = pack_header(FrameType.WATCH_CONNS, 0)


def note_preferred_frame(preferred: bool) -> bytes:
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def peer_gone_frame(key: bytes, reason: int) -> bytes:
    return encode_frame(FrameType.PEER_GONE, key + bytes((reason,)))


def peer_present_frame(key: bytes, ip16: bytes, port: int, flags: int) -> bytes:
    return encode_frame(FrameType.PEER_PRESENT, key + ip16 + struct.pack(">HB", port, flags))


def close_peer_frame(key: bytes) -> bytes:
    return encode_frame(FrameType.CLOSE_PEER, key)


def ping_frame(data: bytes) -> bytes:
    return encode_frame(FrameType.PING, data)


def pong_frame(data: bytes) -> bytes:
    return encode_frame(FrameType.PONG, data)


def health_frame(problem: str) -> bytes:
    return encode_frame(FrameType.HEALTH, problem.encode())


def restarting_frame(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return encode_frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))


def parse_restarting(payload: bytes) -> tuple[int, int]:
    return struct.unpack(">II", payload[:8])


def parse_peer_gone(payload: bytes) -> tuple[bytes, int]:
    """Key and reason; old servers sent the key only, meaning Disconnected."""
    key = bytes(payload[:KEY_LEN])
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return key, reason


def parse_peer_present(payload: bytes) -> tuple[bytes, bytes | None, int | None, int | None]:
    """Key, then 16-byte IP, port and flags when present (spec 1.2)."""
    key = bytes(payload[:KEY_LEN])
    rest = payload[KEY_LEN:]
    if len(rest) < 18:
        return key, None, None, None
    ip16 = bytes(rest[:16])
    (port,) = struct.unpack_from(">H", rest, 16)
    flags = rest[18] if len(rest) > 18 else None
    return key, ip16, port, flags
