"""e2vd.server against a real daemon on the tiny stand-in: request parsing, framing, error statuses,
abandoned requests and what reaches the log. Raw bytes on real Unix sockets, no mocks.

One shared daemon (connection_timeout 2 s, max_seconds 5, so the timeout and too_long paths stay
quick) serves most tests; tests that stop the daemon's process start their own.
"""
from __future__ import annotations

import re
import socket
import time
from typing import Any

import pytest
from conftest import wav_clip
from daemon_proc import DaemonProcess, raw_request, read_response

from e2vd.client import connect_unix

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
