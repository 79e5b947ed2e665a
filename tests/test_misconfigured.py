"""e2vd.misconfigured in-process: a real listening socket that this test holds like systemd does
(a dup of it stays open after the daemon closes its own fd), a FakeNotify for the notify socket,
a clock moved by hand for the grace period, and real signals. Nothing sleeps to synchronise.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest
from daemon_proc import http_request, raw_request, read_response
from fake_notify import FakeNotify

from e2vd.client import connect_unix
from e2vd.config import ConfigError, load_settings
from e2vd.daemon import Listener
from e2vd.misconfigured import Misconfigured

TYPO = "idle_timeot = 30\n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Box:
    """A Misconfigured on a socket this test holds, run on the main thread while `body` drives it."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grace: float = 60.0) -> None:
        self.config = tmp_path / "e2vd.toml"
        self.config.write_text(TYPO)
        self.path = str(tmp_path / "s.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(16)
        self.systemd_copy = sock.dup()              # what systemd keeps after the daemon closes its fd
        self.notify = FakeNotify(tmp_path / "notify")
        monkeypatch.setenv("NOTIFY_SOCKET", self.notify.path)
        self.clock = Clock()
        try:
            self.settings_now()
        except ConfigError as err:
            error = err
        self.m = Misconfigured(Listener(sock, self.path, from_systemd=True), error, self.settings_now,
                               grace=grace, clock=self.clock)

    def settings_now(self):
        return load_settings(env={}, config_path=str(self.config))

    def run(self, body: Callable[["Box"], None]) -> int:
        failures: list[BaseException] = []

        def drive() -> None:
            try:
                body(self)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failures.append(exc)
                self.m._signals.append(signal.SIGTERM)
                self.m._waiter.wake()

        driver = threading.Thread(target=drive)
        driver.start()
        code = self.m.run()
        driver.join(60)
        if failures:
            raise failures[0]
        return code

    def left_in_backlog(self) -> bytes:
        """The first bytes of the connection waiting in the socket systemd keeps (nobody accepted it)."""
        self.systemd_copy.settimeout(10)
        conn, _ = self.systemd_copy.accept()
        with conn:
            return conn.recv(100)

    def close(self) -> None:
        self.systemd_copy.close()
        self.notify.close()


@pytest.fixture
def box(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    made: list[Box] = []

    def make(**kw) -> Box:
        made.append(Box(tmp_path, monkeypatch, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def events(caplog) -> list[tuple[str, dict]]:
    return [(r.e2vd_event, r.e2vd_fields) for r in caplog.records if getattr(r, "e2vd_event", None)]


def test_every_request_gets_503_config_invalid_naming_file_key_and_fix(box, caplog):
    b = box(grace=60)
    answers: list = []

    def body(b: Box) -> None:
        b.notify.wait_for("STATUS=Settings unusable")
        answers.append(http_request(b.path, "GET", "/v1/health"))
        answers.append(http_request(b.path, "POST", "/v1/recognize", b"x" * 300_000))   # a body it never reads
        with connect_unix(b.path, 30) as s:
            s.sendall(b"HEAD /v1/status HTTP/1.1\r\nHost: e2vd\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)
        b.clock.now += 60                                  # the grace ends
        b.m._waiter.wake()

    assert b.run(body) == 2
    for status, headers, doc in answers[:2]:
        assert status == 503 and headers["connection"] == "close"
        assert doc["error"]["code"] == "config_invalid"
        message = doc["error"]["message"]
        assert str(b.config) in message and "unknown key 'idle_timeot'" in message
        assert "did you mean 'idle_timeout'" in message and "e2vd check-config" in message
        assert "no systemctl step" in message
    head, _, rest = answers[2].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and rest == b""     # HEAD: no body
    b.notify.wait_for("STOPPING=1")
    assert b.notify.lines().count("STOPPING=1") == 1 and "READY=1" not in b.notify.lines()
    names = [name for name, _ in events(caplog)]
    assert names == ["config_invalid", "exit_config_invalid"]
    assert events(caplog)[1][1]["refused"] == 3 and events(caplog)[1][1]["grace_seconds"] == 60.0


def test_once_the_file_is_fixed_the_waiting_connection_is_left_for_a_fresh_daemon(box, caplog):
    """No systemctl step: the next connection after the fix makes this daemon exit 0 without
    accepting it; it waits in the socket systemd keeps, for the daemon systemd starts next."""
    b = box()
    late: list[socket.socket] = []

    def body(b: Box) -> None:
        status, _, doc = raw_request(b.path, b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n")
        assert status == 503 and doc["error"]["code"] == "config_invalid"
        b.config.write_text("idle_timeout = 30\n")           # the operator fixes the typo
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(b.path)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n")
        late.append(s)

    try:
        assert b.run(body) == 0
        assert b.left_in_backlog().startswith(b"GET /v1/health")   # nobody took it
    finally:
        for s in late:
            s.close()
    assert [name for name, _ in events(caplog)] == ["config_invalid", "config_fixed"]
    assert b.notify.wait_for("STOPPING=1")[-1] == "STOPPING=1\nSTATUS=Settings fixed: a fresh daemon takes over"


def test_a_client_that_fixes_the_file_and_connects_right_after_a_read_is_not_refused(box, caplog):
    """The race CI hit under load: the daemon reads the (bad) file for one waiting connection, then
    a client fixes the file and connects before the daemon accepts. That connection must wait
    for the fresh daemon, not get the old error: the file is read again before each accept."""
    b = box()
    late: list[socket.socket] = []
    reads = 0

    def read_then_fix():
        nonlocal reads
        reads += 1
        try:
            return b.settings_now()           # the first read sees the typo ...
        finally:
            if reads == 1:                    # ... and right after it the client fixes it and connects
                b.config.write_text("idle_timeout = 30\n")
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(b.path)
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n")
                late.append(s)

    b.m.settings_now = read_then_fix
    first: list = []

    def body(b: Box) -> None:
        first.append(raw_request(b.path, b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n"))
        b.notify.wait_for("STATUS=Settings fixed", timeout=30)   # it hands over (it waited for ever before)

    try:
        assert b.run(body) == 0
        assert first[0][0] == 503 and first[0][2]["error"]["code"] == "config_invalid"
        assert b.left_in_backlog().startswith(b"GET /v1/health")   # the late one waits for the fresh daemon
    finally:
        for s in late:
            s.close()
    assert [name for name, _ in events(caplog)] == ["config_invalid", "config_fixed"]
    assert events(caplog)[1][1]["refused"] == 1


def test_a_different_error_after_an_edit_is_the_one_answered(box):
    b = box()

    def body(b: Box) -> None:
        b.config.write_text("idle_timeout = -5\n")
        status, _, doc = raw_request(b.path, b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n")
        assert status == 503 and "key 'idle_timeout'" in doc["error"]["message"] and ">= 0" in doc["error"]["message"]
        os.kill(os.getpid(), signal.SIGTERM)

    assert b.run(body) == 0


def test_sigterm_ends_it_at_once_with_0(box, caplog):
    b = box()

    def body(b: Box) -> None:
        b.notify.wait_for("STATUS=Settings unusable")
        os.kill(os.getpid(), signal.SIGTERM)

    assert b.run(body) == 0
    assert [name for name, _ in events(caplog)] == ["config_invalid", "stopped"]


def test_a_client_that_writes_first_reads_the_answer(box):
    """The answer leaves before the body is read; the body is read and dropped afterwards, so a
    client that sends everything before it reads still gets the 503 (no EPIPE)."""
    b = box()
    got: list = []

    def body(b: Box) -> None:
        with connect_unix(b.path, 30) as s:
            big = b"x" * 2_000_000
            s.sendall(f"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big)
            got.append(read_response(s))
        os.kill(os.getpid(), signal.SIGTERM)

    assert b.run(body) == 0
    assert got[0][0] == 503 and got[0][2]["error"]["code"] == "config_invalid"
