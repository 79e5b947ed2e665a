"""e2vd.http_wire: the request line, header lines, body framing, keep-alive and the answer's head,
as pure functions on bytes. Hostile inputs first: each must be refused with bad_request (or
too_large) and a message naming the problem, never guessed at. (tests/test_server.py sends the
same bytes to a real daemon.)"""
from __future__ import annotations

import pytest

from e2vd.http_wire import (MAX_HEADERS, MAX_LINE_BYTES, SERVER_HEADER, RequestHead, RequestLine, content_length,
                            is_chunked, keeps_alive, parse_chunk_size, parse_field_line, parse_header_lines,
                            response_head)
from e2vd.protocol import ApiError


def refused(code: str, call, *args) -> str:
    """The message of the ApiError `call(*args)` raises, after checking its code."""
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.code == code, info.value.message
    return info.value.message


# --- the request line -----------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    (b"GET /v1/health HTTP/1.1\r\n", ("GET", "/v1/health", "HTTP/1.1")),
    (b"GET /v1/health HTTP/1.1\n", ("GET", "/v1/health", "HTTP/1.1")),                 # bare LF
    (b"GET\t/v1/health \x0b\x0cHTTP/1.0\r\n", ("GET", "/v1/health", "HTTP/1.0")),     # any run of SP HTAB VT FF
    (b"GET /v1/health\r\n", ("GET", "/v1/health", "")),                               # no version: check() refuses
    (b"GET //evil.example/v1/health HTTP/1.1\r\n", ("GET", "/evil.example/v1/health", "HTTP/1.1")),
    (b"POST /v1/recognize?granularity=frame HTTP/1.1\r\n", ("POST", "/v1/recognize?granularity=frame", "HTTP/1.1")),
])
def test_request_line_splits(line, expected):
    request = RequestLine.parse(line)
    assert (request.method, request.target, request.version) == expected


@pytest.mark.parametrize("line", [b"\r\n", b"GET\r\n", b"GET /a HTTP/1.1 extra\r\n", b"\x00\r\n"])
def test_request_line_with_other_than_two_or_three_words_is_refused(line):
    message = refused("bad_request", RequestLine.parse, line)
    assert "is not 'METHOD /path HTTP/1.1'" in message and "curl --unix-socket" in message


def test_request_line_shows_at_most_200_characters_of_what_was_sent():
    message = refused("bad_request", RequestLine.parse, b"GET " + b"a" * 5000 + b" b c\r\n")
    assert len(message) < 400


def test_request_target_that_is_not_a_url_is_refused():
    message = refused("bad_request", RequestLine.parse, b"GET http://[::1/v1/health HTTP/1.1\r\n")
    assert "is not a URL" in message and "/v1/health" in message


@pytest.mark.parametrize("line, version", [(b"GET / HTTP/1.1\r\n", (1, 1)), (b"GET / HTTP/1.0\r\n", (1, 0)),
                                           (b"BREW / HTTP/1.1\r\n", (1, 1))])
def test_check_gives_the_version(line, version):
    assert RequestLine.parse(line).check() == version


@pytest.mark.parametrize("line, needle", [
    (b"GET /v1/health\r\n", "no HTTP version (HTTP/0.9"),
    (b"GET / HTTP/2.0\r\n", "speaks HTTP/1.1 (and 1.0), not HTTP/2.0"),
    (b"GET / HTTP/3\r\n", "'HTTP/3' in the request line is not an HTTP version"),
    (b"GET / http/1.1\r\n", "is not an HTTP version"),
    (b"GET / HTTP/1.1x\r\n", "is not an HTTP version"),
    (b"GET / HTTP/1.10\r\n", "is not an HTTP version"),
    (b"G(ET / HTTP/1.1\r\n", "the method 'G(ET' is not an HTTP method"),
    (b"G\x7fET / HTTP/1.1\r\n", "is not an HTTP method"),
])
def test_check_refuses_what_is_not_http_1(line, needle):
    assert needle in refused("bad_request", RequestLine.parse(line).check)


def test_http_0_9_answer_names_the_line_to_send():
    message = refused("bad_request", RequestLine.parse(b"GET /v1/health\r\n").check)
    assert "send 'GET /v1/health HTTP/1.1'" in message


# --- header lines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    (b"Content-Length: 27\r\n", ("Content-Length", "27")),
    (b"content-length:27\r\n", ("content-length", "27")),                # any case, no OWS
    (b"X-Note:\tcaf\xe9 \t\r\n", ("X-Note", "caf\xe9")),                  # tab OWS, obs-text, trailing OWS
    (b"X-Empty:\r\n", ("X-Empty", "")),
    (b"X-Tab: a\tb\n", ("X-Tab", "a\tb")),                                # HTAB inside a value, bare LF
    (b"x-a.b_c~d!: 1\r\n", ("x-a.b_c~d!", "1")),                          # every token character
])
def test_well_formed_field_lines(line, expected):
    assert parse_field_line(line) == expected


HOSTILE_FIELD_LINES = [
    (b"Content-Length : 27\r\n", "whitespace before the colon"),
    (b"Content-Length\t: 27\r\n", "whitespace before the colon"),
    (b" two\r\n", "starts with whitespace (a folded continuation line, obs-fold)"),
    (b"\tContent-Length: 27\r\n", "obs-fold"),
    (b"Content-Length 27\r\n", "has no colon"),
    (b": 27\r\n", "not a token"),
    (b"Content/Length: 27\r\n", "not a token"),
    (b"X-\xe9: 1\r\n", "not a token"),
    (b"X-Note: a\x01b\r\n", "control characters"),
    (b"X-Note: a\x00b\r\n", "control characters"),
    (b"X-Note: a\rb\r\n", "control characters"),                       # a bare CR
    (b"X-Note: a\x7fb\r\n", "control characters"),
    (b"X-Note: a\r\r\n", "control characters"),
]


@pytest.mark.parametrize("line, needle", HOSTILE_FIELD_LINES, ids=[repr(l) for l, _ in HOSTILE_FIELD_LINES])
def test_hostile_field_lines_are_refused_by_name(line, needle):
    message = refused("bad_request", parse_field_line, line)
    assert needle in message and "the connection is closed" in message


def test_a_long_hostile_line_is_shown_short():
    message = refused("bad_request", parse_field_line, b"X" * 10000 + b" : 1\r\n")
    assert len(message) < 300


def test_header_lines_keep_repeats_and_fail_on_the_first_bad_line():
    headers = parse_header_lines([b"Accept: a\r\n", b"accept: b\r\n", b"Host: e2vd\r\n"])
    assert headers.get_all("Accept") == ["a", "b"] and headers["HOST"] == "e2vd"
    assert "no colon" in refused("bad_request", parse_header_lines, [b"Host: e2vd\r\n", b"oops\r\n"])
    assert MAX_HEADERS == 100 and MAX_LINE_BYTES == 65536     # http.client's limits


# --- body framing ---------------------------------------------------------------------------------

def head_of(*lines: bytes):
    return parse_header_lines([line + b"\r\n" for line in lines])


@pytest.mark.parametrize("lines, length", [
    ((), None),
    ((b"Content-Length: 27",), 27),
    ((b"Content-Length: 0",), 0),
    ((b"content-length:0000027",), 27),
    ((b"Content-Length: " + b"0" * 5000 + b"1",), 1),              # leading zeros are not digits of the size
    ((b"Content-Length: " + b"9" * 18,), 10 ** 18 - 1),
    ((b"Transfer-Encoding: chunked",), None),                      # chunked: no declared length
])
def test_content_length(lines, length):
    assert content_length(head_of(*lines)) == length


@pytest.mark.parametrize("lines, needle", [
    ((b"Transfer-Encoding: chunked", b"Content-Length: 27"), "both Transfer-Encoding and Content-Length"),
    ((b"Content-Length: 27", b"Transfer-Encoding: identity"), "both Transfer-Encoding and Content-Length"),
    ((b"Content-Length: 27", b"Content-Length: 27"), "given 2 times (27, 27)"),
    ((b"Content-Length: 27", b"Content-Length: 0"), "given 2 times"),
    ((b"Content-Length: 27, 27",), "not a whole number"),
    ((b"Content-Length: +27",), "not a whole number"),
    ((b"Content-Length: -1",), "not a whole number"),
    ((b"Content-Length: 0x1b",), "not a whole number"),
    ((b"Content-Length: 2 7",), "not a whole number"),
    ((b"Content-Length: 1e3",), "not a whole number"),
    ((b"Content-Length:",), "not a whole number"),
    (("Content-Length: ²7".encode("latin-1"),), "not a whole number"),   # str.isdigit() says yes
    (("Content-Length: ٢٧".encode("utf-8"),), "not a whole number"),
])
def test_ambiguous_framing_is_refused(lines, needle):
    assert needle in refused("bad_request", content_length, head_of(*lines))


def test_a_content_length_of_more_than_18_digits_is_too_large_not_parsed():
    message = refused("too_large", content_length, head_of(b"Content-Length: " + b"9" * 5000))
    assert "5000-digit" in message


# --- chunked transfer coding ----------------------------------------------------------------------

@pytest.mark.parametrize("lines, chunked", [
    ((), False), ((b"Transfer-Encoding: chunked",), True), ((b"transfer-encoding: CHUNKED ",), True),
])
def test_is_chunked(lines, chunked):
    assert is_chunked(head_of(*lines), (1, 1)) is chunked


@pytest.mark.parametrize("lines", [
    (b"Transfer-Encoding: identity",),
    (b"Transfer-Encoding: chunked, chunked",),
    (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding: chunked, gzip",),
    (b"Transfer-Encoding: ",),
    (b"Transfer-Encoding: chunked;q=1",),
])
def test_framing_without_one_final_chunked_coding_is_a_bad_request(lines):
    """RFC 9112 §6.3: chunked not last (or twice): the body's length is unknown, 400 and close."""
    message = refused("bad_request", is_chunked, head_of(*lines), (1, 1))
    assert "does not end with one chunked coding" in message and "the connection is closed" in message


@pytest.mark.parametrize("lines", [
    (b"Transfer-Encoding: gzip, chunked",),
    (b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding: x-custom, CHUNKED",),
])
def test_a_transfer_coding_before_chunked_is_not_implemented(lines):
    """RFC 9112 §6.1: a transfer coding the server does not decode is 501."""
    message = refused("not_implemented", is_chunked, head_of(*lines), (1, 1))
    assert "decodes no transfer coding but chunked" in message and "the connection is closed" in message


def test_transfer_encoding_in_http_1_0_is_refused():
    message = refused("bad_request", is_chunked, head_of(b"Transfer-Encoding: chunked"), (1, 0))
    assert "in an HTTP/1.0 request" in message


@pytest.mark.parametrize("line, size", [
    (b"0\r\n", 0), (b"1a\r\n", 26), (b"1A\r\n", 26), (b"000000000000000000010\r\n", 16),
    (b"ffffffffffffffff\r\n", 2 ** 64 - 1), (b"5;name=value\r\n", 5), (b"5 ;a;b=\"c d\"\r\n", 5), (b"5\t;x\r\n", 5),
])
def test_chunk_sizes(line, size):
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize("line, needle", [
    (b"\r\n", "is not a hex size"), (b"g\r\n", "is not a hex size"), (b"-1\r\n", "is not a hex size"),
    (b"+1\r\n", "is not a hex size"), (b"0x1\r\n", "is not a hex size"), (b" 1\r\n", "is not a hex size"),
    (b"1 2\r\n", "is not a hex size"), (b"1\n", "ending in CRLF"), (b"1;a\rb\r\n", "is not a hex size"),
    (b"1;a\x00\r\n", "is not a hex size"), ("\u0661\r\n".encode(), "is not a hex size"),
    (b"1" * 17 + b"\r\n", "has 17 hex digits, more than 16"),
])
def test_hostile_chunk_sizes_are_refused(line, needle):
    message = refused("bad_request", parse_chunk_size, line)
    assert needle in message and "0 CRLF CRLF" in message


# --- keep-alive and the request's head as a whole -------------------------------------------------

@pytest.mark.parametrize("version, connection, keep", [
    ((1, 1), "", True), ((1, 1), "close", False), ((1, 1), "Keep-Alive, CLOSE", False),
    ((1, 1), "keep-alive", True), ((1, 0), "", False), ((1, 0), "Keep-Alive", True),
    ((1, 0), "keep-alive, close", False), ((1, 1), "upgrade", True),
])
def test_keeps_alive(version, connection, keep):
    assert keeps_alive(version, connection) is keep


def test_request_head_gathers_framing_keep_alive_and_expect():
    request = RequestLine.parse(b"POST /v1/recognize HTTP/1.1\r\n")
    head = RequestHead.build(request, request.check(), [b"Host: e2vd\r\n", b"Content-Length: 5\r\n",
                                                        b"Expect: 100-Continue\r\n", b"Connection: close\r\n"])
    assert (head.method, head.target, head.version) == ("POST", "/v1/recognize", (1, 1))
    assert head.content_length == 5 and not head.chunked and not head.keep_alive and head.expects_continue
    chunked = RequestHead.build(request, (1, 1), [b"Host: e2vd\r\n", b"Transfer-Encoding: chunked\r\n"])
    assert chunked.chunked and chunked.content_length is None and chunked.keep_alive
    assert not chunked.expects_continue
    refused("bad_request", RequestHead.build, request, (1, 1), [b"Host: e2vd\r\n", b"Transfer-Encoding: gzip\r\n"])
    old = RequestHead.build(request, (1, 0), [b"Expect: 100-continue\r\n"])
    assert not old.expects_continue              # an HTTP/1.0 client does not wait for it


def test_request_head_refuses_what_its_lines_refuse():
    request = RequestLine.parse(b"POST /v1/recognize HTTP/1.1\r\n")
    refused("bad_request", RequestHead.build, request, (1, 1), [b"Host: e2vd\r\n", b"Content-Length : 5\r\n"])
    refused("bad_request", RequestHead.build, request, (1, 1), [b"Host: e2vd\r\n", b"Content-Length: 5\r\n",
                                                                b"Content-Length: 5\r\n"])


# --- the answer's head ----------------------------------------------------------------------------

def test_response_head():
    head = response_head(503, 42, {"Retry-After": "1", "Allow": "GET"}, close=True)
    assert head.endswith(b"\r\n\r\n") and b"\n\n" not in head
    lines = head.decode("latin-1").split("\r\n")[:-2]
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Server"] == SERVER_HEADER and SERVER_HEADER.startswith("e2vd/")
    assert fields["Date"].endswith(" GMT") and fields["Content-Type"] == "application/json"
    assert fields["Content-Length"] == "42" and fields["Retry-After"] == "1" and fields["Allow"] == "GET"
    assert fields["Connection"] == "close"
    assert [line.split(":")[0] for line in lines[1:]] == ["Server", "Date", "Content-Type", "Content-Length",
                                                          "Retry-After", "Allow", "Connection"]


def test_response_head_keeps_the_connection_open_unless_told():
    head = response_head(200, 0).decode("latin-1")
    assert head.startswith("HTTP/1.1 200 OK\r\n") and "Connection" not in head
    assert response_head(404, 1).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert response_head(411, 1).startswith(b"HTTP/1.1 411 Length Required\r\n")


# --- the request target's form (RFC 9112 §3.2) -----------------------------------------------------------

@pytest.mark.parametrize("line, target", [
    (b"GET http://e2vd/v1/health HTTP/1.1\r\n", "http://e2vd/v1/health"),      # absolute-form: accepted
    (b"GET HTTP://e2vd/v1/health?x=1 HTTP/1.1\r\n", "HTTP://e2vd/v1/health?x=1"),
    (b"OPTIONS * HTTP/1.1\r\n", "*"),                                          # asterisk-form, OPTIONS only
    (b"GET /v1/health?a=%20b HTTP/1.1\r\n", "/v1/health?a=%20b"),
])
def test_request_targets_of_the_four_forms_that_are_accepted(line, target):
    request = RequestLine.parse(line)
    assert request.target == target and request.check() == (1, 1)


HOSTILE_TARGETS = [
    (b"GET /v1/health#frag HTTP/1.1\r\n", "has a #fragment"),
    (b"GET /v1/health?x=1#a HTTP/1.1\r\n", "has a #fragment"),
    (b"GET http://e2vd/v1/health#a HTTP/1.1\r\n", "has a #fragment"),
    (b"GET # HTTP/1.1\r\n", "has a #fragment"),
    (b"GET * HTTP/1.1\r\n", "'*' is only for OPTIONS"),
    (b"CONNECT e2vd:80 HTTP/1.1\r\n", "not a proxy"),
    (b"CONNECT /v1/health HTTP/1.1\r\n", "not a proxy"),
    (b"GET e2vd:80 HTTP/1.1\r\n", "is not a path"),
    (b"GET v1/health HTTP/1.1\r\n", "is not a path"),
    (b"GET ftp://e2vd/v1/health HTTP/1.1\r\n", "is not a path"),
    (b"GET http:/v1/health HTTP/1.1\r\n", "is not a path"),
    (b"GET /v1/h\xe9alth HTTP/1.1\r\n", "not printable ASCII"),
    (b"GET /v1/h\x00alth HTTP/1.1\r\n", "not printable ASCII"),
    (b"GET /v1/h\x7falth HTTP/1.1\r\n", "not printable ASCII"),
]


@pytest.mark.parametrize("line, needle", HOSTILE_TARGETS, ids=[repr(l) for l, _ in HOSTILE_TARGETS])
def test_hostile_request_targets_are_refused_by_name(line, needle):
    request = RequestLine.parse(line)                        # split as sent (and logged so) ...
    message = refused("bad_request", request.check)          # ... then refused
    assert needle in message and "/v1/health" in message, message


# --- Host (RFC 9112 §3.2) and Expect (RFC 9110 §10.1.1) --------------------------------------------

@pytest.mark.parametrize("lines, needle", [
    ([b"Host: e2vd\r\n", b"Host: e2vd\r\n"], "Host is given 2 times"),
    ([b"Host: e2vd\r\n", b"host: evil.example\r\n"], "Host is given 2 times"),
    ([], "has no Host header"),
    ([b"Host: e2 vd\r\n"], "is not a host name"),
    ([b"Host: e2vd/v1\r\n"], "is not a host name"),
    ([b"Host: e2vd:80x\r\n"], "is not a host name"),
    ([b"Host: user@e2vd\r\n"], "is not a host name"),
    ([b"Host: [::1\r\n"], "is not a host name"),
])
def test_a_request_without_exactly_one_good_host_is_refused(lines, needle):
    request = RequestLine.parse(b"GET /v1/health HTTP/1.1\r\n")
    message = refused("bad_request", RequestHead.build, request, (1, 1), lines)
    assert needle in message and "Host: e2vd" in message, message


@pytest.mark.parametrize("value", ["e2vd", "", "localhost:8080", "127.0.0.1", "[::1]:80", "a-b.c_d~e%41"])
def test_good_host_values_are_accepted(value):
    request = RequestLine.parse(b"GET /v1/health HTTP/1.1\r\n")
    head = RequestHead.build(request, (1, 1), [f"Host: {value}\r\n".encode()])
    assert head.headers["Host"] == value


def test_http_1_0_needs_no_host_but_not_two():
    request = RequestLine.parse(b"GET /v1/health HTTP/1.0\r\n")
    assert RequestHead.build(request, (1, 0), []).keep_alive is False
    refused("bad_request", RequestHead.build, request, (1, 0), [b"Host: a\r\n", b"Host: a\r\n"])


@pytest.mark.parametrize("lines", [
    [b"Expect: 200-ok\r\n"], [b"Expect: 100-continue, x\r\n"], [b"Expect: 100-continue\r\n", b"Expect: y=1\r\n"],
    [b"Expect: 100-continue; a=b\r\n"],
])
def test_an_expectation_other_than_100_continue_is_417(lines):
    request = RequestLine.parse(b"POST /v1/recognize HTTP/1.1\r\n")
    message = refused("expectation_failed", RequestHead.build, request, (1, 1), [b"Host: e2vd\r\n", *lines])
    assert "only 100-continue" in message and "Expect" in message, message


def test_100_continue_in_any_case_or_listed_twice_is_met():
    request = RequestLine.parse(b"POST /v1/recognize HTTP/1.1\r\n")
    head = RequestHead.build(request, (1, 1), [b"Host: e2vd\r\n", b"Content-Length: 1\r\n",
                                               b"Expect: 100-CONTINUE, 100-continue\r\n"])
    assert head.expects_continue
