"""The daemon end to end: `python -m e2vd serve` in a subprocess, real Unix sockets, tiny stand-in.

One shared daemon serves the API tests (start-up costs seconds here); lifecycle tests (idle exit,
SIGTERM, unavailable model, stale/live sockets) each start their own with short timeouts.
"""
from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import write_audio
from daemon_proc import DaemonProcess, http_request, read_response

from e2vd.client import connect_unix

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


# --- lifecycle: each test runs its own daemon ---

def test_idle_exit_after_timeout(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=1, wait_ready=True)
    with d:
        assert d.wait(60) == 0
    assert not d.socket.exists()          # we bound it, so we removed it
    assert "idle_exit" in d.log_text() or "idle for" in d.log_text()


def test_no_idle_exit_while_a_connection_is_open_or_a_request_in_flight(tiny_model, tmp_path, clip):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=1, connection_timeout=20, wait_ready=True)
    with d:
        with connect_unix(str(d.socket), 30) as s:
            time.sleep(3)                  # silent connection open for 3 x idle_timeout
            head = (f"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nContent-Length: {len(clip)}\r\n\r\n").encode()
            s.sendall(head + clip[:1000])
            time.sleep(3)                  # request in flight (upload half-done) for 3 x idle_timeout
            s.sendall(clip[1000:])
            status, _, body = read_response(s)
            assert status == 200, body
            assert d.proc.poll() is None
        assert d.wait(60) == 0             # connection closed: now it idles out


def test_silent_connection_is_closed_after_connection_timeout(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=600, connection_timeout=1, wait_ready=True)
    with d:
        with connect_unix(str(d.socket), 30) as s:
            assert s.recv(100) == b""      # closed by the daemon, not by our timeout
        deadline = time.monotonic() + 10
        while d.request("GET", "/v1/status")[2]["connections"] != 1:   # just the status request
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_sigterm_during_a_request_finishes_it_and_exits_0(tiny_model, tmp_path, clip):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=600, wait_ready=True)
    with d:
        with connect_unix(str(d.socket), 60) as s:
            head = (f"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nContent-Length: {len(clip)}\r\n\r\n").encode()
            s.sendall(head + clip[:1000])
            time.sleep(0.5)
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert d.proc.poll() is None   # still draining our request
            with pytest.raises(OSError):   # but no longer accepting
                http_request(d.socket, "GET", "/v1/health", timeout=5)
            s.sendall(clip[1000:])
            status, _, body = read_response(s)
            assert status == 200 and body["labels"] == LABELS
        assert d.wait(30) == 0


def test_model_that_cannot_load_answers_503_then_exits_nonzero(tmp_path, clip):
    missing = tmp_path / "no-such-model"
    d = DaemonProcess(tmp_path / "s.sock", missing, unavailable_grace=3)
    with d:
        deadline = time.monotonic() + 60
        while True:
            status, headers, body = d.request("GET", "/v1/health")
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        assert "no-such-model" in body["error"]["message"]
        status, _, body = d.request("POST", "/v1/recognize", clip)
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        status, _, body = d.request("POST", "/v1/warmup?hold=10")
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        assert d.proc.poll() is None       # still answering during the grace period
        assert d.wait(60) == 5
    assert "could not be loaded" in d.log_text()


def test_stale_socket_file_is_replaced(tiny_model, tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()                          # the file stays; nothing listens
    assert path.exists()
    with DaemonProcess(path, tiny_model, idle_timeout=600) as d:
        assert d.request("GET", "/v1/health")[0] == 200


def test_non_socket_file_is_refused(tiny_model, tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    d = DaemonProcess(path, tiny_model)
    out = subprocess.run(d.command(), env=d.environment(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 5 and "not a socket" in out.stderr
    assert path.read_text() == "not a socket"


def test_queue_full_answers_503_busy_with_retry_after(tiny_model, tmp_path, clip):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=600, queue_size=1)
    with d:
        first: list = []
        t = threading.Thread(target=lambda: first.append(d.request("POST", "/v1/recognize", clip)))
        t.start()
        deadline = time.monotonic() + 30
        while (st := d.request("GET", "/v1/status")[2])["queue_depth"] < 1:   # waits for the model
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.02)
        if st["state"] != "loading":
            t.join(60)
            pytest.skip("the model loaded before the queue could be observed full")
        status, headers, body = d.request("POST", "/v1/recognize", clip)
        t.join(60)
        assert status == 503 and body["error"]["code"] == "busy" and int(headers["retry-after"]) >= 1
        assert first[0][0] == 200


def test_sd_notify_ready_status_extend_and_stopping(tiny_model, tmp_path):
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify_path))
        ns.settimeout(60)
        d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=2, env={"NOTIFY_SOCKET": str(notify_path)})
        with d:
            messages: list[str] = []
            while not any("STOPPING=1" in m for m in messages):
                messages.append(ns.recv(4096).decode())
            assert d.wait(30) == 0
    text = "\n".join(messages)
    assert messages[0].startswith("EXTEND_TIMEOUT_USEC=")               # first thing while loading
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert "STATUS=Ready on cpu" in messages[ready]
    assert all("READY=1" not in m for m in messages[:ready])
    assert "idle exit in" in text and "STATUS=Loading model" in text
    assert "STOPPING=1" in messages[-1]


def test_keep_warm_hold_defers_the_idle_clock(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=1, wait_ready=True)
    with d:
        status, _, body = d.request("POST", "/v1/warmup?hold=6")
        assert status == 200 and body["hold_s"] == 6
        time.sleep(2.5)                     # 2.5 x idle_timeout, inside the hold
        assert d.proc.poll() is None
        st = d.request("GET", "/v1/status")[2]
        assert st["keep_warm_deadline"] is not None and st["idle_exit_in_s"] > 1
        assert d.wait(60) == 0              # hold over, then idle_timeout: exit 0
    assert "keep_warm" in d.log_text() and "idle_exit" in d.log_text()


def test_sigterm_gives_up_a_stalled_request_after_drain_timeout(tiny_model, tmp_path, clip):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, idle_timeout=600, drain_timeout=1,
                      connection_timeout=60, wait_ready=True)
    with d:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(d.socket))
            s.sendall(f"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nContent-Length: {len(clip)}\r\n\r\n".encode())
            time.sleep(0.5)                 # the upload stalls; SIGTERM must not wait for it forever
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait(30) == 0
    assert "drain_abandoned" in d.log_text()
