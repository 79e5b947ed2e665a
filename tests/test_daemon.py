"""The daemon: in subprocesses where only a process shows it, in-process where a clock can be moved.

1. One shared daemon subprocess (`python -m e2vd serve`, real Unix socket, tiny stand-in model)
   serves the API tests and the per-uid connection cap (start-up costs seconds here).
2. A few lifecycle tests need a real process (exit code and socket removal after an idle exit,
   a second daemon refused on a live socket, the silent-connection timeout of the real server).
3. The lifecycle itself runs in-process: a `Daemon` on a real bound socket, its clock moved by
   hand (`ManualClock` + `Daemon.look()`), a `FakeEngine` whose inference waits on a gate, a
   loader that waits on another, a `FakeNotify` in place of systemd's notify socket, and real
   signals (os.kill(os.getpid(), SIGTERM)). Nothing sleeps to synchronise.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import write_audio
from daemon_proc import DaemonProcess, http_request, read_response
from fake_notify import FakeNotify

from e2vd.client import connect_unix
from e2vd.config import Settings
from e2vd.daemon import KILL_WAIT_S, Daemon, SocketError, bind_socket, open_listener
from e2vd.lifecycle import Reason
from e2vd.result import Recognition

LABELS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return write_audio(tmp_path_factory.mktemp("audio") / "clip.wav", seconds=1.0).read_bytes()


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    sock = tmp_path_factory.mktemp("d") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, idle_timeout=600, max_hold=100, connection_timeout=20) as d:
        first = d.request("GET", "/v1/health")
        d.first_health = first
        d.wait_ready_state()
        yield d


def check_result(result: dict, model: str, frame: bool = False) -> None:
    assert result["labels"] == LABELS
    assert len(result["scores"]) == 9 and math.isclose(sum(result["scores"]), 1.0, rel_tol=1e-4)
    best = max(range(9), key=lambda i: result["scores"][i])
    assert result["top"] == {"label": LABELS[best], "score": result["scores"][best]}
    assert len(result["model_labels"]) == 9 and result["model_labels"][0].endswith("angry")
    assert result["model"] == model
    assert set(result["timing_ms"]) == {"queue", "infer"}
    assert all(v >= 0 for v in result["timing_ms"].values())


def test_health_answers_while_loading(daemon):
    status, _, body = daemon.first_health
    assert status == 200 and body == {"status": "loading"}
    assert daemon.request("GET", "/v1/health")[2] == {"status": "ready"}


def test_recognize_over_http_client(daemon, clip, tiny_model):
    status, headers, result = daemon.request("POST", "/v1/recognize", clip)
    assert status == 200, result
    assert headers["content-type"] == "application/json"
    check_result(result, str(tiny_model))
    assert result["duration_s"] == pytest.approx(1.0, abs=1e-3)
    assert "embedding" not in result


def test_recognize_with_curl(daemon, clip, tiny_model, tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(clip)
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.socket), "--data-binary", f"@{wav}",
                          "http://e2vd/v1/recognize"], capture_output=True, check=True, timeout=60)
    result = json.loads(out.stdout)
    check_result(result, str(tiny_model))
    same = daemon.request("POST", "/v1/recognize", clip)[2]
    assert result["scores"] == same["scores"]


def test_large_upload_with_curl_expect_100_continue(daemon, tmp_path):
    """curl sends big bodies with Expect: 100-continue; the daemon must accept any allowed size."""
    import soundfile as sf
    from conftest import speechlike

    wav = tmp_path / "big.wav"
    sf.write(str(wav), speechlike(20.0, sr=44100, channels=2), 44100, subtype="FLOAT")   # ~7 MB
    assert wav.stat().st_size > 5_000_000
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.socket), "-H", "Expect: 100-continue",
                          "--data-binary", f"@{wav}", "-w", "\n%{http_code}", "http://e2vd/v1/recognize"],
                         capture_output=True, text=True, check=True, timeout=120)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200", body
    assert json.loads(body)["duration_s"] == pytest.approx(20.0, abs=1e-3)


def test_frame_embedding(daemon, clip):
    status, _, result = daemon.request("POST", "/v1/recognize?granularity=frame&embedding=1", clip)
    assert status == 200, result
    emb = result["embedding"]
    assert len(emb) == pytest.approx(50, abs=2) and len(emb[0]) > 1   # 50 Hz frames x D
    status, _, utt = daemon.request("POST", "/v1/recognize?embedding=1", clip)
    assert len(utt["embedding"]) == len(emb[0])


def test_keep_alive_serves_several_requests_on_one_connection(daemon, clip):
    conn = daemon.connection()
    try:
        for _ in range(3):
            conn.request("POST", "/v1/recognize", body=clip)
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["labels"] == LABELS
        conn.request("GET", "/v1/status")
        resp = conn.getresponse()
        assert json.loads(resp.read())["connections"] >= 1
    finally:
        conn.close()


def test_concurrent_requests_are_all_answered_alike(daemon, tmp_path):
    clips = [write_audio(tmp_path / f"{i}.wav", seconds=1.0, seed=i % 2).read_bytes() for i in range(6)]
    results: list = [None] * len(clips)

    def one(i: int) -> None:
        results[i] = daemon.request("POST", "/v1/recognize", clips[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r[0] == 200 for r in results), results
    alone = daemon.request("POST", "/v1/recognize", clips[0])[2]
    for r in results[0::2]:   # same seed as clips[0]: batched or not, the same scores
        assert r[2]["scores"] == pytest.approx(alone["scores"], abs=1e-5)


def test_status(daemon, tiny_model):
    status, _, st = daemon.request("GET", "/v1/status")
    assert status == 200
    assert st["state"] == "ready" and st["model"] == str(tiny_model) and st["device"] == "cpu"
    assert st["dtype"] == "fp32" and st["memory"]["param_bytes"] > 0
    assert st["queue_depth"] == 0 and st["requests_served"] >= 1 and st["uptime_s"] > 0
    assert st["idle_timeout_s"] == 600 and st["idle_exit_in_s"] > 500
    assert st["idle_deadline"] == pytest.approx(time.time() + st["idle_exit_in_s"], abs=5)
    assert st["socket_activated"] is False and st["pid"] == daemon.proc.pid
    assert st["fallback"] is None   # no fallback_model: tests/test_fallback.py has the other states


def test_warmup_hold_is_capped_by_max_hold(daemon):
    status, _, body = daemon.request("POST", "/v1/warmup?hold=30")
    assert status == 200 and body["status"] == "ready" and body["hold_s"] == 30
    assert body["keep_warm_deadline"] == pytest.approx(time.time() + 30, abs=5)
    st = daemon.request("GET", "/v1/status")[2]
    assert st["keep_warm_deadline"] == pytest.approx(body["keep_warm_deadline"], abs=0.01)
    assert st["idle_exit_in_s"] >= 30 + 600 - 5
    status, _, body = daemon.request("POST", "/v1/warmup?hold=1e9")
    assert status == 200 and body["hold_s"] == 100   # max_hold


def test_openapi_document(daemon):
    status, _, doc = daemon.request("GET", "/v1/openapi.json")
    assert status == 200 and set(doc["paths"]) == {"/v1/recognize", "/v1/health", "/v1/status",
                                                    "/v1/warmup", "/v1/openapi.json"}


def test_second_daemon_on_a_live_socket_is_refused(daemon, tiny_model):
    env = DaemonProcess(daemon.socket, tiny_model).environment()
    out = subprocess.run(DaemonProcess(daemon.socket, tiny_model).command(), env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 5
    assert "already listening" in out.stderr
    assert daemon.request("GET", "/v1/health")[0] == 200


def test_socket_mode(daemon):
    assert daemon.socket.stat().st_mode & 0o777 == 0o660


HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: e2vd\r\n\r\n"
STATUS = b"GET /v1/status HTTP/1.1\r\nHost: e2vd\r\n\r\n"


def test_one_uid_may_hold_max_connections_per_uid_and_no_more(daemon):
    """32 connections of one uid are served; the 33rd gets 503 busy naming the setting."""
    held = [connect_unix(str(daemon.socket), 30)]
    try:
        deadline = time.monotonic() + 10
        while True:   # until earlier tests' connections are gone: this one is the only one open
            held[0].sendall(STATUS)
            if read_response(held[0])[2]["connections"] == 1:
                break
            assert time.monotonic() < deadline, "earlier connections stay open"
            time.sleep(0.05)
        held += [connect_unix(str(daemon.socket), 30) for _ in range(31)]
        for s in held:                                       # each one is accepted and served
            s.sendall(HEALTH)
            assert read_response(s)[0] == 200
        with connect_unix(str(daemon.socket), 30) as extra:   # answered at once, before any request
            status, headers, body = read_response(extra)
        assert status == 503 and body["error"]["code"] == "busy" and int(headers["retry-after"]) >= 1
        message = body["error"]["message"]
        assert f"uid {os.getuid()}" in message and "max_connections_per_uid = 32" in message, message
        for s in held[::8]:                                  # the 32 are still served
            s.sendall(HEALTH)
            assert read_response(s)[0] == 200
    finally:
        for s in held:
            s.close()


# --- lifecycle in subprocesses: what only a process shows ----------------------------------------

def test_idle_exit_after_timeout(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=1, wait_ready=True)
    with d:
        assert d.wait(60) == 0
    assert not d.socket.exists()          # we bound it, so we removed it
    log = d.log_text()
    assert log.count("event=idle_exit") == 1 and "event=stopped" not in log
    assert log.count("event=model_loaded") == 1 and log.count("event=start ") == 1
    # each event once: the engine's and NVML's own lines do not repeat model_loaded/device_chosen
    assert [line for line in log.splitlines() if " loaded " in line and "event=model_loaded" not in line] == []
    assert "No GPU:" not in log and log.count("event=device_chosen") <= 1


def test_silent_connection_is_closed_after_connection_timeout(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=600, connection_timeout=1, wait_ready=True)
    with d:
        with connect_unix(str(d.socket), 30) as s:
            assert s.recv(100) == b""      # closed by the daemon, not by our timeout
        deadline = time.monotonic() + 10
        while d.request("GET", "/v1/status")[2]["connections"] != 1:   # just the status request
            assert time.monotonic() < deadline
            time.sleep(0.05)


# --- binding the socket ----------------------------------------------------------------------------

def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()                          # the file stays; nothing listens
    sock = bind_socket(str(path))
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        with connect_unix(str(path), 5):
            pass
    finally:
        sock.close()


def test_live_socket_and_non_socket_files_are_refused(tmp_path):
    live = tmp_path / "live.sock"
    first = bind_socket(str(live))
    try:
        with pytest.raises(SocketError, match="already listening"):
            bind_socket(str(live))
    finally:
        first.close()
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(SocketError, match="not a socket"):
        bind_socket(str(plain))
    assert plain.read_text() == "not a socket"
    with pytest.raises(SocketError, match="does not exist"):
        bind_socket(str(tmp_path / "no-such-dir" / "s.sock"))


# --- the lifecycle in-process ----------------------------------------------------------------------

T0 = 1000.0   # where a ManualClock starts


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEngine:
    """Stands in for e2vd.engine.Engine: equal scores for every clip; inference waits on `gate`."""

    model_id, device, dtype, load_seconds, model_dir, quantized = "fake/model", "cpu", "fp32", 0.25, None, False

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def recognize_batch(self, audios: list, granularity: str = "utterance", embedding: bool = False) -> list:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the inference gate"
        return [Recognition(list(LABELS), [1.0 / 9] * 9, [f"m/{x}" for x in LABELS], a.duration_s) for a in audios]

    def memory(self) -> dict[str, int]:
        return {"param_bytes": 1000}


@dataclasses.dataclass
class InProcess:
    """A Daemon built for one test; `run(body)` serves on this thread while `body(self)` drives it."""

    daemon: Daemon
    clock: ManualClock
    engine: FakeEngine
    notify: FakeNotify
    socket: str
    load_gate: threading.Event

    def run(self, body: Callable[["InProcess"], None], timeout: float = 60.0) -> int:
        """The daemon's exit code. It must exit by itself within `timeout` s of body's end (else
        it is stopped and the test fails); what body raised is raised here."""
        assert threading.current_thread() is threading.main_thread(), "signals need the main thread"
        failures: list[BaseException] = []
        exited = threading.Event()

        def drive() -> None:
            try:
                body(self)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                failures.append(exc)
            if not exited.wait(0 if failures else timeout):
                if not failures:
                    failures.append(AssertionError(f"the daemon did not exit within {timeout} s of the test's end"))
                self.daemon._on_signal(signal.SIGTERM, None)   # stop it (no real signal: it may be exiting)
                self.clock.advance(1e9)                        # past any drain deadline
                self.engine.gate.set()
                self.load_gate.set()
                self.daemon.wake()

        driver = threading.Thread(target=drive, name="test-driver")
        driver.start()
        try:
            code = self.daemon.run()
        finally:
            exited.set()
            driver.join(timeout)
        if failures:
            raise failures[0]
        # every way out says so (the datagram may still be in flight); stuck says it to the watchdog
        self.notify.wait_for("WATCHDOG=trigger" if self.daemon.exiting is Reason.STUCK else "STOPPING=1")
        return code

    def ready(self) -> None:
        """Wait until the model is loaded and READY=1 has gone out."""
        self.notify.wait_for("READY=1")

    def serving(self) -> None:
        """The main loop, looking at the clock as it is now, decides to go on serving."""
        assert self.daemon.look(), "the main loop did not look at its clocks"
        assert self.daemon.exiting is None, f"the daemon decided to exit ({self.daemon.exiting})"

    def exits(self, reason: Reason) -> None:
        """The main loop, looking at the clock as it is now, decides to exit for `reason`."""
        assert self.daemon.look()
        assert self.daemon.exiting is reason

    def exits_after(self, seconds: float, reason: Reason) -> None:
        """The daemon still serves 1 ms before `seconds` from now, and exits for `reason` at it."""
        self.clock.advance(seconds - 0.001)
        self.serving()
        self.clock.advance(0.001)
        self.exits(reason)

    def request_over(self) -> None:
        """Wait until the connection threads have finished their requests' book-keeping (the
        answer leaves before it): only then may the test move the clock on."""
        wait_until("the requests to end", lambda: self.daemon.server.active == 0)

    def request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        return http_request(self.socket, method, url, body, timeout=30)

    def connect(self) -> socket.socket:
        return connect_unix(self.socket, 30)


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a state no event announces (e.g. a connection thread's progress)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.005)


def recognize_head(clip: bytes) -> bytes:
    return f"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nContent-Length: {len(clip)}\r\n\r\n".encode()


def events(caplog: pytest.LogCaptureFixture, *names: str) -> list[tuple[str, dict]]:
    return [(r.e2vd_event, r.e2vd_fields) for r in caplog.records if getattr(r, "e2vd_event", None) in names]


EXIT_EVENTS = ("idle_exit", "stopped", "exit_unavailable")


@pytest.fixture
def in_process(tmp_path, monkeypatch, caplog):
    """make(load_error=None, loading=False, **settings) -> InProcess (socket tmp_path/s.sock unless given)."""
    caplog.set_level(logging.DEBUG)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    made: list[InProcess] = []

    def make(load_error: str | None = None, loading: bool = False, hold_fds: bool = False,
             **settings: Any) -> InProcess:
        notify = FakeNotify(tmp_path / f"notify{len(made)}", hold_fds=hold_fds)
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        values = dict(socket=str(tmp_path / "s.sock"), model="fake/model", device="cpu", idle_timeout=300.0,
                      connection_timeout=30.0, max_hold=3600.0, drain_timeout=60.0, unavailable_grace=60.0,
                      inference_timeout=1e9)   # the clock moves by hours in some tests: not stuck
        values.update(settings)
        s = Settings(**values)
        engine, gate = FakeEngine(), threading.Event()
        if not loading:
            gate.set()

        def load() -> FakeEngine:
            assert gate.wait(60), "the test never let the model load"
            if load_error:
                raise RuntimeError(load_error)
            return engine

        clock = ManualClock()
        ip = InProcess(Daemon(s, open_listener(s.socket), load=load, clock=clock), clock, engine, notify,
                       s.socket, gate)
        made.append(ip)
        return ip

    yield make
    for ip in made:
        ip.engine.gate.set()
        ip.load_gate.set()
        ip.notify.close()


def test_ready_is_sent_by_the_load_itself_before_the_first_answer_leaves(in_process, clip, caplog):
    ip = in_process(loading=True, hold_fds=True)   # a systemd slow to read its notify socket
    answer: list = []

    def body(ip: InProcess) -> None:
        with ip.connect() as s:
            s.sendall(recognize_head(clip) + clip)
            ip.notify.wait_for("STATUS=Loading model fake/model")
            wait_until("the request to be queued", lambda: ip.daemon.scheduler.pending == 1)
            ip.clock.advance(5.0)                            # EXTEND_TIMEOUT_USEC every 5 s while loading
            ip.serving()
            ip.notify.wait_for("EXTEND_TIMEOUT_USEC=30000000", count=2)
            assert "READY=1" not in ip.notify.lines()
            ip.load_gate.set()                               # the model loads; nobody ticks
            ip.notify.wait_for("BARRIER=1")
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):                # no answer before systemd has read READY=1
                s.recv(1)
            ip.notify.release()
            s.settimeout(30)
            answer.append(read_response(s))
            answer.append(ip.notify.lines())                 # what systemd had when the answer came
        os.kill(os.getpid(), signal.SIGTERM)

    assert ip.run(body) == 0
    (status, _, result), lines = answer
    assert status == 200 and result["labels"] == LABELS
    assert lines[0] == "EXTEND_TIMEOUT_USEC=30000000"       # the first thing said while loading
    ready = lines.index("READY=1")
    assert lines[ready + 1].startswith("STATUS=Ready on cpu: 0 request(s) served")
    assert lines[ready + 2] == "BARRIER=1"
    assert [name for name, _ in events(caplog, "model_loaded")] == ["model_loaded"]


def test_idle_exit_comes_exactly_idle_timeout_after_ready(in_process, caplog, tmp_path):
    ip = in_process(idle_timeout=300)

    def body(ip: InProcess) -> None:
        ip.ready()
        ip.clock.advance(299.999)
        ip.serving()
        ip.notify.wait_for("; idle exit in 1 s")
        ip.clock.advance(0.001)
        ip.exits(Reason.IDLE)

    assert ip.run(body) == 0
    assert not Path(ip.socket).exists()                    # we bound it, so we removed it
    assert ip.notify.lines().count("STOPPING=1") == 1
    assert ip.notify.messages[-1] == "STOPPING=1\nSTATUS=Idle exit after 0 request(s)"
    (name, fields), = events(caplog, *EXIT_EVENTS)
    assert name == "idle_exit" and fields == {"alive_seconds": 300.0, "requests_served": 0,
                                              "idle_timeout_seconds": 300}


def test_an_open_connection_holds_the_daemon_only_until_connection_timeout_after_its_last_use(in_process):
    """Cheap requests (health, status) on a kept-open connection do not renew its hold."""
    ip = in_process(idle_timeout=10, connection_timeout=30)

    def body(ip: InProcess) -> None:
        ip.ready()
        with ip.connect() as s:                              # opened at T0
            s.sendall(HEALTH)
            assert read_response(s)[0] == 200
            for _ in range(3):                               # a poller, every 10 s
                ip.clock.advance(10)
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: e2vd\r\n\r\n")
                assert read_response(s)[0] == 200
                ip.request_over()
            ip.exits_after(10, Reason.IDLE)                       # held until T0+30, then idle_timeout 10
            assert s.recv(100) == b""                         # the open connection is closed on the way out

    assert ip.run(body) == 0


def test_recognize_on_a_kept_open_connection_renews_its_hold(in_process, clip):
    ip = in_process(idle_timeout=10, connection_timeout=30)

    def body(ip: InProcess) -> None:
        ip.ready()
        with ip.connect() as s:                              # opened at T0
            ip.clock.advance(20)
            s.sendall(recognize_head(clip) + clip)
            assert read_response(s)[0] == 200                # ended at T0+20: held until T0+50
            wait_until("the hold to be renewed", lambda: ip.daemon.server.holding(ip.clock()).until == T0 + 50)
            ip.exits_after(40, Reason.IDLE)

    assert ip.run(body) == 0


def test_work_in_flight_holds_the_daemon_however_long_and_the_clock_restarts_when_it_ends(in_process, clip):
    ip = in_process(idle_timeout=10, connection_timeout=30)
    ip.engine.gate.clear()

    def body(ip: InProcess) -> None:
        ip.ready()
        s = ip.connect()
        s.sendall(recognize_head(clip) + clip[:1000])        # an upload in progress ...
        wait_until("the request to start", lambda: ip.daemon.server.active == 1)
        ip.clock.advance(10_000)
        ip.serving()
        s.sendall(clip[1000:])                               # ... then inference in progress
        assert ip.engine.entered.wait(30)
        ip.clock.advance(10_000)
        ip.serving()
        ip.notify.wait_for("busy (1 in progress, 1 connection(s))")
        ip.engine.gate.set()
        assert read_response(s)[0] == 200
        ip.request_over()
        s.close()                                            # closed at T0 + 20000: nothing holds it
        wait_until("the connection to close", lambda: ip.daemon.server.connections == 0)
        ip.exits_after(10, Reason.IDLE)

    assert ip.run(body) == 0


def test_keep_warm_hold_is_capped_and_defers_the_idle_clock(in_process, caplog):
    ip = in_process(idle_timeout=300, max_hold=100)

    def body(ip: InProcess) -> None:
        status, _, answer = ip.request("POST", "/v1/warmup?hold=600")
        assert status == 200 and answer["status"] == "ready" and answer["hold_s"] == 100
        assert answer["keep_warm_deadline"] == pytest.approx(time.time() + 100, abs=5)
        wait_until("the connection to close", lambda: ip.daemon.server.connections == 0)
        ip.serving()
        ip.notify.wait_for("; kept warm until ")
        ip.exits_after(400, Reason.IDLE)                      # hold 100, then idle_timeout 300

    assert ip.run(body) == 0
    assert events(caplog, "keep_warm") == [("keep_warm", {"hold_seconds": 100.0, "capped": True})]


def test_sigterm_during_a_request_finishes_it_and_exits_0(in_process, clip, caplog):
    ip = in_process()
    ip.engine.gate.clear()
    answer: list = []

    def body(ip: InProcess) -> None:
        ip.ready()
        with ip.connect() as s:
            s.sendall(recognize_head(clip) + clip)
            assert ip.engine.entered.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)
            ip.notify.wait_for("STOPPING=1")
            with pytest.raises(OSError):                     # no longer accepting
                ip.connect()
            ip.engine.gate.set()
            answer.append(read_response(s))

    assert ip.run(body) == 0
    status, _, result = answer[0]
    assert status == 200 and result["labels"] == LABELS
    assert ip.notify.lines().count("STOPPING=1") == 1
    assert events(caplog, "stopping") == [("stopping", {"signal": "SIGTERM", "in_flight": 1, "queued": 1})]
    (name, fields), = events(caplog, *EXIT_EVENTS)
    assert name == "stopped" and fields["signal"] == "SIGTERM" and fields["requests_served"] == 1


def test_sigterm_gives_up_a_stalled_upload_after_drain_timeout(in_process, clip, caplog):
    ip = in_process(drain_timeout=5)
    stalled: list[socket.socket] = []

    def body(ip: InProcess) -> None:
        ip.ready()
        s = ip.connect()
        stalled.append(s)                                    # kept open until the daemon has exited
        s.sendall(recognize_head(clip))                      # the body never comes
        wait_until("the request to start", lambda: ip.daemon.server.active == 1)
        os.kill(os.getpid(), signal.SIGTERM)
        ip.notify.wait_for("STOPPING=1")
        ip.clock.advance(5)                                  # drain_timeout

    try:
        assert ip.run(body) == 0
    finally:
        for s in stalled:
            s.close()
    assert [n for n, _ in events(caplog, "drain_abandoned", *EXIT_EVENTS)] == ["drain_abandoned", "stopped"]


def test_a_second_signal_stops_the_drain_at_once(in_process, clip, caplog):
    ip = in_process(drain_timeout=600)
    ip.engine.gate.clear()

    def body(ip: InProcess) -> None:
        ip.ready()
        with ip.connect() as s:
            s.sendall(recognize_head(clip) + clip)
            assert ip.engine.entered.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)
            ip.notify.wait_for("STOPPING=1")
            os.kill(os.getpid(), signal.SIGINT)

    assert ip.run(body) == 0
    assert [n for n, _ in events(caplog, "drain_abandoned", *EXIT_EVENTS)] == ["drain_abandoned", "stopped"]


def test_model_that_cannot_load_answers_503_then_exits_after_the_grace(in_process, clip, caplog):
    ip = in_process(load_error="model.pt is truncated", unavailable_grace=60)

    def body(ip: InProcess) -> None:
        ip.notify.wait_for("STATUS=Model unavailable")
        for method, url, data in (("GET", "/v1/health", None), ("POST", "/v1/recognize", clip),
                                  ("POST", "/v1/warmup?hold=10", None)):
            status, _, answer = ip.request(method, url, data)
            assert status == 503 and answer["error"]["code"] == "model_unavailable", (url, answer)
            assert "model.pt is truncated" in answer["error"]["message"]
        ip.exits_after(60, Reason.UNAVAILABLE)                # the grace counts from the failure

    assert ip.run(body) == 5
    assert "READY=1" not in ip.notify.lines() and ip.notify.lines().count("STOPPING=1") == 1
    assert [n for n, _ in events(caplog, "model_unavailable", *EXIT_EVENTS)] == ["model_unavailable",
                                                                                  "exit_unavailable"]
    fields = events(caplog, "exit_unavailable")[0][1]
    assert fields == {"model": "fake/model", "error": "model.pt is truncated", "grace_seconds": 60.0}


def test_a_load_that_hangs_is_given_up_after_load_timeout_and_the_daemon_exits_after_the_grace(in_process, clip,
                                                                                             caplog):
    ip = in_process(loading=True, load_timeout=100, gpu_lock_timeout=10, unavailable_grace=60)   # it never returns

    def body(ip: InProcess) -> None:
        waiting: list = []
        t = threading.Thread(target=lambda: waiting.append(ip.request("POST", "/v1/recognize", clip)))
        t.start()
        wait_until("the request to be queued", lambda: ip.daemon.scheduler.pending == 1)
        ip.clock.advance(99.999)
        ip.serving()
        assert ip.daemon.scheduler.state == "loading" and any(
            line.startswith("EXTEND_TIMEOUT_USEC=") for line in ip.notify.lines())
        ip.clock.advance(0.001)
        ip.serving()                                          # given up: unavailable, not an exit yet
        t.join(30)
        status, _, answer = waiting[0]                        # the queued request is answered, not lost
        assert status == 503 and answer["error"]["code"] == "model_unavailable", answer
        message = answer["error"]["message"]
        assert "load_timeout = 100 s" in message and "test_daemon.py" in message, message   # where it hangs
        status, _, answer = ip.request("GET", "/v1/health")
        assert status == 503 and answer["error"]["code"] == "model_unavailable"
        grace = 60 + 60 + 30                                  # unavailable_grace + drain_timeout + EXTEND_BY_S
        assert f"EXTEND_TIMEOUT_USEC={grace * 1_000_000}" in ip.notify.lines()   # the grace outlives TimeoutStartSec
        assert ip.daemon.scheduler.worker_alive               # the load itself is still where it hung
        ip.exits_after(60, Reason.UNAVAILABLE)

    assert ip.run(body) == 5
    assert "READY=1" not in ip.notify.lines()
    assert [n for n, _ in events(caplog, "model_unavailable", *EXIT_EVENTS)] == ["model_unavailable",
                                                                                  "exit_unavailable"]
    ip.load_gate.set()                                        # the load returns at last: dropped, never served
    ip.daemon.scheduler.stop(timeout=30)
    assert not ip.daemon.scheduler.worker_alive and ip.daemon.scheduler.engine is None
    assert ip.daemon.scheduler.state == "unavailable"


def test_queue_full_answers_503_busy_with_retry_after(in_process, clip):
    ip = in_process(queue_size=1, loading=True)             # the model cannot load before the test says so

    def body(ip: InProcess) -> None:
        first: list = []
        t = threading.Thread(target=lambda: first.append(ip.request("POST", "/v1/recognize", clip)))
        t.start()
        wait_until("the first request to be queued", lambda: ip.daemon.scheduler.pending == 1)
        status, headers, answer = ip.request("POST", "/v1/recognize", clip)
        assert status == 503 and answer["error"]["code"] == "busy" and int(headers["retry-after"]) >= 1
        assert "queue_size" in answer["error"]["message"]
        ip.load_gate.set()
        t.join(30)
        assert first[0][0] == 200
        os.kill(os.getpid(), signal.SIGTERM)

    assert ip.run(body) == 0


def test_other_uids_are_served_while_one_uid_is_at_its_cap(in_process):
    if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root (to connect as another uid) and /usr/bin/python3")
    folder = Path(tempfile.mkdtemp(prefix="e2vd-uid-"))     # reachable by uid 65534 (tmp_path is not)
    try:
        folder.chmod(0o755)
        ip = in_process(max_connections_per_uid=2, socket=str(folder / "s.sock"))
        os.chmod(ip.socket, 0o666)
        nobody = ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(%r)\n"
                  "s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: e2vd\\r\\n\\r\\n')\n"
                  "print(s.recv(100).split()[1].decode())\n" % ip.socket)

        def body(ip: InProcess) -> None:
            ip.ready()
            mine = [ip.connect(), ip.connect()]
            for s in mine:
                s.sendall(HEALTH)
                assert read_response(s)[0] == 200
            with ip.connect() as extra:                      # answered at once, before any request
                status, _, answer = read_response(extra)
            assert status == 503 and "max_connections_per_uid = 2" in answer["error"]["message"]
            other = subprocess.run(["/usr/bin/python3", "-c", nobody], user=65534, group=65534,
                                   capture_output=True, text=True, timeout=30)
            assert (other.returncode, other.stdout.strip()) == (0, "200"), other.stderr
            for s in mine:
                s.sendall(HEALTH)
                assert read_response(s)[0] == 200
                s.close()
            os.kill(os.getpid(), signal.SIGTERM)

        assert ip.run(body) == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- a stuck model call: the watchdog --------------------------------------------------------------

def watched(monkeypatch: pytest.MonkeyPatch, watchdog_sec: float = 30.0) -> None:
    """As systemd sets it up for WatchdogSec=`watchdog_sec` (pings every watchdog_sec / 2)."""
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog_sec * 1e6)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def test_a_stuck_model_call_stops_the_pings_and_ends_the_daemon_through_the_watchdog(in_process, clip, caplog,
                                                                                     monkeypatch):
    """WATCHDOG=1 goes out while the worker is healthy, also during a long call; the main loop
    keeps answering while the worker is stuck, and status shows the call's age; at
    inference_timeout the pings stop, one inference_stuck event names the job, WATCHDOG=trigger
    asks systemd to kill the process (no STOPPING=1, no drain) and run() returns 5."""
    watched(monkeypatch)
    ip = in_process(inference_timeout=120)
    ip.engine.gate.clear()                                   # the model call never returns
    held: list[socket.socket] = []

    def body(ip: InProcess) -> None:
        ip.ready()
        ip.serving()
        ip.notify.wait_for("WATCHDOG=1")                     # idle: healthy
        s = ip.connect()
        held.append(s)
        s.sendall(recognize_head(clip) + clip)
        assert ip.engine.entered.wait(30)
        for _ in range(6):                                   # 6 x 15 s: a long call, still healthy
            ip.clock.advance(15)
            ip.serving()
        ip.notify.wait_for("WATCHDOG=1", count=7)
        ip.notify.wait_for("; inference running 90 s (inference_timeout 120 s)")
        status, _, st = ip.request("GET", "/v1/status")     # the main loop and the server still answer
        assert status == 200 and st["inference_running_s"] == 90.0 and st["inference_timeout_s"] == 120.0
        wait_until("the status request to end", lambda: ip.daemon.server.active == 1)   # the stuck one
        ip.clock.advance(29.999)
        ip.serving()
        ip.notify.wait_for("WATCHDOG=1", count=8)
        ip.clock.advance(0.001)                              # the call is 120 s old: stuck
        ip.exits(Reason.STUCK)
        ip.notify.wait_for("WATCHDOG=trigger")
        ip.clock.advance(KILL_WAIT_S)                        # no SIGABRT comes from a fake systemd
        ip.daemon.wake()

    try:
        assert ip.run(body) == 5
    finally:
        for s in held:
            s.close()
    lines = ip.notify.lines()
    assert "STOPPING=1" not in lines and lines.count("WATCHDOG=1") == 8
    trigger = lines.index("WATCHDOG=trigger")
    assert "WATCHDOG=1" not in lines[trigger:]
    assert lines[trigger + 1] == ("STATUS=Stuck: inference of job 1 (1.0 s of audio, utterance) on cpu has run "
                                  "120.0 s, past inference_timeout = 120 s; ending the process")
    (name, fields), = events(caplog, "inference_stuck", *EXIT_EVENTS)
    assert name == "inference_stuck"
    assert {k: fields[k] for k in ("jobs", "clips", "audio_seconds", "granularity", "device", "running_seconds",
                                   "inference_timeout_seconds", "in_flight", "queued")} == {
        "jobs": "1", "clips": 1, "audio_seconds": 1.0, "granularity": "utterance", "device": "cpu",
        "running_seconds": 120.0, "inference_timeout_seconds": 120.0, "in_flight": 1, "queued": 0}


def test_a_call_that_ends_before_inference_timeout_is_not_stuck(in_process, clip, monkeypatch):
    watched(monkeypatch)
    ip = in_process(inference_timeout=10, idle_timeout=1e6)
    ip.engine.gate.clear()

    def body(ip: InProcess) -> None:
        ip.ready()
        with ip.connect() as s:
            s.sendall(recognize_head(clip) + clip)
            assert ip.engine.entered.wait(30)
            ip.clock.advance(9.999)
            ip.serving()
            ip.engine.gate.set()
            assert read_response(s)[0] == 200
        wait_until("the call to end", lambda: ip.daemon.scheduler.running is None)
        ip.clock.advance(3600)                               # idle for long: that is not stuck
        ip.serving()
        os.kill(os.getpid(), signal.SIGTERM)

    assert ip.run(body) == 0
    assert "WATCHDOG=trigger" not in ip.notify.lines()


def test_outside_systemd_a_stuck_call_ends_the_process_with_a_clear_message_and_exit_5(tmp_path):
    """A daemon started by hand: the large stand-in on the CPU needs seconds for 20 s of audio,
    past inference_timeout = 1 s. No test-only hook: the bound itself ends the process; the
    client sees the connection close without an answer (DaemonDied)."""
    from conftest import standin_dir, wav_clip

    from e2vd.client import Client, DaemonDied

    large = standin_dir("large")
    with DaemonProcess(tmp_path / "s.sock", large, wait_ready=True, idle_timeout=600, inference_timeout=1,
                       start_timeout=300) as d:
        with Client(str(d.socket), timeout=300) as c, pytest.raises(DaemonDied, match="died mid-request"):
            c.recognize(wav_clip(20.0, seed=7))
        assert d.wait(60) == 5
    log = d.log_text()
    [line] = [line for line in log.splitlines() if "event=inference_stuck" in line]
    assert "inference of job 1 (20.0 s of audio, utterance) on cpu has run" in line
    assert "past inference_timeout = 1 s" in line and "the process ends with exit code 5" in line
    assert "device=cpu" in line and "clips=1" in line
    assert "Traceback" not in log
