"""Frame codec and handshake, sans-IO: bytes in, frames and errors out."""

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey

from derpbox.protocol import frames as F
from derpbox.protocol.frames import FrameError, FrameReader, FrameType
from derpbox.protocol.handshake import (
    HandshakeError,
    ServerHandshake,
    client_info_frame,
    open_server_info,
    parse_client_info_json,
    parse_server_key,
    read_client_info,
)

KEY = bytes(range(32))
KEY2 = bytes(range(32, 64))


def test_header_layout():
    assert F.encode_frame(FrameType.PING, b"12345678") == b"\x12\x00\x00\x00\x0812345678"
    assert F.KEEP_ALIVE_FRAME == b"\x06\x00\x00\x00\x00"
    assert F.server_key_frame(KEY) == b"\x01\x00\x00\x00\x28" + F.MAGIC + KEY
    assert F.MAGIC == bytes.fromhex("44455250F09F9491")


@pytest.mark.parametrize(
    "frame, ftype, payload",
    [
        (F.send_packet_frame(KEY, b"hi"), 0x04, KEY + b"hi"),
        (F.RECV_HEADER.pack(F.FrameType.RECV_PACKET, F.KEY_LEN + 2, KEY) + b"hi", 0x05, KEY + b"hi"),
        (F.note_preferred_frame(True), 0x07, b"\x01"),
        (F.note_preferred_frame(False), 0x07, b"\x00"),
        (F.peer_gone_frame(KEY, 1), 0x08, KEY + b"\x01"),
        (F.peer_present_frame(KEY, bytes(16), 443, 1), 0x09, KEY + bytes(16) + b"\x01\xbb\x01"),
        (F.forward_packet_frame(KEY, KEY2, b"x"), 0x0A, KEY + KEY2 + b"x"),
        (F.WATCH_CONNS_FRAME, 0x10, b""),
        (F.close_peer_frame(KEY), 0x11, KEY),
        (F.ping_frame(b"abcdefgh"), 0x12, b"abcdefgh"),
        (F.pong_frame(b"abcdefgh"), 0x13, b"abcdefgh"),
        (F.health_frame("bad"), 0x14, b"bad"),
        (F.restarting_frame(1000, 30000), 0x15, struct.pack(">II", 1000, 30000)),
    ],
)
def test_every_frame_type_layout(frame, ftype, payload):
    assert frame[0] == ftype
    assert struct.unpack(">I", frame[1:5])[0] == len(payload)
    assert frame[5:] == payload


def test_payload_parsers():
    assert F.parse_peer_gone(KEY + b"\x01") == (KEY, 1)
    assert F.parse_peer_gone(KEY) == (KEY, 0)  # old servers: key only
    ip16 = bytes(10) + b"\xff\xff\x7f\x00\x00\x01"
    assert F.parse_peer_present(KEY + ip16 + b"\x00\x50\x02") == (KEY, ip16, 80, 2)
    assert F.parse_peer_present(KEY) == (KEY, None, None, None)
    assert F.parse_restarting(struct.pack(">II", 5, 6)) == (5, 6)


# Each bound of spec 1.1/1.5, one byte inside and one byte outside.
BOUND_CASES = [
    (FrameType.SEND_PACKET, 32, 32 + 65536),
    (FrameType.FORWARD_PACKET, 64, 64 + 65536),
    (FrameType.NOTE_PREFERRED, 1, 1),
    (FrameType.PING, 8, 1000),
    (FrameType.WATCH_CONNS, 0, 0),
    (FrameType.CLOSE_PEER, 32, 32),
    (FrameType.CLIENT_INFO, 56, 256 * 1024),
]


@pytest.mark.parametrize("ftype, lo, hi", BOUND_CASES)
def test_client_frame_bounds(ftype, lo, hi):
    for length in {lo, hi}:
        frames = FrameReader(F.CLIENT_FRAME_BOUNDS).feed(F.pack_header(ftype, length) + bytes(length))
        assert [(t, len(p)) for t, p in frames] == [(ftype, length)]
    for length in [hi + 1] + ([lo - 1] if lo > 0 else []):
        with pytest.raises(FrameError, match=f"{FrameType(ftype).name} frame length {length}"):
            # The header alone is enough: the payload is never buffered.
            FrameReader(F.CLIENT_FRAME_BOUNDS).feed(F.pack_header(ftype, length))


def test_unknown_frames_are_skipped_without_buffering():
    r = FrameReader(F.CLIENT_FRAME_BOUNDS)
    huge = 50 << 20
    assert r.feed(F.pack_header(0x13, huge) + bytes(1000)) == []
    assert r.buffered == 0
    for _ in range(50):
        assert r.feed(bytes(1 << 20)) == []
    assert r.buffered == 0
    rest = bytes(huge - 1000 - (50 << 20) + 1000)
    out = r.feed(rest + F.ping_frame(b"12345678"))
    assert [(t, bytes(p)) for t, p in out] == [(FrameType.PING, b"12345678")]


def test_reader_split_at_every_offset():
    stream = b"".join(
        [F.send_packet_frame(KEY, b"a" * 100), F.ping_frame(b"12345678"), F.pong_frame(b"xxxxxxxx"),
         F.note_preferred_frame(True), F.send_packet_frame(KEY2, b"")]
    )
    expected = [(t, bytes(p)) for t, p in FrameReader(F.CLIENT_FRAME_BOUNDS).feed(stream)]
    assert [t for t, _ in expected] == [0x04, 0x12, 0x07, 0x04]  # Pong from a client is skipped
    for cut in range(len(stream) + 1):
        r = FrameReader(F.CLIENT_FRAME_BOUNDS)
        got = [(t, bytes(p)) for t, p in r.feed(stream[:cut])]
        got += [(t, bytes(p)) for t, p in r.feed(stream[cut:])]
        assert got == expected, cut


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_frame_reader(chunks):
    r = FrameReader(F.CLIENT_FRAME_BOUNDS)
    for chunk in chunks:
        try:
            frames = r.feed(chunk)
        except FrameError:
            return
        for ftype, payload in frames:
            lo, hi = F.CLIENT_FRAME_BOUNDS[ftype]
            assert lo <= len(payload) <= hi


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_read_client_info(data):
    try:
        got = read_client_info(data)
    except HandshakeError:
        return
    if got is not None:
        payload, used = got
        assert used == len(payload) + 5 <= len(data)


# -- handshake ------------------------------------------------------------


def test_handshake_round_trip_and_server_info_size():
    server = ServerHandshake(PrivateKey.generate())
    client = PrivateKey.generate()
    frame = client_info_frame(client, server.public_key, {"version": 2, "CanAckPings": True})
    assert frame[0] == 0x02 and len(frame) == 5 + 104  # spec appendix: 0x68
    payload, used = read_client_info(frame + b"trailing")
    assert used == len(frame)
    info, box = server.open_client_info(payload)
    assert info.key == bytes(client.public_key)
    assert info.version == 2 and info.can_ack_pings and not info.is_prober and info.mesh_key is None
    si = server.server_info_frame(box)
    assert si[:5] == b"\x03\x00\x00\x00\x35"
    assert open_server_info(client, server.public_key, si[5:]) == {"version": 2}
    assert parse_server_key(server.server_key_frame[5:]) == server.public_key


def test_client_info_case_insensitive_and_unknown_fields_ignored():
    info = parse_client_info_json(KEY, b'{"VERSION":2,"canackpings":true,"isprober":true,"appname":"x","Extra":[1]}')
    assert (info.version, info.can_ack_pings, info.is_prober, info.app_name) == (2, True, True, "x")
    mesh = os.urandom(32)
    assert parse_client_info_json(KEY, json.dumps({"MeshKey": mesh.hex()}).encode()).mesh_key == mesh
    assert parse_client_info_json(KEY, b"null").version == 0
    assert parse_client_info_json(KEY, b'{"version":null}').version == 0


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "must be an object"),
        (b'{"version":"2"}', "'version' must be a JSON int"),
        (b'{"version":2.5}', "'version' must be a JSON int"),
        (b'{"CanAckPings":1}', "'CanAckPings' must be a JSON bool"),
        (b'{"meshKey":""}', "meshKey must be 64 hex digits"),
        (b'{"meshKey":"zz"}', "meshKey must be 64 hex digits"),
        (b'{"meshKey":12}', "'meshKey' must be a JSON str"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000, "nested too deeply"),
    ],
)
def test_bad_client_info_json(body, message):
    with pytest.raises(HandshakeError, match=message):
        parse_client_info_json(KEY, body)


def test_client_info_box_errors():
    server = ServerHandshake(PrivateKey.generate())
    client = PrivateKey.generate()
    good = client_info_frame(client, server.public_key, {})
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(HandshakeError, match="cannot be opened"):
        server.open_client_info(read_client_info(bytes(tampered))[0])
    other = PrivateKey.generate()
    sealed = bytes(Box(other, PrivateKey.generate().public_key).encrypt(b"{}"))
    with pytest.raises(HandshakeError, match="cannot be opened"):
        server.open_client_info(bytes(client.public_key) + sealed)


@pytest.mark.parametrize(
    "data, message",
    [
        (F.ping_frame(b"12345678"), "first frame is PING"),
        (F.pack_header(0x02, 55), "length 55 outside"),
        (F.pack_header(0x02, 256 * 1024 + 1), "length 262145 outside"),
        (F.pack_header(0x77, 10), r"first frame is unknown\(0x77\)"),
    ],
)
def test_bad_first_frame(data, message):
    with pytest.raises(HandshakeError, match=message):
        read_client_info(data)


def test_client_info_incomplete():
    assert read_client_info(b"\x02\x00") is None
    assert read_client_info(F.pack_header(0x02, 60) + bytes(59)) is None


def test_a_frame_in_tiny_pieces_is_collected_in_place():
    frame = F.send_packet_frame(bytes(32), bytes(range(256)) * 256)
    r = FrameReader(F.CLIENT_FRAME_BOUNDS)
    assert r.feed(frame[:10]) == []
    collected = r._pending
    for i in range(10, len(frame) - 1):
        assert r.feed(frame[i : i + 1]) == []
    # The same buffer grew all along: no copy of what came before with every piece.
    assert r._pending is collected and r.buffered == len(frame) - 1
    [(ftype, payload)] = r.feed(frame[-1:])
    assert ftype == F.FrameType.SEND_PACKET and bytes(payload) == frame[5:]
    assert r.buffered == 0


def test_limit_more_hold_and_unread():
    frames = [F.send_packet_frame(bytes(32), b"%d" % i) for i in range(10)]
    r = FrameReader(F.CLIENT_FRAME_BOUNDS)
    got = r.feed(b"".join(frames), limit=4)
    assert len(got) == 4 and r.more
    r.unread(got[2:])  # two handed back, in front of the rest
    r.hold(frames[0])  # and one more behind, unparsed
    assert r.more
    again = r.feed(b"")
    assert [bytes(p[32:]) for _, p in again] == [b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b"0"]
    assert not r.more
