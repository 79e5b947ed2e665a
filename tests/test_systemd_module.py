"""e2vd.systemd against a fake notify socket (in-process) and real inherited fds (subprocesses).

LISTEN_FDS tests run in a child process: sd_listen_fds(3) takes fds from 3 on, which in this
process belong to pytest.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_notify import FakeNotify

from e2vd import systemd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(tmp_path, monkeypatch):
    with FakeNotify(tmp_path / "notify") as f:
        monkeypatch.setenv("NOTIFY_SOCKET", f.path)
        yield f


def test_without_a_notify_socket_every_call_is_a_quiet_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready("x") is False
    assert systemd.status("x") is False
    assert systemd.extend_timeout(30) is False
    assert systemd.stopping("x") is False


def test_an_unreachable_notify_socket_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.status("x") is False
    assert systemd.ready("x") is False


def test_messages(fake):
    assert systemd.status("Loading model m") is True
    assert systemd.extend_timeout(30) is True
    assert systemd.stopping("Idle exit after 3 request(s)") is True
    fake.wait_for("STOPPING=1")
    assert fake.messages == ["STATUS=Loading model m", "EXTEND_TIMEOUT_USEC=30000000",
                             "STOPPING=1\nSTATUS=Idle exit after 3 request(s)"]


def test_ready_sends_ready_then_a_barrier_and_returns_once_systemd_has_read_it(fake):
    assert systemd.ready("Ready on cpu") is True
    assert fake.messages == ["READY=1\nSTATUS=Ready on cpu", "BARRIER=1"]


def test_ready_waits_until_systemd_has_processed_ready(tmp_path, monkeypatch):
    with FakeNotify(tmp_path / "slow", hold_fds=True) as slow:   # a systemd that is busy elsewhere
        monkeypatch.setenv("NOTIFY_SOCKET", slow.path)
        done = threading.Event()
        result: list[bool] = []
        t = threading.Thread(target=lambda: (result.append(systemd.ready()), done.set()))
        t.start()
        slow.wait_for("BARRIER=1")
        assert len(slow.held) == 1                   # the pipe's write end travelled with it
        assert not done.wait(0.3), "ready() returned before systemd had processed READY=1"
        slow.release()                               # systemd closes the fd: everything before it is processed
        assert done.wait(10) and result == [True]
        t.join()


def test_ready_gives_up_on_a_barrier_that_never_comes(tmp_path, monkeypatch):
    with FakeNotify(tmp_path / "stuck", hold_fds=True) as stuck:
        monkeypatch.setenv("NOTIFY_SOCKET", stuck.path)
        assert systemd.ready("x", barrier_timeout=0.05) is False
        assert stuck.messages[0] == "READY=1\nSTATUS=x"     # READY=1 itself was sent


# --- the watchdog -------------------------------------------------------------------------------

@pytest.mark.parametrize("usec, pid, interval", [
    ("30000000", None, 15.0),          # WatchdogSec=30: ping every 15 s
    ("30000000", "self", 15.0),
    ("30000000", "1", None),           # inherited from a parent that systemd watches
    ("0", None, None), ("", None, None), ("soon", None, None),
])
def test_watchdog_interval_is_half_of_watchdogsec_for_this_process_only(monkeypatch, usec, pid, interval):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval() == interval


def test_without_watchdog_usec_nobody_watches(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None


def test_watchdog_ping_and_trigger(fake):
    assert systemd.watchdog_ping() is True
    assert systemd.watchdog_trigger("Stuck: job 3") is True      # returns once systemd has acted on it
    assert fake.messages == ["WATCHDOG=1", "WATCHDOG=trigger\nSTATUS=Stuck: job 3", "BARRIER=1"]


def test_watchdog_calls_outside_systemd_are_quiet_no_ops(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.watchdog_ping() is False and systemd.watchdog_trigger("x") is False


def test_booted_is_sd_booted(monkeypatch):
    """sd_booted(3): systemd is PID 1 when /run/systemd/system exists (not on this test machine
    necessarily; the answer must agree with the file system either way)."""
    assert systemd.booted() is os.path.isdir("/run/systemd/system")


# --- listen_socket -----------------------------------------------------------------------------

CHILD = r"""
import json, os, socket, sys
from e2vd import systemd
from e2vd.log import setup_logging
setup_logging("DEBUG", journald=False)
kinds = sys.argv[1].split(",")            # what to put on fds 3, 4, ...: listen | dgram | pipe
keep = []
for i, kind in enumerate(kinds):
    if kind == "listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sys.argv[2] + str(i)); s.listen(4); fd = s.fileno()
    elif kind == "dgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); fd = s.fileno()
    else:
        fd, w = os.pipe(); s = None
    keep.append(s)
    os.dup2(fd, 3 + i)
os.environ["LISTEN_FDS"] = str(len(kinds))
os.environ["LISTEN_FDNAMES"] = ":".join(kinds)
os.environ["LISTEN_PID"] = sys.argv[3] if len(sys.argv) > 3 else str(os.getpid())
try:
    sock = systemd.listen_socket()
    out = {"fd": None if sock is None else sock.fileno(),
           "name": None if sock is None else sock.getsockname()}
except systemd.SocketError as exc:
    out = {"error": str(exc)}
out["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps(out))
"""


def child(tmp_path: Path, kinds: str, listen_pid: str | None = None) -> tuple[dict, str]:
    argv = [sys.executable, "-c", CHILD, kinds, str(tmp_path / "s")] + ([listen_pid] if listen_pid else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
    env["PYTHONPATH"] = str(ROOT)
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.splitlines()[-1]), cp.stderr


def test_no_listen_pid_means_no_socket(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert systemd.listen_socket() is None


def test_listen_pid_of_another_process_is_ignored_and_unset(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "e2vd.socket")
    assert systemd.listen_socket() is None
    assert not [k for k in os.environ if k.startswith("LISTEN_")], "children must not inherit them"
    assert any(getattr(r, "e2vd_event", None) == "socket_ignored" and "LISTEN_PID=1" in r.getMessage()
               for r in caplog.records)


def test_the_passed_listening_socket_is_taken_and_the_variables_unset(tmp_path):
    out, _ = child(tmp_path, "listen")
    assert out == {"fd": 3, "name": str(tmp_path / "s0"), "env": []}


def test_the_first_listening_stream_socket_wins_and_the_others_are_named(tmp_path):
    out, log = child(tmp_path, "dgram,listen")
    assert out == {"fd": 4, "name": str(tmp_path / "s1"), "env": []}
    assert "event=socket_extra" in log and "ignoring [3]" in log


def test_passed_fds_without_a_listening_stream_socket_are_an_error(tmp_path):
    out, _ = child(tmp_path, "pipe,dgram")
    assert "none is a listening Unix stream socket" in out["error"] and "Accept=no" in out["error"]
    assert out["env"] == []


def test_in_a_child_with_a_stale_listen_pid_nothing_is_taken(tmp_path):
    out, log = child(tmp_path, "listen", listen_pid="1")
    assert out == {"fd": None, "name": None, "env": []}
    assert "event=socket_ignored" in log
