import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpbox.protocol.upgrade import (
    MAX_HEAD,
    HTTPHeadError,
    RequestHead,
    classify_derp_request,
    derp_switching_response,
    error_response,
    ideal_node,
    is_fast_start,
    parse_request_head,
    upgrade_required_response,
)

GO_CLIENT_HEAD = (
    b"GET /derp HTTP/1.1\r\n"
    b"Host: derp.example.com\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Connection: Upgrade\r\n"
    b"Derp-Fast-Start: 1\r\n"
    b"Ideal-Node: 1a\r\n"
    b"Upgrade: DERP\r\n"
    b"\r\n"
)
# A ClientInfo frame header plus its 104-byte payload, pipelined after the head (fast start).
CLIENT_INFO = b"\x02\x00\x00\x00\x68" + bytes(range(104))


def head_with(*header_lines: str, path: str = "/derp") -> RequestHead:
    raw = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in header_lines) + "\r\n"
    head = parse_request_head(raw.encode("latin-1"))
    assert head is not None
    return head


def status_of(buf: bytes) -> int:
    with pytest.raises(HTTPHeadError) as info:
        parse_request_head(buf)
    return info.value.status


# --- parsing -----------------------------------------------------------------------------------


def test_go_client_head_fields():
    head = parse_request_head(GO_CLIENT_HEAD)
    assert head == RequestHead(
        method="GET",
        target="/derp",
        path="/derp",
        query="",
        version="HTTP/1.1",
        headers=(
            ("Host", "derp.example.com"),
            ("User-Agent", "Go-http-client/1.1"),
            ("Connection", "Upgrade"),
            ("Derp-Fast-Start", "1"),
            ("Ideal-Node", "1a"),
            ("Upgrade", "DERP"),
        ),
        head_length=len(GO_CLIENT_HEAD),
    )


def test_bytes_after_head_are_not_consumed():
    buf = GO_CLIENT_HEAD + CLIENT_INFO
    head = parse_request_head(buf)
    assert head.head_length == len(GO_CLIENT_HEAD)
    assert buf[head.head_length :] == CLIENT_INFO
    assert buf[head.head_length] == 0x02  # first DERP byte


def test_bytearray_input():
    head = parse_request_head(bytearray(GO_CLIENT_HEAD + CLIENT_INFO))
    assert head.head_length == len(GO_CLIENT_HEAD)


def test_head_split_at_every_offset():
    stream = GO_CLIENT_HEAD + CLIENT_INFO
    expected = parse_request_head(stream)
    for cut in range(len(stream) + 1):
        buf = bytearray(stream[:cut])
        result = parse_request_head(buf)
        if cut < len(GO_CLIENT_HEAD):
            assert result is None, cut
            buf += stream[cut:]
            result = parse_request_head(buf)
        assert result == expected, cut


def test_byte_at_a_time_arrival():
    buf = bytearray()
    results = []
    for byte in GO_CLIENT_HEAD:
        buf.append(byte)
        results.append(parse_request_head(buf))
    assert results[:-1] == [None] * (len(GO_CLIENT_HEAD) - 1)
    assert results[-1].head_length == len(GO_CLIENT_HEAD)


def test_header_lookup_is_case_insensitive_and_keeps_received_names():
    head = parse_request_head(b"GET /derp HTTP/1.1\r\nuPgRaDe: derp\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert head.headers[0] == ("uPgRaDe", "derp")
    assert head.get("UPGRADE") == head.get("upgrade") == "derp"
    assert head.get("x-A") == "1"
    assert head.get_all("X-A") == ["1", "2"]
    assert head.get("Missing") is None
    assert head.get_all("Missing") == []


def test_value_whitespace_is_trimmed_and_inner_kept():
    head = parse_request_head(b"GET / HTTP/1.1\r\nA:   x  y \t\r\nB:\r\nC:\t\r\n\r\n")
    assert head.headers == (("A", "x  y"), ("B", ""), ("C", ""))


def test_obs_text_in_values_is_kept_as_latin1():
    head = parse_request_head(b"GET / HTTP/1.1\r\nX: caf\xe9\r\n\r\n")
    assert head.get("x") == "caf\xe9"


def test_query_split_from_path():
    head = parse_request_head(b"GET /derp?a=1&b=?2 HTTP/1.1\r\n\r\n")
    assert (head.target, head.path, head.query) == ("/derp?a=1&b=?2", "/derp", "a=1&b=?2")


def test_no_headers_at_all():
    head = parse_request_head(b"GET /derp HTTP/1.1\r\n\r\nrest")
    assert head.headers == ()
    assert head.head_length == len(b"GET /derp HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /derp HTTP/1.1\nUpgrade: DERP\n\n",
        b"GET /derp HTTP/1.1\r\nUpgrade: DERP\n\r\n",
        b"GET /derp HTTP/1.1\nUpgrade: DERP\r\n\n",
    ],
)
def test_bare_lf_line_endings_accepted_like_go(raw):
    head = parse_request_head(raw + CLIENT_INFO)
    assert head.head_length == len(raw)
    assert head.get("Upgrade") == "DERP"


def test_other_versions_and_methods():
    assert parse_request_head(b"GET / HTTP/1.0\r\n\r\n").version == "HTTP/1.0"
    assert parse_request_head(b"POST /derp HTTP/1.1\r\n\r\n").method == "POST"
    assert parse_request_head(b"M-SEARCH * HTTP/1.1\r\n\r\n").target == "*"


@pytest.mark.parametrize(
    "raw",
    [
        b"\r\n\r\n",  # empty request line
        b"\n\n",
        b"\r\nGET / HTTP/1.1\r\n\r\n",  # leading blank line: Go refuses it too
        b"GET /derp\r\n\r\n",
        b"GET  /derp HTTP/1.1\r\n\r\n",
        b"GET /derp HTTP/1.1 \r\n\r\n",
        b" GET /derp HTTP/1.1\r\n\r\n",
        b"GET /derp HTTP/1.1 extra\r\n\r\n",
        b"GET /derp http/1.1\r\n\r\n",
        b"GET /derp HTTP/1.10\r\n\r\n",
        b"GET /derp HTTP/11\r\n\r\n",
        b"GET /derp HTTP/x.y\r\n\r\n",
        b"GET /derp HTTP/1.1\r\r\n\r\n",  # CR before CRLF: bad version token
        b"G@T /derp HTTP/1.1\r\n\r\n",
        b"GET /de\x00rp HTTP/1.1\r\n\r\n",
        b"GET /d\xe9rp HTTP/1.1\r\n\r\n",
        b"GET /derp\t HTTP/1.1\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET /derp HTTP/1.1\r\n: empty-name\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nName : x\r\n\r\n",  # space before colon
        b"GET /derp HTTP/1.1\r\nN\xe4me: x\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nName(1): x\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nA: b\r\n c\r\n\r\n",  # obs-fold
        b"GET /derp HTTP/1.1\r\nA: b\r\n\tc\r\n\r\n",
        b"GET /derp HTTP/1.1\r\n A: b\r\n\r\n",  # whitespace before the first header
        b"GET /derp HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nA: b\rc\r\n\r\n",  # bare CR inside a value
        b"GET /derp HTTP/1.1\r\nA: b\x7f\r\n\r\n",
        b"GET /derp HTTP/1.1\r\n\r\r\n\r\n",  # a line holding a lone CR is not blank
    ],
)
def test_malformed_is_400(raw):
    assert status_of(raw) == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0", b"HTTP/9.9"])
def test_non_http1_version_is_505(version):
    assert status_of(b"GET /derp " + version + b"\r\nHost: x\r\n\r\n") == 505


def test_head_of_exactly_max_size_is_accepted():
    prefix = b"GET /derp HTTP/1.1\r\nX: "
    raw = prefix + b"a" * (MAX_HEAD - len(prefix) - 4) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD
    assert parse_request_head(raw).head_length == MAX_HEAD


def test_complete_head_one_byte_too_long_is_431():
    prefix = b"GET /derp HTTP/1.1\r\nX: "
    raw = prefix + b"a" * (MAX_HEAD - len(prefix) - 3) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD + 1
    assert status_of(raw) == 431


def test_incomplete_head_that_cannot_fit_is_431():
    partial = b"GET /derp HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
    assert parse_request_head(partial[: MAX_HEAD - 1]) is None  # might still end in time
    assert status_of(partial[:MAX_HEAD]) == 431
    assert status_of(partial) == 431


def test_garbage_without_newline_is_bounded():
    tls_hello = b"\x16\x03\x01\x02\x00" + b"\x01" * MAX_HEAD
    assert parse_request_head(tls_hello[:100]) is None
    assert status_of(tls_hello) == 431


def test_error_attributes():
    with pytest.raises(HTTPHeadError) as info:
        parse_request_head(b"GET /derp HTTP/2.0\r\n\r\n")
    err = info.value
    assert (err.status, err.headers) == (505, ())
    assert "505" in str(err)


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["Upgrade: DERP"], "derp"),
        (["Upgrade: derp"], "derp"),
        (["Upgrade: DeRp"], "derp"),
        (["Upgrade: websocket", "Sec-WebSocket-Protocol: derp"], "websocket"),
        (["Upgrade: WebSocket", "Sec-WebSocket-Protocol: derp"], "websocket"),
        (["upgrade: websocket", "sec-websocket-protocol: chat, derp"], "websocket"),
        # Go only checks for the substring; the accept then decides (and closes with 1008).
        (["Upgrade: websocket", "Sec-WebSocket-Protocol: notderp"], "websocket"),
        (["Upgrade: websocket"], "derp"),  # very old clients: raw DERP after the 101
        (["Upgrade: WebSocket", "Sec-WebSocket-Protocol: chat"], "derp"),
        (["Upgrade: derp", "Sec-WebSocket-Protocol: derp"], "derp"),
        ([], "none"),
        (["Upgrade: h2c"], "none"),
        (["Upgrade:"], "none"),
        (["Upgrade: derp, websocket"], "none"),
        (["Connection: Upgrade"], "none"),
        # Only the first Upgrade value counts, as with Go's Header.Get.
        (["Upgrade: h2c", "Upgrade: derp"], "none"),
    ],
)
def test_classify(headers, expected):
    assert classify_derp_request(head_with(*headers)) == expected


@pytest.mark.parametrize("path", ["/", "/derp/", "/derpx", "/Derp", "/derp/probe", "*"])
def test_classify_other_paths_none(path):
    assert classify_derp_request(head_with("Upgrade: DERP", path=path)) == "none"


def test_classify_ignores_query():
    assert classify_derp_request(head_with("Upgrade: DERP", path="/derp?x=1")) == "derp"


def test_fast_start_and_ideal_node():
    head = parse_request_head(GO_CLIENT_HEAD)
    assert is_fast_start(head)
    assert ideal_node(head) == "1a"
    assert not is_fast_start(head_with("Upgrade: DERP"))
    assert not is_fast_start(head_with("Derp-Fast-Start: 0"))
    assert not is_fast_start(head_with("Derp-Fast-Start: true"))
    assert is_fast_start(head_with("derp-fast-start:  1 "))
    assert ideal_node(head_with("Upgrade: DERP")) is None
    assert ideal_node(head_with("Ideal-Node:")) is None


# --- responses ---------------------------------------------------------------------------------


def test_derp_switching_response_exact_bytes():
    key = bytes(range(0xA0, 0xC0))
    assert derp_switching_response(key) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: 2\r\n"
        b"Derp-Public-Key: a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize("size", [0, 31, 33])
def test_derp_switching_response_rejects_bad_key_length(size):
    with pytest.raises(ValueError):
        derp_switching_response(bytes(size))


def test_upgrade_required_response_exact_bytes():
    body = b"DERP requires connection upgrade\n"
    assert upgrade_required_response() == (
        b"HTTP/1.1 426 Upgrade Required\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"Content-Length: 33\r\n"
        b"Connection: close\r\n"
        b"\r\n" + body
    )
    assert len(body) == 33


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, b"Bad Request"),
        (405, b"Method Not Allowed"),
        (426, b"Upgrade Required"),
        (431, b"Request Header Fields Too Large"),
        (505, b"HTTP Version Not Supported"),
    ],
)
def test_error_response(status, phrase):
    resp = error_response(status, "why")
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 %d %s" % (status, phrase)
    assert b"Connection: close" in lines
    assert b"Content-Type: text/plain; charset=utf-8" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert b"why" in body


def test_error_response_extra_headers():
    resp = error_response(400, "bad version", (("Sec-WebSocket-Version", "13"),))
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in resp


def test_error_response_round_trip_from_exception():
    with pytest.raises(HTTPHeadError) as info:
        parse_request_head(b"GET / HTTP/1.1\r\nbad\r\n\r\n")
    e = info.value
    assert error_response(e.status, e.reason, e.headers).startswith(b"HTTP/1.1 400 Bad Request\r\n")


# --- fuzzing -----------------------------------------------------------------------------------

_interesting = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"GET ", b"/derp", b" HTTP/1.1", b"HTTP/2.0",
     b"Upgrade: DERP", b"\r\n\r\n", b"\x00", b"\xff", b"?", b"a" * 300]
)
_fuzz_input = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(_interesting, st.binary(max_size=8)), max_size=40).map(b"".join),
    st.lists(st.one_of(_interesting, st.binary(max_size=8)), max_size=20).map(
        lambda parts: GO_CLIENT_HEAD[:60] + b"".join(parts)
    ),
)


def _parse(buf):
    try:
        return parse_request_head(buf)
    except HTTPHeadError as e:
        assert e.status in (400, 431, 505)
        return e


@settings(max_examples=3000, deadline=None)
@given(_fuzz_input)
def test_fuzz_parse_request_head(buf):
    result = _parse(buf)
    if isinstance(result, RequestHead):
        assert 0 < result.head_length <= min(len(buf), MAX_HEAD)
        assert buf[result.head_length - 1 : result.head_length] == b"\n"
        # The head alone parses the same, and trailing bytes never matter.
        assert parse_request_head(buf[: result.head_length]) == result
        assert parse_request_head(buf + b"\r\n\r\nGET") == result
        assert result.path + ("?" + result.query if "?" in result.target else "") == result.target
        for name, _ in result.headers:
            assert result.get(name.upper()) is not None
    elif result is None:
        assert len(buf) < MAX_HEAD
    # Every prefix is either still incomplete or already decides the same way.
    for cut in range(0, len(buf), 7):
        prefix = _parse(buf[:cut])
        if isinstance(prefix, RequestHead):
            assert prefix == result
        elif isinstance(prefix, HTTPHeadError):
            assert isinstance(result, HTTPHeadError) and result.status == prefix.status


@settings(max_examples=3000, deadline=None)
@given(
    st.binary(max_size=40),
    st.sampled_from([b"a", b"\r\n", b"\n", b"\x00"]),
    st.integers(MAX_HEAD - 60, MAX_HEAD + 8),
    st.binary(max_size=40),
)
def test_fuzz_large_inputs(start, fill, size, end):
    buf = start + fill * (size // len(fill)) + end
    result = _parse(buf)
    if isinstance(result, RequestHead):
        assert result.head_length <= MAX_HEAD
