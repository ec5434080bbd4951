import json
import os
import re
import stat

import nacl.public
import pytest

from derpbox import keys
from derpbox.keys import KeyFileError

SECRET_HEX = "0123456789abcdef" * 4


def write(path, text):
    path.write_text(text)
    return str(path)


def test_missing_file_is_created_with_derper_format(tmp_path):
    path = tmp_path / "var" / "lib" / "derper" / "derper.key"

    key = keys.load_or_create_key(str(path))

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    # Byte-for-byte what Go's json.MarshalIndent(cfg, "", "\t") writes.
    assert re.fullmatch(r'\{\n\t"PrivateKey": "privkey:[0-9a-f]{64}"\n\}', text)
    assert json.loads(text) == {"PrivateKey": keys.private_text(key)}
    assert os.listdir(path.parent) == ["derper.key"]  # no temp file left behind


def test_reload_returns_the_same_key_and_leaves_file_alone(tmp_path):
    path = str(tmp_path / "derper.key")
    first = keys.load_or_create_key(path)
    before = open(path, "rb").read()

    second = keys.load_or_create_key(path)

    assert bytes(second) == bytes(first)
    assert open(path, "rb").read() == before


def test_reads_existing_derper_key_file(tmp_path):
    path = write(tmp_path / "k", json.dumps({"PrivateKey": "privkey:" + SECRET_HEX, "Other": 1}))
    key = keys.load_or_create_key(path)
    assert bytes(key).hex() == SECRET_HEX


def test_field_name_is_case_insensitive_like_go(tmp_path):
    path = write(tmp_path / "k", json.dumps({"privatekey": "privkey:" + SECRET_HEX.upper()}))
    assert bytes(keys.load_or_create_key(path)).hex() == SECRET_HEX


def test_generated_key_is_clamped_like_go():
    raw = bytes(keys.generate_private_key())
    assert raw[0] & 7 == 0
    assert raw[31] & 0xC0 == 0x40


@pytest.mark.parametrize(
    "content, problem",
    [
        ("privkey:" + SECRET_HEX, "not JSON"),
        ("", "not JSON"),
        ('["privkey:' + SECRET_HEX + '"]', "JSON object"),
        ('{"Key": "privkey:' + SECRET_HEX + '"}', "missing the PrivateKey field"),
        ('{"PrivateKey": 12}', "must be a string"),
        ('{"PrivateKey": "nodekey:' + SECRET_HEX + '"}', "must start with 'privkey:'"),
        ('{"PrivateKey": "' + SECRET_HEX + '"}', "must start with 'privkey:'"),
        ('{"PrivateKey": "privkey:' + SECRET_HEX[:-2] + '"}', "expected 64 hex digits, found 62"),
        ('{"PrivateKey": "privkey:' + SECRET_HEX + 'ab"}', "expected 64 hex digits, found 66"),
        ('{"PrivateKey": "privkey:' + "zz" + SECRET_HEX[2:] + '"}', "not hex digits"),
    ],
)
def test_malformed_key_file(tmp_path, content, problem):
    path = write(tmp_path / "derper.key", content)

    with pytest.raises(KeyFileError) as info:
        keys.load_or_create_key(path)

    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert path in message
    assert problem in message
    assert SECRET_HEX[2:-2] not in message  # the secret is never echoed
    assert open(path).read() == content  # a broken file is never replaced


def test_non_utf8_file(tmp_path):
    path = tmp_path / "derper.key"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not JSON"):
        keys.load_or_create_key(str(path))


def test_unwritable_location_leaves_nothing(tmp_path):
    # Running as root defeats permission bits, so block creation with a file where a directory must be.
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    with pytest.raises(OSError):
        keys.load_or_create_key(str(blocker / "sub" / "derper.key"))

    assert os.listdir(tmp_path) == ["blocker"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.os, "fsync", broken_fsync)
    path = tmp_path / "derper.key"

    with pytest.raises(OSError, match="No space left"):
        keys.load_or_create_key(str(path))

    assert os.listdir(tmp_path) == []


def test_unreadable_path_is_an_os_error_not_a_new_key(tmp_path):
    with pytest.raises(IsADirectoryError):
        keys.load_or_create_key(str(tmp_path))


def test_node_public_text_round_trip():
    pub = bytes(nacl.public.PrivateKey.generate().public_key)
    text = keys.node_public_text(pub)
    assert text == "nodekey:" + pub.hex()
    assert keys.parse_node_public(text) == pub
    assert keys.parse_node_public(text.upper().replace("NODEKEY:", "nodekey:")) == pub


@pytest.mark.parametrize(
    "text, problem",
    [
        ("privkey:" + SECRET_HEX, "must start with 'nodekey:'"),
        (SECRET_HEX, "must start with 'nodekey:'"),
        ("nodekey:" + SECRET_HEX[:10], "expected 64 hex digits"),
        ("nodekey:" + "g" * 64, "not hex digits"),
    ],
)
def test_parse_node_public_errors(text, problem):
    with pytest.raises(ValueError, match=problem):
        keys.parse_node_public(text)


def test_node_public_text_rejects_wrong_length():
    with pytest.raises(ValueError, match="32 bytes"):
        keys.node_public_text(b"\x00" * 31)


def test_private_text():
    key = nacl.public.PrivateKey(bytes.fromhex(SECRET_HEX))
    assert keys.private_text(key) == "privkey:" + SECRET_HEX


def test_default_key_path_follows_derper():
    assert keys.default_key_path(is_root=True) == "/var/lib/derper/derper.key"
    assert keys.default_key_path(is_root=False) is None


def test_a_key_file_readable_by_others_is_warned_about(tmp_path, log_lines):
    from derpbox.config import load_settings
    from derpbox.service import load_server_key

    path = tmp_path / "derper.key"
    settings = load_settings(["-c", str(path), "-tls", "off"], {})
    load_server_key(settings)  # created 0600: no warning
    assert not any("readable by other users" in line for line in log_lines)
    path.chmod(0o644)
    load_server_key(settings)
    assert any(f"node key file {path} is readable by other users (mode 0644)" in line for line in log_lines)
