"""e2vd.server against a real daemon on the tiny stand-in: request parsing, framing, error statuses,
abandoned requests and what reaches the log. Raw bytes on real Unix sockets, no mocks.

One shared daemon (connection_timeout 2 s, max_seconds 5, so the timeout and too_long paths stay
quick) serves most tests; tests that stop the daemon's process start their own.
"""
from __future__ import annotations

import re
import signal
import socket
import threading
import time
from typing import Any

import pytest
from conftest import wav_clip
from daemon_proc import DaemonProcess, raw_request, read_response

from e2vd.client import connect_unix
from e2vd.server import peer_hung_up

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


def wait_for_log(d: DaemonProcess, pattern: bytes, count: int = 1, timeout: float = 60.0) -> list[bytes]:
    """The daemon's stderr lines matching `pattern`, once there are at least `count` of them
    (the request event is written just after the answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in d.log_path.read_bytes().splitlines() if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- the log --------------------------------------------------------------------------------------

def test_control_bytes_from_the_path_are_escaped_on_stderr(daemon):
    status, _, body = raw_request(daemon.socket, head("GET", "/v1/\x1b[31mred\x07\x9b2Jesc-probe"))
    assert status == 404 and body["error"]["code"] == "not_found"
    [line] = wait_for_log(daemon, rb"esc-probe")
    assert not re.search(rb"[\x00-\x1f\x7f]", line), line
    assert "\x9b".encode() not in line, line                 # U+009B (CSI) as UTF-8
    text = line.decode()
    assert r"GET /v1/\x1b[31mred\x07\x9b2Jesc-probe -> 404 not_found" in text, text
    assert r'path="/v1/\x1b[31mred\x07\x9b2Jesc-probe"' in text, text


# --- clients that hang up -------------------------------------------------------------------------

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
