"""DERP handshake: ServerKey, ClientInfo and ServerInfo (spec 1.3, 1.4).

ClientInfo is a NaCl box from the client's key to the server's key holding a JSON
object. Go decodes JSON field names case-insensitively and ignores unknown fields,
so this module does the same.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .frames import (
    CLIENT_INFO_MAX,
    CLIENT_INFO_MIN,
    HEADER_LEN,
    KEY_LEN,
    MAGIC,
    FrameType,
    encode_frame,
    frame_name,
    server_key_frame,
    unpack_header_from,
)

HANDSHAKE_TIMEOUT = 10.0
SERVER_INFO_JSON = b'{"version":2}'


class HandshakeError(ValueError):
    """The peer's handshake is unacceptable; close the connection."""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    key: bytes
    version: int = 0
    mesh_key: bytes | None = None
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""


def _field(fields: dict, name: str, kind: type, default):
    value = fields.get(name.lower())
    if value is None:
        # Go leaves a field untouched on JSON null.
        return default
    # bool is an int subclass in Python but not a JSON number in Go.
    if type(value) is not kind:
        raise HandshakeError(f"ClientInfo field {name!r} must be a JSON {kind.__name__}, got {value!r:.40}")
    return value


def parse_client_info_json(key: bytes, plaintext: bytes) -> ClientInfo:
    try:
        obj = json.loads(plaintext)
    except (UnicodeDecodeError, ValueError) as e:
        raise HandshakeError(f"ClientInfo is not valid JSON: {e}") from None
    except RecursionError:
        # "[[[[..." inside a valid box: a handshake failure like any other, not a traceback.
        raise HandshakeError("ClientInfo JSON is nested too deeply") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise HandshakeError(f"ClientInfo JSON must be an object, got {type(obj).__name__}")
    fields = {}
    for name, value in obj.items():
        # Go prefers an exact-case match but accepts any case; lower-casing covers both
        # for the field names in use, which differ from each other ignoring case.
        fields.setdefault(name.lower(), value)
    mesh = _field(fields, "meshKey", str, None)
    mesh_key = None
    if mesh is not None:
        try:
            mesh_key = bytes.fromhex(mesh)
        except ValueError:
            mesh_key = b""
        if len(mesh_key) != 32 or len(mesh) != 64:
            raise HandshakeError("ClientInfo meshKey must be 64 hex digits")
    version = _field(fields, "version", int, 0)
    return ClientInfo(
        key=key,
        version=version,
        mesh_key=mesh_key,
        can_ack_pings=_field(fields, "CanAckPings", bool, False),
        is_prober=_field(fields, "IsProber", bool, False),
        app_name=_field(fields, "AppName", str, ""),
    )


class ServerHandshake:
    """The server side of the handshake for one server key."""

    def __init__(self, private_key: PrivateKey):
        self.private_key = private_key
        self.public_key = bytes(private_key.public_key)
        self.server_key_frame = server_key_frame(self.public_key)

    def open_client_info(self, payload) -> tuple[ClientInfo, Box]:
        """Open a ClientInfo payload; returns the info and the box for the reply."""
        payload = bytes(payload)
        client_key = payload[:KEY_LEN]
        try:
            box = Box(self.private_key, PublicKey(client_key))
            plaintext = box.decrypt(payload[KEY_LEN:])
        except CryptoError:
            raise HandshakeError("ClientInfo box cannot be opened with the client's key") from None
        return parse_client_info_json(client_key, plaintext), box

    @staticmethod
    def server_info_frame(box: Box) -> bytes:
        return encode_frame(FrameType.SERVER_INFO, bytes(box.encrypt(SERVER_INFO_JSON)))


def mesh_key_matches(expected: bytes | None, offered: bytes | None) -> bool:
    if not expected or offered is None:
        return False
    return hmac.compare_digest(expected, offered)


# Client side, used by derpbox.client.


def client_info_frame(client_private: PrivateKey, server_public: bytes, info: dict) -> bytes:
    box = Box(client_private, PublicKey(server_public))
    sealed = bytes(box.encrypt(json.dumps(info, separators=(",", ":")).encode()))
    return encode_frame(FrameType.CLIENT_INFO, bytes(client_private.public_key) + sealed)


def parse_server_key(payload) -> bytes:
    payload = bytes(payload)
    if len(payload) < len(MAGIC) + KEY_LEN or payload[: len(MAGIC)] != MAGIC:
        raise HandshakeError("ServerKey frame lacks the DERP magic")
    return payload[len(MAGIC) : len(MAGIC) + KEY_LEN]


def open_server_info(client_private: PrivateKey, server_public: bytes, payload) -> dict:
    box = Box(client_private, PublicKey(server_public))
    try:
        plaintext = box.decrypt(bytes(payload))
    except CryptoError:
        raise HandshakeError("ServerInfo box cannot be opened") from None
    try:
        info = json.loads(plaintext)
    except ValueError as e:
        raise HandshakeError(f"ServerInfo is not valid JSON: {e}") from None
    except RecursionError:
        raise HandshakeError("ServerInfo JSON is nested too deeply") from None
    if not isinstance(info, dict):
        raise HandshakeError("ServerInfo JSON must be an object")
    return info


def read_client_info(buf: bytes | bytearray, max_length: int = CLIENT_INFO_MAX) -> tuple[memoryview, int] | None:
    """The first frame a client sends: returns (payload, bytes consumed), or None
    while incomplete. Anything but a ClientInfo of CLIENT_INFO_MIN..max_length bytes
    is a HandshakeError."""
    if len(buf) < HEADER_LEN:
        return None
    ftype, length = unpack_header_from(buf, 0)
    if ftype != FrameType.CLIENT_INFO:
        raise HandshakeError(f"first frame is {frame_name(ftype)}, expected CLIENT_INFO")
    if not CLIENT_INFO_MIN <= length <= max_length:
        raise HandshakeError(f"CLIENT_INFO length {length} outside [{CLIENT_INFO_MIN}, {max_length}]")
    end = HEADER_LEN + length
    if len(buf) < end:
        return None
    return memoryview(buf)[HEADER_LEN:end], end
