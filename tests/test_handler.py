"""e2vd.handler: one connection's requests read, routed, answered and logged in turn, on an
in-process Server (the real one) over socket pairs, with a stand-in engine: keep-alive, pipelining,
errors that keep the connection in sync or close it, HEAD, draining, abandoned requests and the
`request` event. (tests/test_server.py runs the same code in a daemon process.)"""
from __future__ import annotations

import json
import re
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wav_clip
from forms import chunked, form
from test_routes import FakeControl, FakeEngine

from e2vd import protocol
from e2vd.handler import peer_hung_up
from e2vd.routes import ROUTE_FUNCTIONS
from e2vd.scheduler import Scheduler
from e2vd.server import Server

GOOD = wav_clip(0.5)


def head(method: str, target: str, *lines: str, version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join([f"{method} {target} {version}", "Host: e2vd", *lines]) + "\r\n\r\n").encode("latin-1")


def post(body: bytes, query: str = "") -> bytes:
    return head("POST", "/v1/recognize" + query, f"Content-Length: {len(body)}") + body


class Client:
    """The client end of a connection: answers are read with a buffer of their own, so that
    pipelined answers that arrive together are each read whole."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""
        sock.settimeout(30)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n and self._more():
            pass
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, dict[str, str], Any]:
        """One answer: (status, lower-cased headers, JSON or {})."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError(f"closed before a complete answer: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        body = self.recv_exactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, json.loads(body) if body else {}

    def rest(self) -> bytes:
        """Everything until the daemon closes the connection."""
        while self._more():
            pass
        data, self.buf = self.buf, b""
        return data

    def closed(self) -> bool:
        """Whether the daemon closed the connection (rather than sending more); waits for either."""
        try:
            return not self.buf and not self._more()
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class InProcess:
    """A Server on a Scheduler whose load waits for `gate` (set at once unless `gated`)."""

    def __init__(self, engine: FakeEngine, gated: bool = False) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.scheduler = Scheduler(lambda: self.gate.wait(30) and engine, queue_size=8, max_batch=8)
        self.scheduler.start()
        self.server = Server(self.scheduler, FakeControl(), max_body_bytes=1_000_000, max_seconds=5,
                             connection_timeout=2)
        self.clients: list[Client] = []

    def connect(self) -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.add(ours)
        self.clients.append(Client(theirs))
        return self.clients[-1]

    def close(self) -> None:
        self.gate.set()
        for client in self.clients:
            client.close()
        self.scheduler.stop(10)


@pytest.fixture
def daemon(caplog) -> Iterator[InProcess]:
    caplog.set_level(logging.DEBUG, logger="e2vd")
    d = InProcess(FakeEngine())
    yield d
    d.close()


def request_events(caplog, count: int) -> list[dict[str, Any]]:
    """The fields of the first `count` request events, once there are that many (they are logged
    just after the answer leaves)."""
    deadline = time.monotonic() + 10
    while True:
        found = [dict(r.e2vd_fields, message=r.getMessage()) for r in caplog.records
                 if getattr(r, "e2vd_event", None) == "request"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# --- the connection loop --------------------------------------------------------------------------

def test_keep_alive_pipelining_and_one_event_per_request(daemon, caplog):
    s = daemon.connect()
    s.sendall(head("GET", "/v1/health") + post(GOOD) + head("GET", "/v1/status"))   # all at once
    assert s.response()[2] == {"status": "ready"}
    status, headers, result = s.response()
    assert status == 200 and result["top"]["label"] == "happy" and "connection" not in headers
    assert s.response()[2] == {"state": "ready", "queue_depth": 0}
    events = request_events(caplog, 3)
    assert [(e["method"], e["path"], e["status"]) for e in events] == [
        ("GET", "/v1/health", 200), ("POST", "/v1/recognize", 200), ("GET", "/v1/status", 200)]
    assert [e["request_id"] for e in events] == ["000001", "000002", "000003"]
    assert events[1]["top_label"] == "happy" and events[1]["body_bytes"] == len(GOOD)
    assert daemon.server.requests_served == 1
    s.sendall(head("GET", "/v1/health", "Connection: close"))
    status, headers, _ = s.response()
    assert status == 200 and headers["connection"] == "close" and s.closed()


def test_http_1_0_closes_unless_asked_to_keep_alive(daemon):
    s = daemon.connect()
    s.sendall(head("GET", "/v1/health", "Connection: keep-alive", version="HTTP/1.0"))
    assert s.response()[0] == 200
    s.sendall(head("GET", "/v1/health", version="HTTP/1.0"))
    assert s.response()[1]["connection"] == "close" and s.closed()


def test_an_early_error_drops_the_body_and_keeps_the_connection_in_sync(daemon, caplog):
    s = daemon.connect()
    s.sendall(post(GOOD, "?granularity=word") + head("GET", "/v1/health"))
    status, headers, body = s.response()
    assert status == 400 and body["error"]["code"] == "bad_option" and "connection" not in headers
    assert s.response()[2] == {"status": "ready"}              # the body was not read as a request
    assert request_events(caplog, 1)[0]["code"] == "bad_option"


def test_an_error_in_the_head_closes_the_connection(daemon):
    s = daemon.connect()
    s.sendall(b"GET /v1/health HTTP/1.1\r\nX : 1\r\n\r\n" + head("GET", "/v1/status"))
    status, headers, body = s.response()
    assert status == 400 and body["error"]["code"] == "bad_request" and headers["connection"] == "close"
    assert s.closed()


HOSTILE_HEADS = [
    ("request line too long", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: e2vd\r\n\r\n", 414, "uri_too_long",
     "request line is longer than 65536 bytes"),
    ("header line too long", head("GET", "/v1/health", "X-A: " + "a" * 70000), 431, "header_too_large",
     "header line of the request is longer than 65536 bytes"),
    ("too many header lines", head("GET", "/v1/health", *[f"X-{i}: 1" for i in range(120)]), 431,
     "header_too_large", "more than 100 header lines"),
    ("a #fragment", head("GET", "/v1/health#top"), 400, "bad_request", "has a #fragment"),
    ("two Host headers", head("GET", "/v1/health", "Host: evil.example"), 400, "bad_request", "Host is given 2 times"),
    ("no Host header", b"GET /v1/health HTTP/1.1\r\n\r\n", 400, "bad_request", "has no Host header"),
    ("a Host that is not one", b"GET /v1/health HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad_request",
     "is not a host name"),
    ("an unknown expectation", head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}", "Expect: 200-ok"),
     417, "expectation_failed", "only 100-continue"),
    ("CONNECT", head("CONNECT", "e2vd:80"), 400, "bad_request", "not a proxy"),
    ("GET *", head("GET", "*"), 400, "bad_request", "only for OPTIONS"),
    ("a target that is not a path", head("GET", "v1/health"), 400, "bad_request", "is not a path"),
    ("Content-Length and Transfer-Encoding", head("POST", "/v1/recognize", "Content-Length: 5",
                                                  "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400, "bad_request",
     "both Transfer-Encoding and Content-Length"),
    ("Transfer-Encoding then Content-Length", head("POST", "/v1/recognize", "Transfer-Encoding: chunked",
                                                   "Content-Length: 5") + b"0\r\n\r\n", 400, "bad_request",
     "both Transfer-Encoding and Content-Length"),
    ("two Content-Lengths that differ", head("POST", "/v1/recognize", "Content-Length: 5", "Content-Length: 50"),
     400, "bad_request", "Content-Length is given 2 times"),
    ("a plus-signed Content-Length", head("POST", "/v1/recognize", "Content-Length: +5"), 400, "bad_request",
     "is not a whole number"),
    ("a negative Content-Length", head("POST", "/v1/recognize", "Content-Length: -5"), 400, "bad_request",
     "is not a whole number"),
    ("a folded header line", head("GET", "/v1/health", "X-A: 1", " folded"), 400, "bad_request", "obs-fold"),
    ("a NUL in a header value", head("GET", "/v1/health", "X-A: a\0b"), 400, "bad_request", "control characters"),
    ("a bare CR in a header value", head("GET", "/v1/health", "X-A: a\rb"), 400, "bad_request", "control characters"),
]


@pytest.mark.parametrize("what, data, status, code, needle", HOSTILE_HEADS, ids=[h[0] for h in HOSTILE_HEADS])
def test_a_hostile_head_is_refused_by_name_the_request_behind_it_is_not_run_and_others_are_served(
        daemon, what, data, status, code, needle):
    s = daemon.connect()
    s.sendall(data + head("GET", "/v1/status"))     # a second request behind it must never be answered
    got, headers, answer = s.response()
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert needle in answer["error"]["message"] and headers["connection"] == "close", answer
    assert s.closed()
    other = daemon.connect()
    other.sendall(head("GET", "/v1/health"))
    assert other.response()[2] == {"status": "ready"}


def test_absolute_form_and_options_star_keep_the_connection(daemon):
    s = daemon.connect()
    s.sendall(head("GET", "http://e2vd/v1/health") + head("OPTIONS", "*") + head("GET", "HTTP://other/v1/health"))
    assert s.response()[2] == {"status": "ready"}                 # absolute-form: its host is not looked at
    status, headers, answer = s.response()
    assert status == 404 and answer["error"]["code"] == "not_found" and "connection" not in headers
    assert "no route '*'; the routes are POST /v1/recognize" in answer["error"]["message"], answer
    assert s.response()[2] == {"status": "ready"}


def test_head_is_answered_as_get_without_the_body(daemon):
    """RFC 9110 §9.3.2: HEAD of a GET route has GET's status and headers (Content-Length
    included) and no body; the connection stays open. HEAD of a POST route is 405 and closes."""
    s = daemon.connect()
    s.sendall(head("HEAD", "/v1/openapi.json") + head("GET", "/v1/openapi.json", "Connection: close"))
    first, second = s.rest().split(b"\r\n\r\n", 1)     # GET's answer right behind HEAD's head
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and second.startswith(b"HTTP/1.1 200 OK\r\n"), second[:80]
    length = re.search(rb"\r\nContent-Length: (\d+)", first).group(1)
    second_head, body = second.split(b"\r\n\r\n", 1)
    assert re.search(rb"\r\nContent-Length: (\d+)", second_head).group(1) == length
    assert len(body) == int(length) and json.loads(body)["openapi"].startswith("3.")
    s = daemon.connect()
    s.sendall(head("HEAD", "/v1/recognize"))
    data = s.rest()
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and data.endswith(b"\r\n\r\n")
    assert b"Allow: POST\r\n" in data and b"Connection: close\r\n" in data


def test_expect_100_continue(daemon):
    s = daemon.connect()
    s.sendall(head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}", "Expect: 100-continue"))
    assert s.recv_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(GOOD)
    assert s.response()[0] == 200
    s.sendall(head("POST", "/v1/recognize", "Content-Length: 2000000", "Expect: 100-continue"))
    status, headers, body = s.response()
    assert status == 413 and body["error"]["code"] == "too_large" and headers["connection"] == "close"


def test_chunked_and_multipart_uploads_on_one_kept_alive_connection(daemon, caplog):
    s = daemon.connect()
    body, content_type = form(("file", GOOD, "a.wav"), ("granularity", b"frame", None))
    s.sendall(head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + chunked(GOOD, 1000, b"X-Sum: 1\r\n")
              + head("POST", "/v1/recognize", f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body
              + head("POST", "/v1/recognize", f"Content-Type: {content_type}", "Transfer-Encoding: chunked",
                     "Expect: 100-continue"))
    assert s.response()[0] == 200 and s.response()[0] == 200
    assert s.recv_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(chunked(body, 7))
    status, headers, result = s.response()
    assert status == 200 and result["top"]["label"] == "happy" and "connection" not in headers
    events = request_events(caplog, 3)
    assert [(e["upload"], e.get("chunked"), e["body_bytes"]) for e in events] == [
        ("raw", True, len(GOOD)), ("multipart", None, len(body)), ("multipart", True, len(body))]


def test_a_form_refused_half_way_is_read_to_its_end_and_the_connection_goes_on(daemon, caplog):
    """Two file parts: refused as the second begins; the rest of the body is dropped, not read as a request."""
    s = daemon.connect()
    body, content_type = form(("file", GOOD, "a.wav"), ("audio", GOOD, "b.wav"))
    s.sendall(head("POST", "/v1/recognize", f"Content-Type: {content_type}", "Transfer-Encoding: chunked")
              + chunked(body, 500) + head("GET", "/v1/health"))
    status, headers, answer = s.response()
    assert status == 400 and answer["error"]["code"] == "bad_form" and "connection" not in headers
    assert "two file parts, 'file' (file 'a.wav') and 'audio' (file 'b.wav')" in answer["error"]["message"]
    assert s.response()[2] == {"status": "ready"}
    assert len(GOOD) < request_events(caplog, 1)[0]["body_bytes"] < len(body)   # read when it was refused


def test_broken_chunk_framing_and_a_chunked_body_over_max_body_bytes_close_the_connection(daemon):
    s = daemon.connect()
    s.sendall(head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + b"zz\r\n" + head("GET", "/v1/health"))
    status, headers, answer = s.response()
    assert status == 400 and answer["error"]["code"] == "bad_request" and headers["connection"] == "close"
    assert s.closed()
    s = daemon.connect()
    s.sendall(head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + b"%x\r\n" % 1_000_001)
    status, headers, answer = s.response()
    assert status == 413 and answer["error"]["code"] == "too_large" and headers["connection"] == "close"
    assert "accepts at most 1000000" in answer["error"]["message"]


def test_an_unexpected_failure_is_500_internal_and_the_connection_goes_on(daemon, monkeypatch, caplog):
    def broken(req):
        raise KeyError("no such thing")

    monkeypatch.setitem(ROUTE_FUNCTIONS, protocol.STATUS, broken)
    s = daemon.connect()
    s.sendall(head("GET", "/v1/status"))
    status, _, body = s.response()
    assert status == 500 and body["error"]["code"] == "internal"
    assert "unexpected KeyError: 'no such thing'" in body["error"]["message"]
    s.sendall(head("GET", "/v1/health"))
    assert s.response()[0] == 200
    assert any("request 000001 failed" in r.getMessage() for r in caplog.records)


def test_draining_answers_the_current_request_then_closes(daemon):
    s = daemon.connect()
    s.sendall(head("GET", "/v1/health"))
    assert s.response()[0] == 200
    daemon.server.drain()
    assert s.closed()                                     # idle: closed at once


def test_a_recognition_whose_client_hung_up_is_logged_499_and_not_counted(caplog):
    caplog.set_level(logging.DEBUG, logger="e2vd")
    d = InProcess(FakeEngine(), gated=True)
    try:
        gone, waiting = d.connect(), d.connect()
        gone.sendall(post(GOOD))
        waiting.sendall(post(GOOD))
        deadline = time.monotonic() + 10
        while d.scheduler.pending < 2:                   # both queued behind the loading model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gone.close()
        d.gate.set()
        assert waiting.response()[0] == 200
        events = request_events(caplog, 2)
        [abandoned] = [e for e in events if e["status"] == 499]
        assert abandoned["abandoned"] is True and "code" not in abandoned and "infer_ms" not in abandoned
        assert "abandoned: the client hung up before its turn" in abandoned["message"]
        assert d.server.requests_served == 1 and d.scheduler.abandoned == 1
    finally:
        d.close()


# --- is the client still there? -------------------------------------------------------------------

def test_peer_hung_up_only_once_the_client_closed_for_good():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert not peer_hung_up(ours)
        theirs.sendall(head("GET", "/v1/health"))        # a pipelined next request
        assert not peer_hung_up(ours)
        theirs.shutdown(socket.SHUT_WR)                  # done sending, still reading the answer
        assert not peer_hung_up(ours)
        theirs.close()
        assert peer_hung_up(ours)
    assert peer_hung_up(ours)                            # closed on our side too
