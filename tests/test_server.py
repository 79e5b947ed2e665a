"""The HTTP side of the daemon (e2vd.server, handler, http_io, http_wire, routes) against a real
daemon on the tiny stand-in: request parsing, framing, error statuses, abandoned requests and what
reaches the log. Raw bytes on real Unix sockets, no mocks.

One shared daemon (connection_timeout 2 s, max_seconds 5, so the timeout and too_long paths stay
quick) serves most tests; tests that stop the daemon's process start their own. The one path a
real model cannot reach any more (500 internal) runs on an in-process Server with a stand-in engine.
"""
from __future__ import annotations

import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import wav_clip
from daemon_proc import ROOT, DaemonProcess, raw_request, read_response
from forms import Part, form
from test_handler import InProcess
from test_routes import FakeEngine

from e2vd.client import connect_unix
from e2vd.protocol import ERRORS, HTTP_ERRORS, ROUTES
from e2vd.http_wire import MAX_HEADERS, MAX_LINE_BYTES
from e2vd.server import MAX_CONNECTIONS

CONNECTION_TIMEOUT = 2
MAX_SECONDS = 5
GOOD = wav_clip(0.5)


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    sock = tmp_path_factory.mktemp("server") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600,
                       connection_timeout=CONNECTION_TIMEOUT, max_seconds=MAX_SECONDS) as d:
        yield d


def head(method: str, target: str, *lines: str) -> bytes:
    """A request head: request line, Host and `lines`, then the blank line."""
    return ("\r\n".join([f"{method} {target} HTTP/1.1", "Host: e2vd", *lines]) + "\r\n\r\n").encode("latin-1")


def exchange(d: DaemonProcess, data: bytes, then: Callable[[socket.socket], None] | None = None,
             ) -> tuple[int, dict[str, str], Any, bool]:
    """Send `data` on a fresh connection (then act on the socket, e.g. half-close it), read one
    answer; returns (status, headers, JSON, whether the daemon closed the connection after it)."""
    with connect_unix(str(d.socket), CONNECTION_TIMEOUT * 15) as s:
        s.sendall(data)
        if then is not None:
            then(s)
        status, headers, payload = read_response(s)
        return status, headers, payload, closed(s)


def closed(s: socket.socket) -> bool:
    """Whether the peer closed the connection (rather than sending more); waits for either."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


def wait_for_log(d: DaemonProcess, pattern: bytes, count: int = 1, timeout: float = 60.0) -> list[bytes]:
    """The daemon's stderr lines matching `pattern`, once there are at least `count` of them
    (the request event is written just after the answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in d.log_path.read_bytes().splitlines() if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- request lines the stdlib crashed on (item 4) ---------------------------------------------------

def test_request_line_without_http_version_is_400_not_a_crash(daemon):
    status, headers, body, was_closed = exchange(daemon, b"GET /v1/health\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "bad_request", body
    assert "no HTTP version" in body["error"]["message"] and "GET /v1/health HTTP/1.1" in body["error"]["message"]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close" and was_closed
    [line] = wait_for_log(daemon, rb"GET /v1/health -> 400 bad_request")
    assert b"status=400" in line
    assert "Traceback" not in daemon.log_text() and "connection handler failed" not in daemon.log_text()


def test_client_cut_off_in_the_middle_of_the_request_line_gets_408(daemon):
    status, _, body, was_closed = exchange(daemon, b"GET /v1/hea")      # then silence
    assert status == 408 and body["error"]["code"] == "timeout", body
    assert "connection_timeout" in body["error"]["message"] and was_closed
    assert "Traceback" not in daemon.log_text()


def test_client_that_stops_in_the_middle_of_the_request_line_gets_400(daemon):
    status, _, body, was_closed = exchange(daemon, b"GET /v1/hea", lambda s: s.shutdown(socket.SHUT_WR))
    assert status == 400 and body["error"]["code"] == "bad_request", body
    assert "in the middle of a request line" in body["error"]["message"] and was_closed


def test_blank_lines_before_the_request_line_are_skipped(daemon):
    status, _, body, was_closed = exchange(daemon, b"\r\n\r\n" + head("GET", "/v1/health", "Connection: close"))
    assert status == 200 and body == {"status": "ready"} and was_closed


def test_answers_are_one_write_with_the_head_built_here(daemon):
    """Head and body arrive together (one send), with the headers the stdlib used to add."""
    with connect_unix(str(daemon.socket), 30) as s:
        s.sendall(head("GET", "/v1/health"))
        data = s.recv(65536)
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK" and body == b'{"status":"ready"}'
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Server"].startswith("e2vd/") and fields["Date"].endswith(" GMT")
    assert fields["Content-Length"] == str(len(body)) and "Connection" not in fields


def test_keep_alive_and_expect_100_continue(daemon):
    """What the stdlib's parser did and this one must keep doing: HTTP/1.1 keep-alive, HTTP/1.0
    keep-alive on request, and Expect: 100-continue inviting an acceptable body."""
    with connect_unix(str(daemon.socket), 30) as s:
        s.sendall(head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}", "Expect: 100-continue"))
        assert s.recv(25, socket.MSG_WAITALL) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(GOOD)
        status, headers, result = read_response(s)
        assert status == 200 and "connection" not in headers and len(result["scores"]) == 9
        s.sendall(head("GET", "/v1/health"))
        assert read_response(s)[0] == 200
    with connect_unix(str(daemon.socket), 30) as s:
        s.sendall(b"GET /v1/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(s)[0] == 200
        s.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 200 and headers["connection"] == "close" and closed(s)


# --- malformed header lines and framing (item 7) ---------------------------------------------------

SMUGGLED = b"GET /v1/status HTTP/1.1\r\n\r\n"   # a second request hidden in the body

MALFORMED_HEADS: list[tuple[str, bytes, str]] = [
    ("space before the colon", b"Content-Length : 27", "whitespace before the colon"),
    ("tab before the colon", b"Content-Length\t: 27", "whitespace before the colon"),
    ("folded continuation line", b"X-Note: one\r\n two", "obs-fold"),
    ("no colon", b"Content-Length 27", "no colon"),
    ("empty name", b": 27", "not a token"),
    ("name that is not a token", b"Content/Length: 27", "not a token"),
    ("control character in a value", b"X-Note: a\x01b", "control characters"),
    ("NUL in a value", b"X-Note: a\x00b", "control characters"),
    ("bare CR in a value", b"X-Note: a\rb", "control characters"),
    ("DEL in a value", b"X-Note: a\x7fb", "control characters"),
    ("Content-Length twice, equal", b"Content-Length: 27\r\nContent-Length: 27", "given 2 times"),
    ("Content-Length twice, different", b"Content-Length: 27\r\nContent-Length: 0", "given 2 times"),
    ("Content-Length as a list", b"Content-Length: 27, 27", "not a whole number"),
    ("Content-Length with a sign", b"Content-Length: +27", "not a whole number"),
    ("Content-Length in other digits", "Content-Length: ²7".encode("latin-1"), "not a whole number"),
    ("Transfer-Encoding and Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length: 27",
     "both Transfer-Encoding and Content-Length"),
]


@pytest.mark.parametrize("what, lines, needle", MALFORMED_HEADS, ids=[m[0] for m in MALFORMED_HEADS])
def test_malformed_header_lines_and_framing_are_400_and_close_the_connection(daemon, what, lines, needle):
    """The body is a second request: it must never be answered (before, `Content-Length : 27`
    was dropped, the POST got 411 and the body was read as the next request)."""
    assert len(SMUGGLED) == 27
    data = b"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\n" + lines + b"\r\n\r\n" + SMUGGLED
    status, headers, body, was_closed = exchange(daemon, data)
    assert status == 400 and body["error"]["code"] == "bad_request", body
    assert needle in body["error"]["message"], body
    assert headers["connection"] == "close" and was_closed       # nothing answered the smuggled request


def test_well_formed_header_variations_are_accepted(daemon):
    """What RFC 9112 allows stays allowed: any case, no or tab OWS, obs-text in a value, an
    empty value, bare LF line ends, leading zeros in Content-Length."""
    lines = ["content-length:0000027", "X-Note:\tcaf\xe9 ", "X-Empty:", "x-a.b_c~d!: 1"]
    data = ("POST /v1/warmup HTTP/1.1\nHost: e2vd\n" + "\n".join(lines) + "\n\n").encode("latin-1") + b"x" * 27
    with connect_unix(str(daemon.socket), 30) as s:
        s.sendall(data)
        status, _, body = read_response(s)
        assert status == 200 and body["status"] == "ready", body
        s.sendall(head("GET", "/v1/health"))                     # the 27 bytes were the whole body:
        assert read_response(s)[2] == {"status": "ready"}        # the next request is read as one


# --- one table of error statuses (item 8) ----------------------------------------------------------

def too_many_connections(d: DaemonProcess) -> tuple[int, dict[str, str], Any]:
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):   # a per-uid cap, if lower, refuses these first: busy too
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            held.append(s)
        return raw_request(d.socket, head("GET", "/v1/health"))
    finally:
        for s in held:
            s.close()


def post(body: bytes, query: str = "") -> bytes:
    return head("POST", "/v1/recognize" + query, f"Content-Length: {len(body)}") + body


def post_form(*parts: Part) -> bytes:
    body, content_type = form(*parts)
    return head("POST", "/v1/recognize", f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body


# (code, what, action(daemon) -> (status, headers, JSON)); every code of ERRORS at least once
ERROR_PATHS: list[tuple[str, str, Callable[[DaemonProcess], tuple[int, dict[str, str], Any]]]] = [
    ("bad_audio", "empty body", lambda d: raw_request(d.socket, post(b""))),
    ("bad_option", "granularity=word", lambda d: raw_request(d.socket, post(GOOD, "?granularity=word"))),
    ("bad_request", "HTTP/0.9 request line", lambda d: raw_request(d.socket, b"GET /v1/health\r\n\r\n")),
    ("bad_request", "HTTP/2.0 request line", lambda d: raw_request(d.socket, b"GET /v1/health HTTP/2.0\r\n\r\n")),
    ("bad_request", "target that is not a URL", lambda d: raw_request(d.socket, head("GET", "http://[::1/v1/health"))),
    ("bad_request", "Content-Length not a number",
     lambda d: raw_request(d.socket, head("POST", "/v1/recognize", "Content-Length: abc"))),
    ("not_found", "unknown route", lambda d: raw_request(d.socket, head("GET", "/v1/nothing"))),
    ("method_not_allowed", "GET on a POST route", lambda d: raw_request(d.socket, head("GET", "/v1/recognize"))),
    ("method_not_allowed", "DELETE on a GET route", lambda d: raw_request(d.socket, head("DELETE", "/v1/status"))),
    ("not_implemented", "a method HTTP does not define", lambda d: raw_request(d.socket, head("BREW", "/v1/status"))),
    ("not_implemented", "a lower-case method", lambda d: raw_request(d.socket, head("get", "/v1/status"))),
    ("timeout", "cut off in the request line", lambda d: exchange(d, b"GET /v1/hea")[:3]),
    ("length_required", "POST without Content-Length", lambda d: raw_request(d.socket, head("POST", "/v1/recognize"))),
    ("not_implemented", "a transfer coding before chunked", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n")),
    ("bad_request", "chunked not the last transfer coding", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Transfer-Encoding: chunked, gzip") + b"0\r\n\r\n")),
    ("bad_request", "a chunk size that is not hex", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + b"zz\r\n")),
    ("bad_form", "a form with two file parts", lambda d: raw_request(d.socket, post_form(
        ("file", GOOD, "a.wav"), ("audio", GOOD, "b.wav")))),
    ("too_large", "a chunked body over max_body_bytes", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + b"ffffffffffff\r\n")),
    ("too_large", "huge Content-Length", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Content-Length: 1000000000000"))),
    ("too_large", "Content-Length of 5000 digits", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Content-Length: " + "9" * 5000))),
    ("uri_too_long", "request line too long", lambda d: raw_request(d.socket, head("GET", "/v1/" + "a" * MAX_LINE_BYTES))),
    ("header_too_large", "header line too long", lambda d: raw_request(
        d.socket, head("GET", "/v1/health", "X-A: " + "a" * MAX_LINE_BYTES))),
    ("header_too_large", "too many header lines", lambda d: raw_request(
        d.socket, head("GET", "/v1/health", *[f"X-{i}: 1" for i in range(MAX_HEADERS + 1)]))),
    ("expectation_failed", "Expect other than 100-continue", lambda d: raw_request(
        d.socket, head("POST", "/v1/recognize", "Content-Length: 5", "Expect: 200-ok"))),
    ("too_long", "audio over max_seconds", lambda d: raw_request(d.socket, post(wav_clip(MAX_SECONDS + 1)))),
    ("too_short", "10 ms of audio", lambda d: raw_request(d.socket, post(wav_clip(0.01)))),
    ("busy", "too many connections", too_many_connections),
]


def test_every_error_code_is_walked():
    """ERROR_PATHS over the wire; model_unavailable, config_invalid and internal in the tests after them."""
    assert {code for code, _, _ in ERROR_PATHS} | {"model_unavailable", "config_invalid", "internal"} == set(ERRORS)


@pytest.fixture(scope="module")
def document(daemon) -> dict[str, Any]:
    status, _, doc = daemon.request("GET", "/v1/openapi.json")
    assert status == 200
    return doc


def check_against_the_table(code: str, status: int, headers: dict[str, str], body: Any,
                            document: dict[str, Any]) -> None:
    """The answer's status is ERRORS[code]'s, and the OpenAPI document says so."""
    assert body["error"]["code"] == code, body
    assert status == ERRORS[code][0], (status, body)
    schema = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert schema["x-status"][code] == status
    for route in ROUTES:
        responses = document["paths"][route.path][route.method.lower()]["responses"]
        listed = re.compile(rf"(?:^| ){code}: ")       # not header_too_large's "too_large: "
        if code in route.errors or code in HTTP_ERRORS:
            assert listed.search(responses[str(status)]["description"]), (route.path, code)
        for other, response in responses.items():
            if other != str(status):
                assert not listed.search(response["description"]), (route.path, code, other)


@pytest.mark.parametrize("code, what, action", ERROR_PATHS, ids=[f"{c}: {w}" for c, w, _ in ERROR_PATHS])
def test_error_status_comes_from_the_table(daemon, document, code, what, action):
    status, headers, body = action(daemon)
    check_against_the_table(code, status, headers, body, document)
    if code == "method_not_allowed":
        assert headers["allow"] in ("GET, HEAD", "POST")
    if code == "busy":
        assert int(headers["retry-after"]) >= 1
    assert daemon.request("GET", "/v1/health")[0] == 200   # and the daemon still serves


def test_model_unavailable_status_comes_from_the_table(tmp_path, document):
    with DaemonProcess(tmp_path / "s.sock", tmp_path / "no-such-model", unavailable_grace=600) as d:
        deadline = time.monotonic() + 60
        while (answer := d.request("GET", "/v1/health"))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        check_against_the_table("model_unavailable", *answer, document)
        check_against_the_table("model_unavailable", *raw_request(d.socket, post(GOOD)), document)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")
def test_config_invalid_status_comes_from_the_table(tmp_path, document):
    """Settings that cannot be used, under socket activation (systemd-socket-activate plays
    systemd): every request is answered 503 config_invalid (e2vd.misconfigured)."""
    config = tmp_path / "e2vd.toml"
    config.write_text("idle_timeot = 30\n")
    path = tmp_path / "act.sock"
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(path), "-E", f"E2VD_CONFIG={config}",
                             "-E", f"PYTHONPATH={ROOT}", sys.executable, "-m", "e2vd", "serve"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        check_against_the_table("config_invalid", *raw_request(path, head("GET", "/v1/health"), timeout=60), document)
        check_against_the_table("config_invalid", *raw_request(path, post(GOOD), timeout=60), document)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("what, engine, needle", [
    ("a result that is not JSON", FakeEngine(scores=[float("nan")] * 9), "not valid JSON"),
    ("an engine that fails", FakeEngine(error=RuntimeError("boom")), "RuntimeError: boom"),
])
def test_internal_status_comes_from_the_table(what, engine, needle):
    """In process (tests/test_handler.py's InProcess): the decoder refuses what made real scores NaN."""
    from e2vd import __version__
    from e2vd.protocol import openapi

    d = InProcess(engine)
    try:
        s = d.connect()
        s.sendall(post(GOOD))
        status, headers, body = s.response()
    finally:
        d.close()
    check_against_the_table("internal", status, headers, body, openapi(__version__))
    assert needle in body["error"]["message"], body


# --- the log --------------------------------------------------------------------------------------

def test_control_bytes_from_the_path_are_escaped_on_stderr(daemon):
    status, _, body = raw_request(daemon.socket, head("GET", "/v1/\x1b[31mred\x07\x9b2Jesc-probe"))
    assert status == 400 and body["error"]["code"] == "bad_request"      # not printable ASCII: refused, logged
    [line] = wait_for_log(daemon, rb"esc-probe")
    assert not re.search(rb"[\x00-\x1f\x7f]", line), line
    assert "\x9b".encode() not in line, line                 # U+009B (CSI) as UTF-8
    text = line.decode()
    assert r"GET /v1/\x1b[31mred\x07\x9b2Jesc-probe -> 400 bad_request" in text, text
    assert r'path="/v1/\x1b[31mred\x07\x9b2Jesc-probe"' in text, text


# --- clients that hang up -------------------------------------------------------------------------

def test_recognitions_whose_client_hung_up_are_not_run_logged_or_counted(tiny_model, tmp_path):
    """While the daemon's process is stopped, 3 clients send a recognition and wait, 5 send one
    and close their socket; once it runs again it serves the 3, skips the 5 (status 499,
    abandoned, not in requests_served) and keeps serving."""
    waiting, gone = 3, 5
    request = head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}") + GOOD
    with DaemonProcess(tmp_path / "s.sock", tiny_model, wait_ready=True, idle_timeout=600) as d:
        answers: list[tuple[int, dict, Any]] = []
        clients = [threading.Thread(target=lambda: answers.append(raw_request(d.socket, request, timeout=120)))
                   for _ in range(waiting)]
        d.proc.send_signal(signal.SIGSTOP)   # connections and requests now wait in the socket
        try:
            for client in clients:
                client.start()
            for _ in range(gone):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(d.socket))
                    s.sendall(request)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        for client in clients:
            client.join(120)
        assert [status for status, _, _ in answers] == [200] * waiting, answers
        events = wait_for_log(d, rb"event=request .*path=/v1/recognize ", count=waiting + gone)
        abandoned = [e for e in events if b" status=499 " in e]
        assert len(abandoned) == gone, b"\n".join(events).decode()
        assert all(b"-> 499 abandoned: the client hung up" in e and b"abandoned=true" in e
                   and b"infer_ms=" not in e and b"code=" not in e for e in abandoned), abandoned
        assert sum(b" status=200 " in e for e in events) == waiting
        assert d.request("GET", "/v1/status")[2]["requests_served"] == waiting
        status, _, result = d.request("POST", "/v1/recognize", GOOD)
        assert status == 200 and result["top"]["label"] in result["labels"]
        assert d.request("GET", "/v1/status")[2]["requests_served"] == waiting + 1
        assert "Traceback" not in d.log_text()


def only_connection(path: Path, timeout: float = 30.0) -> socket.socket:
    """A connection that has had GET /v1/health answered 200 under max_connections_per_uid = 1.
    The start-up probe's connection counts until the daemon's handler reads its EOF, which under
    load can come after the probe returned: a 503 busy then is retried, never taken for the answer."""
    deadline = time.monotonic() + timeout
    while True:
        sock = connect_unix(str(path), timeout)
        sock.sendall(head("GET", "/v1/health"))
        status = read_response(sock)[0]
        if status == 200:
            return sock
        sock.close()
        assert status == 503 and time.monotonic() < deadline, f"GET /v1/health answered {status}"
        time.sleep(0.1)


def test_a_refused_client_that_writes_first_still_reads_the_503(tiny_model, tmp_path):
    """Over max_connections_per_uid the daemon answers 503 busy at once; a client that writes its
    request before reading (curl, http.client) must get that answer, not EPIPE: the daemon shuts
    its write side and reads what the client sends before it closes (a lingering close)."""
    with DaemonProcess(tmp_path / "s.sock", tiny_model, wait_ready=True, idle_timeout=600,
                       max_connections_per_uid=1) as d:
        with only_connection(d.socket):   # the uid's one connection, held open
            with connect_unix(str(d.socket), 30) as extra:
                assert select.select([extra], [], [], 30)[0], "no 503 within 30 s"
                time.sleep(0.3)   # past the moment the daemon used to close a refused connection
                extra.sendall(post(GOOD))   # EPIPE here when the daemon closed it at once
                status, _, body = read_response(extra)
            assert status == 503 and "max_connections_per_uid = 1" in body["error"]["message"]


def test_a_connection_its_client_closed_no_longer_counts_at_the_caps():
    """open_count: a connection whose client has closed it is not counted, idle or in a request
    (its thread may not have read the end yet); one still open is."""
    from e2vd.server import Connection, Peer, open_count

    pairs = [socket.socketpair() for _ in range(4)]
    conns = {Connection(ours, Peer(1, uid, uid)) for (ours, _), uid in zip(pairs, (1000, 1000, 1000, 2000))}
    by_sock = {c.sock: c for c in conns}
    try:
        pairs[0][1].close()                                  # uid 1000: closed by its client, idle
        pairs[1][1].close()
        by_sock[pairs[1][0]].in_request = True               # closed while its answer was leaving
        by_sock[pairs[2][0]].in_request = True               # open, in a request
        assert open_count(conns, 1000) == 1 and open_count(conns, 2000) == 1 and open_count(conns) == 2
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_closing_a_connection_and_opening_the_next_at_once_is_never_refused(tiny_model, tmp_path):
    """max_connections_per_uid = 1: a client that closes its connection and connects again at once
    is served every time (the cap counted the closed one until its thread had read the end: under
    load CI saw 503 busy here)."""
    with DaemonProcess(tmp_path / "s.sock", tiny_model, wait_ready=True, idle_timeout=600,
                       max_connections_per_uid=1) as d:
        only_connection(d.socket).close()                    # the start-up probe no longer counts
        for _ in range(30):
            with connect_unix(str(d.socket), 30) as s:
                s.sendall(head("GET", "/v1/health"))
                assert read_response(s)[0] == 200
