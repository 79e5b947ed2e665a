"""e2vd.http_io: reading a request's head and body off a real socket pair within the limits and
the deadline, and the body rules (Content-Length, sizes, Expect: 100-continue). The client side of
each pair is the test; nothing is mocked."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from e2vd.http_io import SMALL_BODY_BYTES, Body, Wire
from e2vd.http_wire import MAX_HEADER_SECTION_BYTES, MAX_HEADERS, MAX_LINE_BYTES, RequestHead, RequestLine
from e2vd.protocol import ApiError
from e2vd.server import Connection, Peer

TIMEOUT = 2.0


@pytest.fixture
def pair() -> Iterator[tuple[Wire, socket.socket]]:
    """(the daemon's Wire, the client's socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wire = Wire(Connection(ours, Peer()), TIMEOUT)
    theirs.settimeout(10)
    yield wire, theirs
    wire.close()
    ours.close()
    theirs.close()


def refused(code: str, call, *args) -> str:
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.code == code, info.value.message
    return info.value.message


def head_of(*lines: str, version: tuple[int, int] = (1, 1)) -> RequestHead:
    request = RequestLine.parse(b"POST /v1/recognize HTTP/1.1\r\n")
    return RequestHead.build(request, version, [f"{line}\r\n".encode("latin-1") for line in ("Host: e2vd", *lines)])


# --- the head -------------------------------------------------------------------------------------

def test_a_request_is_read_line_by_line_and_leaves_the_next_one_in_place(pair):
    wire, client = pair
    client.sendall(b"\r\n\nGET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\nGET /v1/status HTTP/1.1\r\n\r\n")
    assert wire.wait_for_request() and wire.conn.deadline is not None
    request = wire.read_request_line()                      # blank lines before it are skipped
    head = wire.read_headers(request)
    assert (head.method, head.target, head.headers["Host"]) == ("GET", "/v1/health", "e2vd")
    wire.received()
    assert wire.conn.deadline is None
    assert wire.read_request_line().target == "/v1/status"


def test_http_0_9_is_refused_before_waiting_for_headers(pair):
    wire, client = pair
    client.sendall(b"GET /v1/health\r\n")                   # and nothing more: no blank line
    request = wire.read_request_line()
    assert "no HTTP version" in refused("bad_request", wire.read_headers, request)


def test_a_request_line_longer_than_the_limit_is_414_without_reading_on(pair):
    wire, client = pair
    client.sendall(b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n")
    message = refused("uri_too_long", wire.read_request_line)
    assert "request line is longer than 65536 bytes" in message and "shorter path and query" in message


def test_a_header_line_longer_than_the_limit_is_431_without_reading_on(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nX-A: " + b"a" * MAX_LINE_BYTES + b"\r\n\r\n")
    request = wire.read_request_line()
    message = refused("header_too_large", wire.read_headers, request)
    assert "header line of the request is longer than 65536 bytes" in message and "send a shorter one" in message


def test_more_header_lines_than_the_limit_are_431(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n")
    request = wire.read_request_line()
    assert f"more than {MAX_HEADERS} header lines" in refused("header_too_large", wire.read_headers, request)


def test_header_lines_of_more_than_64_kib_together_are_431_without_reading_on(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nHost: e2vd\r\n" + (b"X-A: " + b"a" * 30000 + b"\r\n") * 3 + b"\r\n")
    request = wire.read_request_line()
    message = refused("header_too_large", wire.read_headers, request)
    assert f"header lines come to more than {MAX_HEADER_SECTION_BYTES} bytes" in message
    assert wire.rfile.peek(1)[:2] == b"\r\n"              # the blank line after them: never read


def test_header_lines_of_exactly_64_kib_together_are_fine(pair):
    wire, client = pair
    lines = b"Host: e2vd\r\n" + b"X-A: " + b"a" * (MAX_HEADER_SECTION_BYTES - 12 - 7) + b"\r\n"
    assert len(lines) == MAX_HEADER_SECTION_BYTES
    client.sendall(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
    assert len(wire.read_headers(wire.read_request_line()).headers["X-A"]) == MAX_HEADER_SECTION_BYTES - 19


def test_exactly_the_limit_of_header_lines_is_fine(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nHost: e2vd\r\n" + b"X: 1\r\n" * (MAX_HEADERS - 1) + b"\r\n")
    assert len(wire.read_headers(wire.read_request_line()).headers.get_all("X")) == MAX_HEADERS - 1


def test_a_client_that_stops_in_a_line_is_bad_request(pair):
    wire, client = pair
    client.sendall(b"GET /v1/hea")
    client.shutdown(socket.SHUT_WR)
    assert "in the middle of a request line" in refused("bad_request", wire.read_request_line)


def test_a_client_too_slow_for_the_deadline_gets_timeout(pair):
    """What the reaper does at the deadline: mark the connection and shut its read side."""
    wire, client = pair
    client.sendall(b"GET /v1/health HTTP/1.1\r\nHost: e2")
    assert wire.wait_for_request()
    wire.conn.timed_out = True
    wire.sock.shutdown(socket.SHUT_RD)
    message = refused("timeout", wire.read_headers, wire.read_request_line())
    assert f"within {TIMEOUT:g} s (it stopped in a header line)" in message and "connection_timeout" in message


def test_the_socket_timeout_is_the_backstop_behind_the_reaper(pair):
    wire, client = pair
    client.sendall(b"GET /v1/hea")
    wire.sock.settimeout(0.2)
    assert "did not arrive within" in refused("timeout", wire.read_request_line)
    assert wire.conn.timed_out


def test_waiting_for_a_request_ends_when_the_client_closes(pair):
    wire, client = pair
    client.close()
    assert not wire.wait_for_request() and wire.conn.deadline is None


# --- the body -------------------------------------------------------------------------------------

def test_body_is_read_exactly_and_ends_the_deadline(pair):
    wire, client = pair
    client.sendall(b"0123456789" + b"GET")                     # the next request's first bytes
    wire.conn.deadline = 1.0
    body = Body(wire, head_of("Content-Length: 10"), max_body_bytes=100)
    assert body.read() == b"0123456789" and body.done and not body.close and wire.conn.deadline is None
    assert wire.rfile.read(3) == b"GET"


def test_a_body_cut_short_is_bad_request_and_closes(pair):
    wire, client = pair
    client.sendall(b"0123")
    client.shutdown(socket.SHUT_WR)
    body = Body(wire, head_of("Content-Length: 10"), max_body_bytes=100)
    assert "ended after 4 of 10 bytes" in refused("bad_request", body.read) and body.close


def test_a_body_cut_off_by_the_deadline_is_timeout_and_closes(pair):
    wire, client = pair
    client.sendall(b"0123")
    wire.conn.timed_out = True
    wire.sock.shutdown(socket.SHUT_RD)
    body = Body(wire, head_of("Content-Length: 10"), max_body_bytes=100)
    assert "got 4 of 10 bytes" in refused("timeout", body.read) and body.close


@pytest.mark.parametrize("lines, code, closes", [
    ((), "length_required", False),                                  # nothing was sent: still in sync
    (("Content-Length: 101",), "too_large", True),
])
def test_body_rules_for_a_route_that_takes_one(pair, lines, code, closes):
    wire, _ = pair
    body = Body(wire, head_of(*lines), max_body_bytes=100)
    refused(code, body.read)
    assert body.close is closes and not body.done


def test_routes_without_a_body_skip_a_small_one_and_refuse_a_big_one(pair):
    wire, client = pair
    client.sendall(b"x" * 27)
    small = Body(wire, head_of("Content-Length: 27"), max_body_bytes=10 ** 9)
    small.skip()
    assert small.done and not small.close
    big = Body(wire, head_of(f"Content-Length: {SMALL_BODY_BYTES + 1}"), max_body_bytes=10 ** 9)
    assert f"at most {SMALL_BODY_BYTES}" in refused("too_large", big.skip) and big.close
    none = Body(wire, head_of(), max_body_bytes=100)
    none.skip()
    assert none.done


def test_discard_reads_an_acceptable_body_and_closes_on_anything_else(pair):
    wire, client = pair
    client.sendall(b"abcde" + b"NEXT")
    body = Body(wire, head_of("Content-Length: 5"), max_body_bytes=100)
    body.discard()
    assert body.done and not body.close and wire.rfile.read(4) == b"NEXT"
    client.sendall(b"3\r\nabc\r\n0\r\n\r\n" + b"NEXT")                 # a chunked one is read too
    chunked = Body(wire, head_of("Transfer-Encoding: chunked"), max_body_bytes=100)
    chunked.discard()
    assert chunked.done and not chunked.close and wire.rfile.read(4) == b"NEXT"
    unread = Body(wire, head_of("Content-Length: 101"), max_body_bytes=100)
    unread.discard()
    assert unread.close
    client.shutdown(socket.SHUT_WR)
    short = Body(wire, head_of("Content-Length: 5"), max_body_bytes=100)
    short.discard()
    assert short.close


def test_expect_100_continue_invites_an_acceptable_body_only(pair):
    wire, client = pair
    Body(wire, head_of("Content-Length: 10", "Expect: 100-continue"), max_body_bytes=100).invite(takes_body=True)
    assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    Body(wire, head_of("Content-Length: 10"), max_body_bytes=100).invite(takes_body=True)   # not asked
    old = Body(wire, head_of("Content-Length: 10", "Expect: 100-continue", version=(1, 0)), max_body_bytes=100)
    old.invite(takes_body=True)                                                             # HTTP/1.0
    too_big = Body(wire, head_of("Content-Length: 101", "Expect: 100-continue"), max_body_bytes=100)
    refused("too_large", too_big.invite, True)
    assert too_big.close
    no_route_body = Body(wire, head_of(f"Content-Length: {SMALL_BODY_BYTES + 1}", "Expect: 100-continue"),
                         max_body_bytes=10 ** 9)
    refused("too_large", no_route_body.invite, False)        # a route without a body: the small limit
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)                                     # nothing else was sent


def test_write_says_when_the_client_is_gone(pair):
    wire, client = pair
    assert wire.write(b"HTTP/1.1 200 OK\r\n\r\n") and client.recv(100).startswith(b"HTTP/1.1 200")
    client.close()
    assert not wire.write(b"x" * 100000)


# --- chunked bodies (e2vd.http_chunked) -------------------------------------------------------------

def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    """`chunks` framed as a chunked body, with the last chunk and `trailer` lines."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


def chunked_body(wire: Wire, max_body_bytes: int = 100) -> Body:
    return Body(wire, head_of("Transfer-Encoding: chunked"), max_body_bytes)


def test_a_chunked_body_is_read_as_it_arrives_and_leaves_the_next_request_in_place(pair):
    wire, client = pair
    wire.conn.deadline = 1.0
    client.sendall(b"5;name=value;flag\r\nhello\r\n0006\r\n, worl\r\n1 ; ext\r\nd\r\n0;last\r\n"
                   b"X-Checksum: 123\r\nX-Other:\r\n\r\n" + b"GET")
    body = chunked_body(wire)
    assert body.check_length(required=True) is None and body.chunked
    assert body.read() == b"hello, world" and body.received == 12
    assert body.done and not body.close and wire.conn.deadline is None     # extensions and trailers dropped
    assert wire.rfile.read(3) == b"GET"


def test_a_chunked_body_is_handed_on_piece_by_piece(pair):
    wire, client = pair
    client.sendall(b"4\r\nabcd\r\n")
    pieces = chunked_body(wire).pieces()
    assert next(pieces) == b"abcd"                     # before the rest has even been sent
    client.sendall(b"2\r\nef\r\n0\r\n\r\n")
    assert list(pieces) == [b"ef"]


def test_a_chunked_body_is_refused_the_moment_it_would_cross_max_body_bytes(pair):
    wire, client = pair
    client.sendall(b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n")     # 64 + 64 > 100; the data never comes
    body = chunked_body(wire)
    pieces = body.pieces()
    assert next(pieces) == b"x" * 64
    message = refused("too_large", next, pieces)
    assert "after 64 bytes, a chunk of 64 more; this daemon accepts at most 100" in message and body.close


def test_sixteen_hex_digits_are_a_size_and_refused_as_too_large_not_allocated(pair):
    wire, client = pair
    client.sendall(b"000FFFFFFFFFFFFFFFF\r\n")
    assert "a chunk of 18446744073709551615 more" in refused("too_large", chunked_body(wire).read)


HOSTILE_CHUNKED: list[tuple[str, bytes, str]] = [
    ("size that is not hex", b"xyz\r\nabc\r\n0\r\n\r\n", "is not a hex size"),
    ("negative size", b"-5\r\nabc\r\n0\r\n\r\n", "is not a hex size"),
    ("size with 0x", b"0x3\r\nabc\r\n0\r\n\r\n", "is not a hex size"),
    ("empty size line", b"\r\nabc\r\n0\r\n\r\n", "is not a hex size"),
    ("17 hex digits", b"10000000000000000\r\n", "has 17 hex digits, more than 16"),
    ("bare LF after the size", b"3\nabc\r\n0\r\n\r\n", "ending in CRLF"),
    ("bare CR in an extension", b"3;a\rb\r\nabc\r\n0\r\n\r\n", "is not a hex size"),
    ("size line longer than 4096 bytes", b"3;" + b"e" * 5000 + b"\r\nabc\r\n0\r\n\r\n", "longer than 4096 bytes"),
    ("more data than the size says", b"3\r\nabcd\r\n0\r\n\r\n", "followed by b'd\\r', not CRLF"),
    ("data followed by a bare LF", b"3\r\nabc\n0\r\n\r\n", "not CRLF"),
    ("extensions swamping tiny chunks", (b"1;" + b"e" * 4000 + b"\r\na\r\n") * 5, "more than 16384 bytes of framing"),
    ("a malformed trailer", b"0\r\nX-T : 1\r\n\r\n", "whitespace before the colon"),
    ("a bare LF ending the trailers", b"0\r\n\n", "ends with b'\\n', not CRLF"),
]


@pytest.mark.parametrize("what, data, needle", HOSTILE_CHUNKED, ids=[h[0] for h in HOSTILE_CHUNKED])
def test_hostile_chunk_framing_is_bad_request_and_closes(pair, what, data, needle):
    wire, client = pair
    client.sendall(data)
    body = chunked_body(wire, max_body_bytes=10 ** 6)
    message = refused("bad_request", body.read)
    assert needle in message and "the connection is closed" in message and body.close


def test_more_than_100_trailer_lines_are_too_large(pair):
    wire, client = pair
    client.sendall(chunked(b"abc", trailer=b"X: 1\r\n" * 101))
    assert "more than 100 trailer lines" in refused("too_large", chunked_body(wire).read)


@pytest.mark.parametrize("data, needle", [
    (b"3\r\nabc\r\n", "the body ended after 3 bytes of a chunked body; it has no last chunk; end a chunked body "
                      "with 0 CRLF CRLF"),
    (b"3\r\nabc\r\n0\r\n", "end a chunked body with 0 CRLF, then CRLF"),
    (b"5\r\nabc", "2 short of a chunk's 5"),
    (b"3\r\nab", "send every chunk whole"),
    (b"3\r\nabc", "before the CRLF after a chunk"),
    (b"3\r", "in a chunk size line"),
])
def test_a_chunked_body_cut_short_is_bad_request_and_closes(pair, data, needle):
    wire, client = pair
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    body = chunked_body(wire)
    message = refused("bad_request", body.read)
    assert needle in message and body.close


def test_a_chunked_body_cut_off_by_the_deadline_is_timeout(pair):
    """What the reaper does at the deadline, whatever the chunks before it were."""
    wire, client = pair
    client.sendall(b"3\r\nabc\r\n2\r\nd")
    wire.conn.timed_out = True
    wire.sock.shutdown(socket.SHUT_RD)
    body = chunked_body(wire)
    message = refused("timeout", body.read)
    assert f"did not arrive within {TIMEOUT:g} s (got 4 bytes of a chunked body" in message
    assert "connection_timeout" in message and body.close


def test_routes_without_a_body_skip_a_small_chunked_one_and_refuse_a_big_one(pair):
    wire, client = pair
    client.sendall(chunked(b"x" * 27) + b"%x\r\n" % (SMALL_BODY_BYTES + 1))
    small = chunked_body(wire, max_body_bytes=10 ** 9)
    small.skip()
    assert small.done and not small.close and small.received == 27
    big = chunked_body(wire, max_body_bytes=10 ** 9)
    assert f"at most {SMALL_BODY_BYTES}" in refused("too_large", big.skip) and big.close


def test_expect_100_continue_invites_a_chunked_body(pair):
    wire, client = pair
    Body(wire, head_of("Transfer-Encoding: chunked", "Expect: 100-continue"), max_body_bytes=100).invite(True)
    assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_discard_goes_on_from_where_a_route_stopped_reading(pair):
    """A route that refused the body half-way (a bad form): the rest is read and dropped, so the
    answer can be read and the connection stays in sync; a body that then breaks its framing closes."""
    wire, client = pair
    client.sendall(chunked(b"abc", b"def", b"ghi") + b"NEXT")
    body = chunked_body(wire)
    assert next(body.pieces()) == b"abc"
    body.discard()
    assert body.done and not body.close and body.received == 9 and wire.rfile.read(4) == b"NEXT"
    client.sendall(b"10\r\n" + b"y" * 16 + b"\r\n" + b"zz\r\n")
    broken = chunked_body(wire)
    next(broken.pieces())
    broken.discard()
    assert broken.close and not broken.done
    sized = Body(wire, head_of("Content-Length: 6"), max_body_bytes=100)
    client.sendall(b"123456" + b"LAST")
    pieces = sized.pieces()
    client.sendall(b"")
    assert next(pieces) in (b"123456", b"1", b"12", b"123", b"1234", b"12345")
    sized.discard()
    assert sized.done and wire.rfile.read(4) == b"LAST"


def test_tiny_chunks_beyond_the_free_ones_are_refused_but_small_ones_pass(pair):
    """Parsing costs ~2 µs a chunk: a body of 1-byte chunks held a core for the whole request
    deadline. Past FREE_CHUNKS, chunks must average MIN_AVERAGE_CHUNK_BYTES."""
    from e2vd.http_chunked import FREE_CHUNKS, MIN_AVERAGE_CHUNK_BYTES

    wire, client = pair
    sender = threading.Thread(target=client.sendall, args=(b"1\r\nx\r\n" * 2 * FREE_CHUNKS + b"0\r\n\r\n",),
                              daemon=True)
    sender.start()
    message = refused("bad_request", chunked_body(wire, max_body_bytes=10 ** 6).read)
    first = next(k for k in range(1, 2 * FREE_CHUNKS) if k > FREE_CHUNKS + (k - 1) // MIN_AVERAGE_CHUNK_BYTES)
    assert f"{first} chunks for {first - 1} bytes" in message and "send larger chunks" in message
    data = bytes(range(256)) * (FREE_CHUNKS // 2)        # 8 MiB in 64-byte chunks: 131072 chunks
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wire2 = Wire(Connection(ours, Peer()), TIMEOUT)
    step = MIN_AVERAGE_CHUNK_BYTES
    sender = threading.Thread(target=theirs.sendall, args=(chunked(*(data[i:i + step] for i in range(0, len(data), step))),))
    sender.start()
    assert chunked_body(wire2, max_body_bytes=10 ** 8).read() == data
    sender.join()
    wire2.close()
    ours.close()
    theirs.close()


def test_many_tiny_chunks_without_extensions_are_fine(pair):
    """The framing allowance targets extensions, not small chunks: 20000 one-byte chunks pass."""
    wire, client = pair
    data = bytes(range(256)) * 78 + b"x" * 32
    sender = threading.Thread(target=client.sendall, args=(chunked(*(data[i:i + 1] for i in range(len(data)))),))
    sender.start()
    assert chunked_body(wire, max_body_bytes=10 ** 6).read() == data
    sender.join()
