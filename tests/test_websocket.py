import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpbox.protocol.upgrade import HTTPHeadError, classify_derp_request, parse_request_head
from derpbox.protocol.websocket import (
    DEFAULT_MAX_FRAME_SIZE,
    BinaryData,
    Close,
    CloseCode,
    Opcode,
    Ping,
    Pong,
    WebSocketDecoder,
    WebSocketError,
    accept_key,
    accept_response,
    check_client_handshake_response,
    client_handshake_request,
    encode_binary,
    encode_close,
    encode_frame,
    encode_masked_binary,
    encode_pong,
    negotiated_subprotocol,
    new_client_key,
)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = bytes.fromhex("37fa213d")
# RFC 6455 5.7 examples.
RFC_MASKED_TEXT_HELLO = bytes.fromhex("818537fa213d7f9f4d5158")
RFC_UNMASKED_TEXT_HELLO = bytes.fromhex("810548656c6c6f")
RFC_UNMASKED_PING_HELLO = bytes.fromhex("890548656c6c6f")
RFC_MASKED_PONG_HELLO = bytes.fromhex("8a8537fa213d7f9f4d5158")


def ws_request(*extra: str, drop: str = "", method: str = "GET", version: str = "HTTP/1.1"):
    lines = {
        "Host": "server.example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": RFC_KEY,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "derp",
    }
    lines.pop(drop, None)
    raw = f"{method} /derp {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    raw += "".join(e + "\r\n" for e in extra) + "\r\n"
    return parse_request_head(raw.encode())


def masked(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def raw_frame(b0, payload=b"", *, mask=MASK):
    """A masked frame with any first byte, bypassing encode_frame's checks."""
    n = len(payload)
    if n < 126:
        header = bytes((b0, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((b0, 0x80 | 126)) + struct.pack("!H", n)
    else:
        header = bytes((b0, 0x80 | 127)) + struct.pack("!Q", n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def error_code(data, **kwargs):
    with pytest.raises(WebSocketError) as info:
        WebSocketDecoder(**kwargs).feed(data)
    return info.value.code


def data_of(events):
    return b"".join(e.data for e in events if isinstance(e, BinaryData))


# --- handshake ---------------------------------------------------------------------------------


def test_accept_key_rfc_vector():
    assert accept_key(RFC_KEY) == RFC_ACCEPT


def test_accept_response_exact_bytes():
    assert accept_response(ws_request()) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n"
        b"\r\n"
    )


def test_accept_never_negotiates_compression():
    resp = accept_response(ws_request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"))
    assert b"Extensions" not in resp


@pytest.mark.parametrize("offer", ["derp", "chat, derp", "DERP", " derp , chat"])
def test_subprotocol_negotiated(offer):
    head = ws_request(f"Sec-WebSocket-Protocol: {offer}", drop="Sec-WebSocket-Protocol")
    assert negotiated_subprotocol(head) == "derp"
    assert accept_response(head).endswith(b"Sec-WebSocket-Protocol: derp\r\n\r\n")


@pytest.mark.parametrize("offer", ["notderp", "derp2", "chat"])
def test_subprotocol_not_offered_omits_header(offer):
    # Go accepts and then closes with 1008; the caller does that when this is None.
    head = ws_request(f"Sec-WebSocket-Protocol: {offer}", drop="Sec-WebSocket-Protocol")
    assert negotiated_subprotocol(head) is None
    assert b"Sec-WebSocket-Protocol" not in accept_response(head)


def test_subprotocol_in_second_header_counts():
    head = ws_request("Sec-WebSocket-Protocol: derp", drop="Sec-WebSocket-Protocol")
    head2 = parse_request_head(
        b"GET /derp HTTP/1.1\r\nSec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
    )
    assert negotiated_subprotocol(head) == negotiated_subprotocol(head2) == "derp"


def test_connection_header_token_list():
    resp = accept_response(ws_request("Connection: keep-alive, Upgrade", drop="Connection"))
    assert resp.startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"version": "HTTP/1.0"}, 426),
        ({"drop": "Connection"}, 426),
        ({"drop": "Upgrade"}, 426),
        ({"method": "POST"}, 405),
        ({"drop": "Sec-WebSocket-Version"}, 400),
        ({"drop": "Sec-WebSocket-Key"}, 400),
    ],
)
def test_accept_errors(kwargs, status):
    with pytest.raises(HTTPHeadError) as info:
        accept_response(ws_request(**kwargs))
    assert info.value.status == status


def test_connection_without_upgrade_token_is_426_with_hint():
    with pytest.raises(HTTPHeadError) as info:
        accept_response(ws_request("Connection: keep-alive", drop="Connection"))
    assert info.value.status == 426
    assert ("Upgrade", "websocket") in info.value.headers


@pytest.mark.parametrize("version", ["8", "12", "14", "13, 8"])
def test_wrong_version_is_400_and_names_13(version):
    with pytest.raises(HTTPHeadError) as info:
        accept_response(ws_request(f"Sec-WebSocket-Version: {version}", drop="Sec-WebSocket-Version"))
    assert info.value.status == 400
    assert info.value.headers == (("Sec-WebSocket-Version", "13"),)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "dGhlIHNhbXBsZSBub25jZQ",  # missing padding
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        "dGhlIHNhbXBsZSBub25jZSE=",  # 17 bytes
        "dGhlIHNhbXBsZSBub25j!Q==",
        "dGhlIHNhbXBs ZSBub25jZQ==",
        "dGhlIHNhbXBsZSBub25jZ\xe9==",
    ],
)
def test_bad_key_is_400(key):
    with pytest.raises(HTTPHeadError) as info:
        accept_response(ws_request(f"Sec-WebSocket-Key: {key}", drop="Sec-WebSocket-Key"))
    assert info.value.status == 400


def test_client_and_server_handshake_round_trip():
    key = new_client_key()
    request = client_handshake_request("derp.example.com", key=key)
    head = parse_request_head(request)
    assert head.head_length == len(request)
    assert head.get("Host") == "derp.example.com"
    assert classify_derp_request(head) == "websocket"
    response = accept_response(head)
    frames = encode_binary(b"\x01\x00\x00\x00\x28")
    assert check_client_handshake_response(response + frames, key) == len(response)
    for cut in range(len(response)):
        assert check_client_handshake_response(response[:cut], key) is None


def test_new_client_key_is_valid_and_random():
    keys = {new_client_key() for _ in range(8)}
    assert len(keys) == 8
    for key in keys:
        accept_response(ws_request(f"Sec-WebSocket-Key: {key}", drop="Sec-WebSocket-Key"))


GOOD_RESPONSE = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {RFC_ACCEPT}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
)


@pytest.mark.parametrize(
    "response",
    [
        GOOD_RESPONSE.replace("101 Switching Protocols", "426 Upgrade Required"),
        GOOD_RESPONSE.replace("101 Switching Protocols", "1010 Odd"),
        GOOD_RESPONSE.replace("HTTP/1.1", "HTTP/2.0"),
        GOOD_RESPONSE.replace(RFC_ACCEPT, accept_key("other")),
        GOOD_RESPONSE.replace("Upgrade: websocket\r\n", ""),
        GOOD_RESPONSE.replace("Connection: Upgrade\r\n", "Connection: close\r\n"),
        GOOD_RESPONSE.replace("Sec-WebSocket-Protocol: derp\r\n", ""),
        GOOD_RESPONSE.replace("Protocol: derp", "Protocol: chat"),
        GOOD_RESPONSE.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
        GOOD_RESPONSE.replace("Upgrade: websocket", "Upgrade websocket"),
        "x" * (16 * 1024),
    ],
)
def test_client_rejects_bad_responses(response):
    with pytest.raises(WebSocketError) as info:
        check_client_handshake_response(response.encode(), RFC_KEY)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_client_accepts_good_response_variants():
    assert check_client_handshake_response(GOOD_RESPONSE.encode(), RFC_KEY) == len(GOOD_RESPONSE)
    lower = GOOD_RESPONSE.replace("Upgrade: websocket", "upgrade: WebSocket")
    assert check_client_handshake_response(lower.encode(), RFC_KEY) == len(lower)


# --- decoding ----------------------------------------------------------------------------------


def test_rfc_masked_hello_unmasks_as_binary():
    frame = bytes([0x82]) + RFC_MASKED_TEXT_HELLO[1:]
    assert WebSocketDecoder().feed(frame) == [BinaryData(b"Hello")]


def test_rfc_masked_text_frame_is_1003():
    assert error_code(RFC_MASKED_TEXT_HELLO) == CloseCode.UNSUPPORTED_DATA


def test_rfc_unmasked_text_frame_to_client_is_1003():
    assert error_code(RFC_UNMASKED_TEXT_HELLO, client=True) == CloseCode.UNSUPPORTED_DATA


def test_rfc_ping_and_pong():
    assert WebSocketDecoder(client=True).feed(RFC_UNMASKED_PING_HELLO) == [Ping(b"Hello")]
    assert WebSocketDecoder().feed(RFC_MASKED_PONG_HELLO) == [Pong(b"Hello")]


def test_fragmented_binary_with_interleaved_control_frames():
    stream = (
        masked(Opcode.BINARY, b"Hel", fin=False)
        + masked(Opcode.PING, b"p1")
        + masked(Opcode.CONTINUATION, b"", fin=False)
        + masked(Opcode.PONG)
        + masked(Opcode.CONTINUATION, b"lo")
        + masked(Opcode.BINARY, b"!")
    )
    assert WebSocketDecoder().feed(stream) == [
        BinaryData(b"Hel"),
        Ping(b"p1"),
        Pong(b""),
        BinaryData(b"lo"),
        BinaryData(b"!"),
    ]


def test_data_delivered_per_frame_not_per_message():
    decoder = WebSocketDecoder()
    assert decoder.feed(masked(Opcode.BINARY, b"ab", fin=False)) == [BinaryData(b"ab")]
    assert decoder.feed(masked(Opcode.CONTINUATION, b"cd", fin=False)) == [BinaryData(b"cd")]
    assert decoder.feed(masked(Opcode.CONTINUATION, b"ef")) == [BinaryData(b"ef")]


def test_empty_binary_frame_yields_nothing():
    assert WebSocketDecoder().feed(masked(Opcode.BINARY)) == []


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 256, 65535, 65536, 70000])
def test_length_forms_round_trip(size):
    payload = bytes(i % 251 for i in range(size))
    frame = encode_masked_binary(payload, MASK)
    header_len = 2 + (0 if size < 126 else 2 if size < 65536 else 8)
    assert len(frame) == header_len + 4 + size
    expected = [BinaryData(payload)] if size else []
    assert WebSocketDecoder().feed(frame) == expected
    assert WebSocketDecoder(client=True).feed(encode_binary(payload)) == expected


def test_rfc_length_headers():
    # RFC 6455 5.7: 256 bytes in one unmasked binary frame, and 64 KiB.
    assert encode_binary(bytes(256))[:4] == bytes.fromhex("827e0100")
    assert encode_binary(bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")
    assert encode_binary(b"")[:2] == b"\x82\x00"
    assert encode_binary(bytes(125))[:2] == b"\x82\x7d"


def test_max_size_frame_accepted():
    payload = bytes(DEFAULT_MAX_FRAME_SIZE)
    assert WebSocketDecoder().feed(encode_masked_binary(payload)) == [BinaryData(payload)]


def test_large_frame_unmasked_correctly():
    payload = bytes(range(256)) * 4096  # 1 MiB
    frame = encode_masked_binary(payload, b"\xff\x00\xa5\x5a")
    assert frame[14:18] == bytes(b ^ m for b, m in zip(payload[:4], b"\xff\x00\xa5\x5a"))
    assert WebSocketDecoder().feed(frame) == [BinaryData(payload)]


def coalesce(events: list) -> list:
    """Adjacent BinaryData joined: the stream as DERP sees it."""
    out = []
    for event in events:
        if isinstance(event, BinaryData) and out and isinstance(out[-1], BinaryData):
            out[-1] = BinaryData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def test_byte_at_a_time():
    stream = (
        masked(Opcode.BINARY, b"x" * 300, fin=False)
        + masked(Opcode.PING, b"ping")
        + masked(Opcode.CONTINUATION, bytes(70000))
        + masked(Opcode.BINARY, b"tail")
        + masked(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    decoder = WebSocketDecoder()
    events = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i : i + 1])
    assert coalesce(events) == [
        BinaryData(b"x" * 300),
        Ping(b"ping"),
        BinaryData(bytes(70000) + b"tail"),  # two messages, one byte stream to DERP
        Close(1000, "bye"),
    ]


def test_feed_accepts_bytearray_and_memoryview():
    decoder = WebSocketDecoder()
    frame = masked(Opcode.BINARY, b"abc")
    assert decoder.feed(bytearray(frame)) == [BinaryData(b"abc")]
    assert decoder.feed(memoryview(frame)) == [BinaryData(b"abc")]


def test_close_frames():
    assert WebSocketDecoder().feed(masked(Opcode.CLOSE)) == [Close(None, "")]
    assert WebSocketDecoder().feed(masked(Opcode.CLOSE, b"\x03\xe9")) == [Close(1001, "")]
    reason = "bye \u2603".encode()
    assert WebSocketDecoder().feed(masked(Opcode.CLOSE, b"\x0f\xa0" + reason)) == [
        Close(4000, "bye \u2603")
    ]


def test_input_after_close_is_ignored():
    decoder = WebSocketDecoder()
    events = decoder.feed(masked(Opcode.CLOSE, b"\x03\xe8") + masked(Opcode.BINARY, b"late") + b"\x00junk")
    assert events == [Close(1000, "")]
    assert decoder.feed(masked(Opcode.BINARY, b"later") + b"\xff\xff") == []


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes(code):
    assert WebSocketDecoder().feed(masked(Opcode.CLOSE, struct.pack("!H", code))) == [Close(code, "")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_codes_are_1002(code):
    assert error_code(masked(Opcode.CLOSE, struct.pack("!H", code))) == CloseCode.PROTOCOL_ERROR


def test_close_with_one_byte_body_is_1002():
    assert error_code(masked(Opcode.CLOSE, b"\x03")) == CloseCode.PROTOCOL_ERROR


def test_close_reason_not_utf8_is_1007():
    assert error_code(masked(Opcode.CLOSE, b"\x03\xe8\xff\xfe")) == CloseCode.INVALID_PAYLOAD


def test_unmasked_client_frame_is_1002():
    assert error_code(encode_binary(b"abc")) == CloseCode.PROTOCOL_ERROR


def test_masked_server_frame_in_client_mode_is_1002():
    assert error_code(masked(Opcode.BINARY, b"abc"), client=True) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_reserved_bits_are_1002(rsv):
    assert error_code(raw_frame(0x80 | rsv | Opcode.BINARY, b"x")) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_1002(opcode):
    assert error_code(raw_frame(0x80 | opcode, b"x")) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_control_frame_over_125_is_1002(opcode):
    assert error_code(raw_frame(0x80 | opcode, bytes(126))) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_fragmented_control_frame_is_1002(opcode):
    assert error_code(raw_frame(opcode, b"x")) == CloseCode.PROTOCOL_ERROR


def test_control_frame_of_125_is_fine():
    assert WebSocketDecoder().feed(masked(Opcode.PING, bytes(125))) == [Ping(bytes(125))]


def test_continuation_without_message_is_1002():
    assert error_code(masked(Opcode.CONTINUATION, b"x")) == CloseCode.PROTOCOL_ERROR
    finished = masked(Opcode.BINARY, b"a") + masked(Opcode.CONTINUATION, b"x")
    assert error_code(finished) == CloseCode.PROTOCOL_ERROR


def test_new_binary_inside_fragmented_message_is_1002():
    stream = masked(Opcode.BINARY, b"a", fin=False) + masked(Opcode.BINARY, b"b")
    assert error_code(stream) == CloseCode.PROTOCOL_ERROR


def test_text_continuing_a_binary_message_is_1003():
    stream = masked(Opcode.BINARY, b"a", fin=False) + raw_frame(0x81, b"b")
    assert error_code(stream) == CloseCode.UNSUPPORTED_DATA


def test_oversized_frame_is_1009_before_payload_arrives():
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", DEFAULT_MAX_FRAME_SIZE + 1)
    assert error_code(header) == CloseCode.MESSAGE_TOO_BIG
    small = bytes((0x82, 0x80 | 126)) + struct.pack("!H", 1001)
    assert error_code(small, max_frame_size=1000) == CloseCode.MESSAGE_TOO_BIG
    assert WebSocketDecoder(max_frame_size=1000).feed(masked(Opcode.BINARY, bytes(1000)))


def test_64bit_length_with_top_bit_is_1002():
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63)
    assert error_code(header) == CloseCode.PROTOCOL_ERROR


def test_header_errors_fire_on_two_bytes():
    decoder = WebSocketDecoder()
    assert decoder.feed(b"\x82") == []
    with pytest.raises(WebSocketError):
        decoder.feed(b"\x05")  # unmasked


def test_error_is_sticky():
    decoder = WebSocketDecoder()
    with pytest.raises(WebSocketError) as first:
        decoder.feed(RFC_MASKED_TEXT_HELLO)
    with pytest.raises(WebSocketError) as again:
        decoder.feed(masked(Opcode.BINARY, b"fine"))
    assert again.value is first.value


def test_a_data_frame_streams_as_it_arrives():
    """DERP's bytes are a stream: a frame's payload is passed on as it comes, never held
    whole (a client cannot make the server buffer a big frame), and unmasked right across
    the pieces."""
    payload = bytes(i % 251 for i in range(300))
    frame = masked(Opcode.BINARY, payload)
    decoder = WebSocketDecoder()
    assert decoder.feed(frame[:3]) == []  # inside the 16-bit length
    assert decoder.feed(frame[3:7]) == []  # inside the mask
    assert decoder.feed(frame[7:8]) == []  # the mask's last byte
    first, second, third = decoder.feed(frame[8:13]), decoder.feed(frame[13:-1]), decoder.feed(frame[-1:])
    assert (first, second, third) == ([BinaryData(payload[:5])], [BinaryData(payload[5:-1])], [BinaryData(payload[-1:])])
    assert len(decoder._buf) == 0


def test_a_huge_frame_is_never_buffered():
    decoder = WebSocketDecoder()
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 20) + MASK
    assert decoder.feed(header) == []
    got = 0
    for _ in range(16):
        got += sum(len(e.data) for e in decoder.feed(bytes(65536 - 1)))
        assert len(decoder._buf) == 0
    assert got == 16 * (65536 - 1)


# --- encoding ----------------------------------------------------------------------------------


def test_encode_masked_binary_rfc_mask():
    assert encode_masked_binary(b"Hello", MASK) == bytes([0x82]) + RFC_MASKED_TEXT_HELLO[1:]


def test_encode_masked_binary_random_mask():
    a, b = encode_masked_binary(b"same"), encode_masked_binary(b"same")
    assert a[2:6] != b[2:6] or a == b  # fresh masks (equal only by 2**-32 chance)
    assert WebSocketDecoder().feed(a) == [BinaryData(b"same")]


def test_encode_control_frames():
    assert encode_pong(b"Hello") == bytes.fromhex("8a0548656c6c6f")
    assert encode_pong() == b"\x8a\x00"
    assert encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert encode_close() == b"\x88\x02\x03\xe8"
    assert encode_close(None) == b"\x88\x00"
    assert encode_close(CloseCode.POLICY_VIOLATION, "client must speak the derp subprotocol")[2:4] == b"\x03\xf0"


def test_encode_rejects_invalid_control_frames():
    with pytest.raises(ValueError):
        encode_pong(bytes(126))
    with pytest.raises(ValueError):
        encode_close(1000, "x" * 124)
    with pytest.raises(ValueError):
        encode_frame(Opcode.PING, b"", fin=False)
    with pytest.raises(ValueError):
        encode_frame(Opcode.BINARY, b"", mask=b"abc")


def test_server_frames_decode_in_client_mode():
    stream = encode_binary(b"data") + encode_pong(b"p") + encode_close(1000, "done")
    assert WebSocketDecoder(client=True).feed(stream) == [
        BinaryData(b"data"),
        Pong(b"p"),
        Close(1000, "done"),
    ]


# --- fuzzing -----------------------------------------------------------------------------------

ALLOWED_CODES = {1002, 1003, 1007, 1009}


def _run(decoder, chunks):
    """Events fed so far, and the error code if feeding failed."""
    events = []
    try:
        for chunk in chunks:
            events += decoder.feed(chunk)
    except WebSocketError as e:
        assert e.code in ALLOWED_CODES
        return events, e.code
    return events, None


def _chunks(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=3000, deadline=None)
@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 400), max_size=8),
    st.booleans(),
    st.integers(0, 200),
)
def test_fuzz_decoder_random_bytes(data, cuts, client, max_frame_size):
    whole_events, whole_error = _run(WebSocketDecoder(client=client, max_frame_size=max_frame_size), [data])
    split_events, split_error = _run(
        WebSocketDecoder(client=client, max_frame_size=max_frame_size), _chunks(data, cuts)
    )
    # Chunking never changes the outcome (a payload may arrive in more pieces).
    assert whole_error == split_error
    if whole_error is None:
        assert coalesce(whole_events) == coalesce(split_events)
    else:
        assert whole_events == []  # a failing feed returns nothing, it raises


_frame = st.one_of(
    st.tuples(st.just(Opcode.BINARY), st.binary(max_size=300)),
    st.tuples(st.just(Opcode.PING), st.binary(max_size=125)),
    st.tuples(st.just(Opcode.PONG), st.binary(max_size=125)),
    st.tuples(st.just(Opcode.CONTINUATION), st.binary(max_size=300)),
)


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(st.tuples(_frame, st.booleans(), st.binary(min_size=4, max_size=4)), max_size=12),
    st.lists(st.integers(0, 5000), max_size=10),
)
def test_fuzz_decoder_valid_streams(frames, cuts):
    stream = b""
    expected_data = b""
    expected_control = []
    in_message = False
    for (opcode, payload), fin, mask in frames:
        if opcode in (Opcode.PING, Opcode.PONG):
            expected_control.append((Ping if opcode == Opcode.PING else Pong)(payload))
            fin = True
        else:
            # Keep the stream valid: continue an open message, else start one.
            opcode = Opcode.CONTINUATION if in_message else Opcode.BINARY
            in_message = not fin
            expected_data += payload
        stream += encode_frame(opcode, payload, fin=fin, mask=mask)
    events, error = _run(WebSocketDecoder(), _chunks(stream, cuts))
    assert error is None
    assert data_of(events) == expected_data
    assert [e for e in events if not isinstance(e, BinaryData)] == expected_control
