"""Node keys and derper's key file (``-c``).

The file is derper's format, ``{"PrivateKey": "privkey:<64 hex>"}``, so an
operator can point derpbox at an existing derper key and keep the node's
identity (and every DERP map and ACL that pins it).
"""

from __future__ import annotations

import hashlib
import json
import os

import nacl.public

from .files import write_atomically

PRIVATE_PREFIX = "privkey:"
NODE_PUBLIC_PREFIX = "nodekey:"
KEY_LEN = 32

# derper's fallback when -c is not given and it runs as root.
ROOT_KEY_PATH = "/var/lib/derper/derper.key"


class KeyFileError(ValueError):
    """The key file exists but does not hold a usable private key."""


def default_key_path(is_root: bool) -> str | None:
    """derper's rule: root defaults to ROOT_KEY_PATH; anyone else must pass -c."""
    return ROOT_KEY_PATH if is_root else None


def private_text(priv: nacl.public.PrivateKey) -> str:
    return PRIVATE_PREFIX + bytes(priv).hex()


def node_public_text(pub: bytes) -> str:
    if len(pub) != KEY_LEN:
        raise ValueError(f"a node public key is {KEY_LEN} bytes, got {len(pub)}")
    return NODE_PUBLIC_PREFIX + pub.hex()


def parse_node_public(text: str) -> bytes:
    """Parse ``nodekey:<64 hex>`` into the 32 raw key bytes."""
    if not text.startswith(NODE_PUBLIC_PREFIX):
        raise ValueError(f"node public key must start with {NODE_PUBLIC_PREFIX!r}: {text!r}")
    return _decode_hex(text[len(NODE_PUBLIC_PREFIX):], what=f"node public key {text!r}")


def generate_private_key() -> nacl.public.PrivateKey:
    # Clamped like Go's key.NewNode(), so the bytes written match what derper would write.
    raw = bytearray(os.urandom(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return nacl.public.PrivateKey(bytes(raw))


def load_or_create_key(path: str) -> nacl.public.PrivateKey:
    """Load derper's key file at *path*, creating it (0600, atomically) if missing.

    OSError propagates for files that exist but cannot be read, and for a file
    that cannot be created; KeyFileError means the file's content is wrong.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        key = generate_private_key()
        write_atomically(path, _encode(key), 0o600)
        return key
    return _decode_file(path, data)


def _encode(key: nacl.public.PrivateKey) -> bytes:
    # Same bytes as derper's json.MarshalIndent(cfg, "", "\t").
    return json.dumps({"PrivateKey": private_text(key)}, indent="\t").encode()


def _decode_file(path: str, data: bytes) -> nacl.public.PrivateKey:
    # Messages describe the problem but never quote the file's content: it is a secret.
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path}: not JSON (not valid UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise KeyFileError(
            f"key file {path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f'expected {{"PrivateKey": "{PRIVATE_PREFIX}<64 hex digits>"}}'
        ) from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"key file {path}: top level must be a JSON object with a PrivateKey field")
    # Go's encoding/json matches field names case-insensitively, so derper accepts "privatekey".
    field = next((k for k in doc if k == "PrivateKey"), None) or next(
        (k for k in doc if k.lower() == "privatekey"), None
    )
    if field is None:
        raise KeyFileError(f"key file {path}: missing the PrivateKey field")
    text = doc[field]
    if not isinstance(text, str):
        raise KeyFileError(f"key file {path}: PrivateKey must be a string")
    if not text.startswith(PRIVATE_PREFIX):
        raise KeyFileError(f"key file {path}: PrivateKey must start with {PRIVATE_PREFIX!r}")
    try:
        raw = _decode_hex(text[len(PRIVATE_PREFIX):], what="PrivateKey")
    except ValueError as e:
        raise KeyFileError(f"key file {path}: {e}") from None
    return nacl.public.PrivateKey(raw)


def _decode_hex(digits: str, what: str) -> bytes:
    if len(digits) != 2 * KEY_LEN:
        raise ValueError(f"{what}: expected {2 * KEY_LEN} hex digits, found {len(digits)} characters")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise ValueError(f"{what}: contains characters that are not hex digits") from None


class MeshKeyError(ValueError):
    """The mesh pre-shared key is unusable; the message names its source."""


def parse_mesh_key(text: str, source: str) -> bytes:
    """derper's mesh key text: exactly 64 hex digits, surrounding whitespace ignored."""
    digits = text.strip()
    if len(digits) != 2 * KEY_LEN:
        raise MeshKeyError(f"{source}: mesh key must be exactly 64 hex digits, found {len(digits)} characters")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise MeshKeyError(f"{source}: mesh key must be exactly 64 hex digits, found non-hex characters") from None


def load_mesh_key(path: str) -> bytes:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise MeshKeyError(f"mesh key file {path}: {e.strerror}") from None
    return parse_mesh_key(text, f"mesh key file {path}")


def health_key(private_key: nacl.public.PrivateKey) -> bytes:
    """A mesh-style key only holders of the server's key file can compute.

    ``derpbox healthcheck`` runs beside the server and reads the same key file; it
    presents this as its ClientInfo meshKey, so its test clients pass client
    verification without any tailnet membership.
    """
    return hashlib.sha256(b"derpbox healthcheck v1\x00" + bytes(private_key)).digest()
