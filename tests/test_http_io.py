"""e2vd.http_io: reading a request's head and body off a real socket pair within the limits and
the deadline, and the body rules (Content-Length, sizes, Expect: 100-continue). The client side of
each pair is the test; nothing is mocked."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from e2vd.http_io import SMALL_BODY_BYTES, Body, Wire
from e2vd.http_wire import MAX_HEADERS, MAX_LINE_BYTES, RequestHead, RequestLine
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
    return RequestHead.build(request, version, [f"{line}\r\n".encode("latin-1") for line in lines])


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


def test_lines_longer_than_the_limit_are_too_large_without_reading_on(pair):
    wire, client = pair
    client.sendall(b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n")
    assert "request line of the request is longer than 65536 bytes" in refused("too_large", wire.read_request_line)


def test_more_header_lines_than_the_limit_are_too_large(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n")
    request = wire.read_request_line()
    assert f"more than {MAX_HEADERS} header lines" in refused("too_large", wire.read_headers, request)


def test_exactly_the_limit_of_header_lines_is_fine(pair):
    wire, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * MAX_HEADERS + b"\r\n")
    assert len(wire.read_headers(wire.read_request_line()).headers.get_all("X")) == MAX_HEADERS


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
    (("Transfer-Encoding: chunked",), "length_required", True),     # refused unread: framing unknown
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
    for lines in (("Content-Length: 101",), ("Transfer-Encoding: chunked",)):
        unread = Body(wire, head_of(*lines), max_body_bytes=100)
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
