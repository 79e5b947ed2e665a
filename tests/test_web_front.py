"""The browser front (`e2vd web`, issue 9) over real TCP and Unix sockets, without a browser:
the page, the badge that never wakes the daemon, forwarding to a real daemon on the tiny stand-in
(answers and errors byte for byte as the daemon sends them), 502/504, streaming a 40 MB upload
and a 40 MB answer within the front's memory, hostile input (the daemon's own bad-request corpus,
lying Content-Length, slow uploads, unknown routes, huge headers, other web sites), the idle exit.

Fronts run as subprocesses started the way systemd starts them (the listening socket on fd 3);
the daemon sits behind `systemd-socket-activate`, so a test sees whether anything woke it.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import wav_clip
from daemon_proc import http_request, read_response
from raw_peer import RawPeer, json_answer
from test_server import MALFORMED_HEADS
from webfront import ActivatedDaemon, FrontProcess, cmdline, peak_rss_kib

from e2vd.http_wire import MAX_HEADERS, MAX_LINE_BYTES
from e2vd.web_forward import SMALL_ANSWER_BYTES, answer_cap

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-activate is not installed (apt-get install systemd)")
REQUEST_TIMEOUT = 3
GOOD = wav_clip(1.0, seed=3)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def daemon(tiny_model, work):
    """A socket-activated daemon (asleep until something connects to it)."""
    with ActivatedDaemon(work / "e2vd.sock", tiny_model, idle_timeout=600, connection_timeout=5) as d:
        yield d


@pytest.fixture(scope="module")
def front(daemon, work):
    with FrontProcess(daemon.socket, work, request_timeout=REQUEST_TIMEOUT) as f:
        yield f


def head(method: str, target: str, *lines: str, host: str = "") -> bytes:
    return ("\r\n".join([f"{method} {target} HTTP/1.1", f"Host: {host}", *lines]) + "\r\n\r\n").encode("latin-1")


def exchange(front: FrontProcess, data: bytes, then: Callable[[socket.socket], None] | None = None):
    """Send `data` on a fresh connection, read one answer: (status, headers, JSON, closed after)."""
    with front.raw(data) as s:
        if then is not None:
            then(s)
        status, headers, body = read_response(s)
        try:
            closed = s.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
        return status, headers, body, closed


def host(front: FrontProcess) -> str:
    return f"127.0.0.1:{front.port}"


# ------------------------------------------------------------------------- the page and the badge
def test_the_page_is_one_self_contained_file_with_a_strict_policy(front):
    status, headers, body = front.request("GET", "/")
    html = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "nothing may load from elsewhere"
    assert "http://" not in html.replace("http://localhost:PORT", "") and "https://" not in html
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert csp.count("'sha256-") == 2 and headers["x-content-type-options"] == "nosniff"
    for needle in ('type="file"', 'id="record"', 'name="granularity"', 'id="embedding"', 'id="go"', 'id="warm"',
                   'id="badge"', 'name="viewport"', 'id="history"'):
        assert needle in html, needle


def test_opening_the_page_and_polling_the_badge_never_wake_the_daemon(front, daemon):
    if daemon.started:
        pytest.skip("an earlier test woke the daemon (run this module in order)")
    for _ in range(3):
        assert front.request("GET", "/")[0] == 200
        status, badge = front.json("GET", "/web/status")
        assert status == 200
    assert badge["state"] == "unknown", badge   # no systemd here: the front says so, and asks nobody
    assert badge["limits"] == {"max_body_bytes": 50_000_000, "max_seconds": 30.0}
    time.sleep(0.5)
    assert not daemon.started, "the page or its badge started the daemon"


def test_bad_options_and_routes_are_refused_without_waking_the_daemon(front, daemon):
    if daemon.started:
        pytest.skip("an earlier test woke the daemon (run this module in order)")
    status, err = front.json("POST", "/v1/recognize?granularity=word", GOOD)
    assert (status, err["error"]["code"]) == (400, "bad_option") and "utterance, frame" in err["error"]["message"]
    status, err = front.json("GET", "/v1/nothing")
    assert (status, err["error"]["code"]) == (404, "not_found")
    status, headers, data = front.request("GET", "/v1/recognize")
    assert (status, headers["allow"], json.loads(data)["error"]["code"]) == (405, "POST", "method_not_allowed")
    status, err = front.json("GET", "/nothing-here")
    assert (status, err["error"]["code"]) == (404, "not_found")
    assert not daemon.started


# ------------------------------------------------------------------------- forwarding
def test_recognize_through_the_front_equals_the_daemon_and_errors_pass_unchanged(front, daemon):
    status, result = front.json("POST", "/v1/recognize?granularity=frame&embedding=1", GOOD)
    assert status == 200, result
    assert daemon.started, "Recognize is what wakes the daemon"
    _, _, direct = http_request(daemon.socket, "POST", "/v1/recognize?granularity=frame&embedding=1", GOOD)
    assert len(result["scores"]) == 9 and len(result["embedding"]) == len(direct["embedding"]) >= 49   # 50 Hz
    assert result["scores"] == pytest.approx(direct["scores"], abs=1e-6) and result["top"] == direct["top"]
    for body in (b"this is a text file, not audio\n", b"", wav_clip(0.01)):
        via = front.request("POST", "/v1/recognize", body)
        d_status, _, d_body = http_request(daemon.socket, "POST", "/v1/recognize", body)
        assert via[0] == d_status and via[0] in (400, 422)
        assert json.loads(via[2]) == d_body, "the daemon's error passes through unchanged"


def test_warmup_and_status_are_forwarded(front, daemon):
    status, answer = front.json("POST", "/v1/warmup")
    assert status == 200 and answer["status"] == "ready", answer
    status, st = front.json("GET", "/v1/status")
    assert status == 200 and st["state"] == "ready"
    status, headers, data = front.request("HEAD", "/v1/openapi.json")   # GET's head, no body (RFC 9110 §9.3.2)
    assert status == 200 and data == b"" and int(headers["content-length"]) > 1000
    h = host(front)
    with front.raw(f"HEAD /v1/openapi.json HTTP/1.1\r\nHost: {h}\r\n\r\n"
                   f"GET /v1/health HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n".encode()) as s:
        answers = b""
        while chunk := s.recv(65536):
            answers += chunk
    first, second = answers.split(b"\r\n\r\n", 1)   # the health answer right behind HEAD's head
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 200 "), answers[:300]


def test_the_front_never_forwards_a_header_it_did_not_validate(work):
    with RecordingPeer(work / "rec.sock") as peer, FrontProcess(peer.path, work) as f:
        data = (f"POST /v1/recognize?embedding=yes&granularity=utterance HTTP/1.1\r\nHost: {host(f)}\r\n"
                "X-Forwarded-For: 10.0.0.1\r\nCookie: a=b\r\nAuthorization: Bearer x\r\nContent-Type: audio/wav\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\nTransfer-Encoding: identity\r\n\r\nRIFF").encode()
        status, _, _, _ = exchange(f, data)
        assert status == 400   # Transfer-Encoding with Content-Length: refused before anything is sent on
        assert peer.heads == []
        data = data.replace(b"Transfer-Encoding: identity\r\n", b"")
        with f.raw(data) as s:
            # exactly the interim answer: the final one may already be behind it in the buffer
            assert s.recv(25, socket.MSG_WAITALL) == b"HTTP/1.1 100 Continue\r\n\r\n"
            status, _, body = read_response(s)
        assert status == 200 and body == {"ok": True, "got": 4}
        sent = peer.heads[-1].decode("latin-1").split("\r\n")
        assert sent == ["POST /v1/recognize?embedding=yes&granularity=utterance HTTP/1.1", "Host: e2vd",
                        "Content-Length: 4", "Content-Type: audio/wav", "Connection: close"]


def test_502_without_a_daemon_and_504_when_it_does_not_answer(work):
    with FrontProcess(work / "no-such.sock", work) as f:
        status, err = f.json("POST", "/v1/recognize", GOOD)
        assert (status, err["error"]["code"]) == (502, "daemon_unreachable")
        assert "no daemon socket" in err["error"]["message"] and "e2vd.socket" in err["error"]["message"]
    with RecordingPeer(work / "mute.sock", mode="silent") as peer, \
            FrontProcess(peer.path, work, daemon_timeout=1) as f:
        t0 = time.monotonic()
        status, err = f.json("POST", "/v1/recognize", GOOD)
        assert (status, err["error"]["code"]) == (504, "daemon_timeout") and time.monotonic() - t0 < 10
    with RecordingPeer(work / "hangup.sock", mode="hangup") as peer, FrontProcess(peer.path, work) as f:
        status, err = f.json("GET", "/v1/health")
        assert (status, err["error"]["code"]) == (502, "daemon_unreachable")
        assert "without an answer" in err["error"]["message"]
        assert f.request("GET", "/")[0] == 200, "the front keeps serving"


@pytest.mark.parametrize("status", ["101 Switching Protocols", "204 No Content", "304 Not Modified", "199 Odd"])
def test_an_answer_without_a_body_from_a_misbehaving_daemon_is_502(work, status):
    """It was relayed with the Content-Length the front writes and no body: broken framing for the browser."""
    answer = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").encode()
    with RawPeer(answer) as peer, FrontProcess(peer.socket, work) as f:
        got, body = f.json("GET", "/v1/health")
        assert (got, body["error"]["code"]) == (502, "daemon_unreachable")
        assert f"status {status[:3]}" in body["error"]["message"]
        assert f.request("GET", "/")[0] == 200, "the front keeps serving"


def test_a_client_that_hangs_up_closes_the_daemons_connection_at_once(work):
    """So a recognition still queued in the daemon is not run (it skips jobs whose client left)."""
    with RecordingPeer(work / "slow.sock", mode="silent") as peer, FrontProcess(peer.path, work) as f:
        with f.raw(head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}", host=host(f)) + GOOD):
            deadline = time.monotonic() + 20
            while not peer._held:
                assert time.monotonic() < deadline, "the front did not connect to the daemon"
                time.sleep(0.05)
        held = peer._held[0]          # the client has closed its connection: the front must close this one
        held.settimeout(10)
        t0 = time.monotonic()
        while held.recv(65536):
            pass
        assert time.monotonic() - t0 < 5
        assert f.request("GET", "/")[0] == 200
        assert "-> 499" in f.log_text()


def test_a_40_mb_upload_and_a_40_mb_answer_stream_through_in_little_memory(work):
    """Neither direction is held whole: the front's peak RSS stays far below the 40 MB it moved."""
    size = 40 * 2**20
    with RecordingPeer(work / "sink.sock", answer_bytes=size) as peer, FrontProcess(peer.path, work) as f:
        before = peak_rss_kib(_wait_serving(f))
        conn = f.connection()
        conn.putrequest("POST", "/v1/recognize")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        block = bytes(range(256)) * 4096   # 1 MiB
        for _ in range(40):
            conn.send(block)
        resp = conn.getresponse()
        got = 0
        while piece := resp.read(1 << 20):
            got += len(piece)
        conn.close()
        assert resp.status == 200 and got == size and peer.body_bytes == [size]
        peak = peak_rss_kib(f.proc.pid)
        print(f"\nfront peak RSS: {before / 1024:.1f} MiB before, {peak / 1024:.1f} MiB after moving 2 x 40 MiB")
        assert peak - before < 16 * 1024 and peak < 60 * 1024



# ------------------------------------------------------------------------- a hostile daemon
CAP = answer_cap(30.0)   # the front's bound for the default max_seconds (the fronts here read no config file)


def _endless(conn: socket.socket, head_text: str, piece: bytes = b"x" * 65536) -> None:
    """Send `head_text`, then `piece` for ever (until the front closes its end)."""
    conn.sendall(head_text.encode())
    while True:
        conn.sendall(piece)


def _drip(conn: socket.socket, length: int, fast: int) -> None:
    """Announce `length` bytes, send `fast` of them at once, then one byte every 0.2 s."""
    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
    conn.sendall(b"x" * fast)
    for _ in range(length - fast):
        time.sleep(0.2)
        conn.sendall(b"x")


@pytest.mark.parametrize("what, script, needle", [
    ("a length past the cap", lambda c: _endless(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                                    f"Content-Length: {CAP + 1}\r\n\r\n"),
     f"announces {CAP + 1} bytes"),
    ("an absurd length", lambda c: _endless(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                              f"Content-Length: {10 ** 40}\r\n\r\n"), f"more than the {CAP}"),
    ("an endless chunked body", lambda c: _endless(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                                      "Transfer-Encoding: chunked\r\n\r\n", b"4\r\nxxxx\r\n"),
     "Transfer-Encoding 'chunked'"),
    ("a small answer that drips", lambda c: _drip(c, 200, 10), "did not arrive within 1 s"),
], ids=["past-the-cap", "absurd-length", "endless-chunked", "small-drip"])
def test_a_daemon_answer_past_the_fronts_bounds_is_502_and_the_front_keeps_serving(work, what, script, needle):
    with HostilePeer(work / "hostile.sock", script) as peer, FrontProcess(peer.path, work, daemon_timeout=1) as f:
        t0 = time.monotonic()
        status, headers, data = f.request("POST", "/v1/recognize?granularity=frame&embedding=1", GOOD, timeout=30)
        err = json.loads(data)["error"]
        assert (status, err["code"]) == (502, "daemon_bad_answer"), (what, err)
        assert needle in err["message"], err["message"]
        assert time.monotonic() - t0 < 20
        assert int(headers["content-length"]) == len(data) < 1000, "none of the daemon's bytes went to the browser"
        assert f.request("GET", "/")[0] == 200, "the front keeps serving"
        peer.script = lambda c: c.sendall(json_answer({"status": "ready"}))
        assert f.json("GET", "/v1/health") == (200, {"status": "ready"}), "and forwarding"
        _await_log(f, "/v1/recognize -> 502 daemon_bad_answer")


def test_a_large_answer_that_drips_after_its_head_is_cut_short_and_the_front_keeps_serving(work):
    """Past SMALL_ANSWER_BYTES the answer streams, so its head has gone out: the browser's
    connection is closed with the body short, the request logged with daemon_bad_answer."""
    length = 4 * SMALL_ANSWER_BYTES
    with HostilePeer(work / "drip.sock", lambda c: _drip(c, length, 2 * SMALL_ANSWER_BYTES)) as peer, \
            FrontProcess(peer.path, work, daemon_timeout=1) as f:
        conn = f.connection(30)
        t0 = time.monotonic()
        conn.request("GET", "/v1/status")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == length
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        conn.close()
        assert 2 * SMALL_ANSWER_BYTES <= len(cut.value.partial) < length and time.monotonic() - t0 < 20
        peer.script = lambda c: c.sendall(json_answer({"status": "ready"}))
        assert f.json("GET", "/v1/health") == (200, {"status": "ready"}), "the front keeps serving"
        _await_log(f, "GET /v1/status -> 200 daemon_bad_answer")


def _answer_of(length: int) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        conn.sendall(b"x" * length)
    return script


def test_the_cap_follows_the_configured_max_seconds(work):
    """max_seconds = 1 in the config file the front reads: an answer of exactly answer_cap(1)
    bytes is relayed whole, one byte more is 502 before any of it goes out."""
    conf = work / "one-second.toml"
    conf.write_text("max_seconds = 1\n")
    cap = answer_cap(1.0)
    with HostilePeer(work / "cap.sock", _answer_of(cap)) as peer, \
            FrontProcess(peer.path, work, env={"E2VD_CONFIG": str(conf)}) as f:
        status, headers, data = f.request("POST", "/v1/recognize?granularity=frame&embedding=1", GOOD)
        assert status == 200 and len(data) == int(headers["content-length"]) == cap
        peer.script = _answer_of(cap + 1)
        status, err = f.json("POST", "/v1/recognize?granularity=frame&embedding=1", GOOD)
        assert (status, err["error"]["code"]) == (502, "daemon_bad_answer")
        message = err["error"]["message"]
        assert f"announces {cap + 1} bytes" in message and f"more than the {cap}" in message


def _await_log(front: FrontProcess, needle: str) -> None:
    """Wait (10 s at most) for `needle` in the front's log: it logs a request after answering it."""
    deadline = time.monotonic() + 10
    while needle not in front.log_text():
        assert time.monotonic() < deadline, front.log_text()
        time.sleep(0.05)


def test_the_cap_holds_the_largest_legitimate_answer():
    """The cap holds the largest legitimate answer: frame embeddings of the large model's 1024
    floats for max_seconds of audio, each float as long as the daemon's JSON writes one."""
    import math
    rows = math.ceil(30.0 * 50) + 1
    worst = json.dumps({"embedding": [[-1.1754943508222875e-38] * 1024] * rows, "labels": ["x" * 40] * 9,
                        "scores": [0.1] * 9}, separators=(",", ":"))
    assert len(worst) < CAP < 2 * len(worst)


# ------------------------------------------------------------------------- hostile input
@pytest.mark.parametrize("what, lines, needle", MALFORMED_HEADS, ids=[m[0] for m in MALFORMED_HEADS])
def test_the_daemons_malformed_header_corpus_is_400_and_never_forwarded(front, what, lines, needle):
    smuggled = b"GET /v1/status HTTP/1.1\r\n\r\n"
    data = f"POST /v1/recognize HTTP/1.1\r\nHost: {host(front)}\r\n".encode() + lines + b"\r\n\r\n" + smuggled
    status, headers, body, closed = exchange(front, data)
    assert status == 400 and body["error"]["code"] == "bad_request" and needle in body["error"]["message"], body
    assert headers["connection"] == "close" and closed


HOSTILE = [
    ("no HTTP version", b"GET /\r\n\r\n", 400, "bad_request"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", 400, "bad_request"),
    ("request line too long", None, 414, "uri_too_long"),
    ("header line too long", None, 431, "header_too_large"),
    ("too many header lines", None, 431, "header_too_large"),
    ("chunked upload", "chunked", 411, "length_required"),
    ("POST without Content-Length", "nolength", 411, "length_required"),
    ("Content-Length over max_body_bytes", "huge", 413, "too_large"),
    ("Content-Length of 5000 digits", "digits", 413, "too_large"),
    ("unknown method", "BREW", 501, "not_implemented"),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("another Host (DNS rebinding)", "rebind", 403, "forbidden"),
    ("a POST from another web site", "origin", 403, "forbidden"),
    ("a cross-site fetch of the badge", "fetchsite", 403, "forbidden"),
    ("Host twice, ours first", "twohosts", 400, "bad_request"),
    ("Origin twice, ours first", "twoorigins", 400, "bad_request"),
    ("Sec-Fetch-Site twice", "twosites", 400, "bad_request"),
    ("absolute-form naming another host", "absolute", 403, "forbidden"),
    ("a host name ending in ours", "suffix", 403, "forbidden"),
]


def _hostile(front: FrontProcess, kind: object) -> bytes:
    h = host(front)
    if isinstance(kind, bytes):
        return kind
    return {
        "request line too long": head("GET", "/" + "a" * MAX_LINE_BYTES, host=h),
        "header line too long": head("GET", "/", "X-A: " + "a" * MAX_LINE_BYTES, host=h),
        "too many header lines": head("GET", "/", *[f"X-{i}: 1" for i in range(MAX_HEADERS + 1)], host=h),
        "chunked": head("POST", "/v1/recognize", "Transfer-Encoding: chunked", host=h) + b"0\r\n\r\n",
        "nolength": head("POST", "/v1/recognize", host=h),
        "huge": head("POST", "/v1/recognize", "Content-Length: 1000000000", host=h),
        "digits": head("POST", "/v1/recognize", "Content-Length: " + "9" * 5000, host=h),
        "BREW": head("BREW", "/v1/status", host=h),
        "rebind": head("GET", "/web/status", host=f"evil.example:{front.port}"),
        "origin": head("POST", "/v1/warmup", "Origin: http://evil.example", "Content-Length: 0", host=h),
        "fetchsite": head("GET", "/web/status", "Sec-Fetch-Site: cross-site", host=h),
        "twohosts": head("GET", "/v1/health", f"Host: evil.example:{front.port}", host=h),
        "twoorigins": head("POST", "/v1/warmup", f"Origin: http://{h}", "Origin: http://evil.example",
                           "Content-Length: 0", host=h),
        "twosites": head("GET", "/v1/health", "Sec-Fetch-Site: same-origin", "Sec-Fetch-Site: cross-site", host=h),
        "absolute": head("GET", f"http://evil.example:{front.port}/v1/health", host=h),
        "suffix": head("GET", "/v1/health", host=f"127.0.0.1.evil.example:{front.port}"),
    }[kind]  # type: ignore[index]


@pytest.mark.parametrize("what, kind, status, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_clear_4xx_and_the_front_keeps_serving(front, daemon, what, kind, status, code):
    data = _hostile(front, {"request line too long": "request line too long", "header line too long":
                            "header line too long", "too many header lines": "too many header lines"}.get(what, kind))
    got, _, body, _ = exchange(front, data)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]
    assert front.request("GET", "/")[0] == 200


def test_a_lying_content_length_and_a_slow_upload_get_408_within_the_request_timeout(front):
    h = host(front)
    t0 = time.monotonic()
    status, _, body, closed = exchange(front, head("POST", "/v1/recognize", "Content-Length: 100000", host=h) + GOOD[:10])
    took = time.monotonic() - t0
    assert (status, body["error"]["code"], closed) == (408, "timeout", True), body
    assert "got 10 of 100000 bytes" in body["error"]["message"]
    assert REQUEST_TIMEOUT - 0.5 < took < REQUEST_TIMEOUT + 5

    def trickle(s: socket.socket) -> None:   # one byte every 0.2 s: never silent, never done
        for byte in GOOD[:60]:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    t0 = time.monotonic()
    status, _, body, _ = exchange(front, head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}", host=h), trickle)
    assert (status, body["error"]["code"]) == (408, "timeout")
    assert time.monotonic() - t0 < REQUEST_TIMEOUT + 15
    t0 = time.monotonic()
    status, _, body, _ = exchange(front, b"GET /web/sta", lambda s: None)   # stops in the request line
    assert (status, body["error"]["code"]) == (408, "timeout") and time.monotonic() - t0 < REQUEST_TIMEOUT + 5
    # a body that ends early (the client half-closes) is a clear 400
    status, _, body, _ = exchange(front, head("POST", "/v1/recognize", "Content-Length: 100", host=h) + b"x" * 10,
                                  lambda s: s.shutdown(socket.SHUT_WR))
    assert (status, body["error"]["code"]) == (400, "bad_request") and "10 of 100" in body["error"]["message"]
    assert front.request("GET", "/")[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(front):
    conn = front.connection()
    for path in ("/", "/web/status", "/"):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and not resp.will_close
        resp.read()
    conn.close()


# ------------------------------------------------------------------------- the process
def test_the_front_exits_after_its_idle_timeout_and_is_started_again(work):
    with FrontProcess(work / "none.sock", work, idle_timeout=1, request_timeout=2) as f:
        conn = f.connection()
        conn.request("GET", "/")
        conn.getresponse().read()      # a kept-open connection holds it up ...
        time.sleep(1.5)
        assert f.proc.poll() is None
        assert f.proc.wait(15) == 0    # ... until the front closes it (request timeout), then 1 s idle
        conn.close()
        assert "idle_exit" in f.log_text()
        f.spawn()                      # the socket is still there: what systemd does on the next connection
        assert f.request("GET", "/")[0] == 200


def test_a_non_loopback_socket_is_refused_without_public(work):
    with FrontProcess(work / "none.sock", work, host="0.0.0.0") as f:
        assert f.proc.wait(15) == 2
        assert "--public" in f.log_text() and "every local user" in f.log_text()
    cp = subprocess.run([sys.executable, "-m", "e2vd", "web", "--listen", "0.0.0.0:7999"], capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 2 and "--public" in cp.stderr


def test_too_many_connections_get_503_busy(work):
    with FrontProcess(work / "none.sock", work, extra=["--max-connections", "2"]) as f:
        held = [socket.create_connection(("127.0.0.1", f.port)) for _ in range(2)]
        try:   # accepted in order: the third connection finds two open
            status, headers, body, _ = exchange(f, head("GET", "/", host=host(f)))
            assert (status, body["error"]["code"], headers["retry-after"]) == (503, "busy", "1")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 20   # the front notices the two closes on its own schedule
        while f.request("GET", "/")[0] != 200:
            assert time.monotonic() < deadline, "the front did not serve again after the held connections closed"
            time.sleep(0.1)


# ------------------------------------------------------------------------- helpers
def _wait_serving(front: FrontProcess) -> int:
    assert front.request("GET", "/")[0] == 200
    assert "web" in cmdline(front.proc.pid)
    return front.proc.pid


class UnixPeer:
    """A stand-in daemon listening on a real Unix socket at `path` while in a `with` block: each
    accepted connection goes to `_accepted` (by default `_one(conn)` on a thread of its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._held: list[socket.socket] = []

    def __enter__(self):
        self.path.unlink(missing_ok=True)
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in self._held:
            s.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def read_head(conn: socket.socket) -> tuple[bytes, bytes] | None:
        """A request's head (without the blank line) and the body bytes read with it; None if the
        peer closed first."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            piece = conn.recv(65536)
            if not piece:
                return None
            buf += piece
        head_bytes, body = buf.split(b"\r\n\r\n", 1)
        return head_bytes, body


class RecordingPeer(UnixPeer):
    """A stand-in daemon on a Unix socket. mode "sink": reads each request's head and body (in
    pieces) and answers 200 with `answer_bytes` of JSON (or {"ok": true, "got": N}); "silent":
    accepts and never answers; "hangup": reads the head and closes."""

    def __init__(self, path: Path, mode: str = "sink", answer_bytes: int = 0) -> None:
        super().__init__(path)
        self.mode, self.answer_bytes = mode, answer_bytes
        self.heads: list[bytes] = []
        self.body_bytes: list[int] = []

    def _accepted(self, conn: socket.socket) -> None:
        if self.mode == "silent":
            self._held.append(conn)
        else:
            super()._accepted(conn)

    def _one(self, conn: socket.socket) -> None:
        with conn:
            read = self.read_head(conn)
            if read is None:
                return
            head_bytes, body = read
            self.heads.append(head_bytes)
            if self.mode == "hangup":
                return
            m = re.search(rb"\r\nContent-Length: (\d+)", head_bytes)
            length, got = (int(m[1]) if m else 0), len(body)
            while got < length:
                piece = conn.recv(1 << 16)
                if not piece:
                    break
                got += len(piece)
            self.body_bytes.append(got)
            if self.answer_bytes:
                payload = b'{"pad": "' + b"x" * (self.answer_bytes - 11) + b'"}'
            else:
                payload = json.dumps({"ok": True, "got": got}).encode()
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                         "Connection: close\r\n\r\n".encode())
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 20):
                conn.sendall(view[i:i + (1 << 20)])


class HostilePeer(UnixPeer):
    """A stand-in daemon on a real Unix socket that reads each request (head and body) and runs
    `script(conn)` to answer it, one thread a connection; `script` may be changed between requests."""

    def __init__(self, path: Path, script: Callable[[socket.socket], None]) -> None:
        super().__init__(path)
        self.script = script

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                read = self.read_head(conn)
                if read is None:
                    return
                head_bytes, body = read
                m = re.search(rb"\r\nContent-Length: (\d+)", head_bytes)
                left = (int(m[1]) if m else 0) - len(body)
                while left > 0:
                    piece = conn.recv(min(left, 65536))
                    if not piece:
                        return
                    left -= len(piece)
                self.script(conn)
            except OSError:
                pass   # the front closed its end: what a hostile answer should come to
