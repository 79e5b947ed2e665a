"""e2vd.ray_serve: the daemon's HTTP API on Ray Serve, scaling to zero.

A local Ray cluster (2 CPUs, no dashboard) is started once for the module and torn down after it;
the application runs the tiny stand-in on the CPU with min_replicas 0 and max_replicas 2, and
answers are compared with a daemon (`e2vd serve` in a subprocess, tests/daemon_proc.py) given the
same settings. Every wait is bounded (HTTP timeouts, deadlines on the replica counts). The app's
argument checks and the "e2vd imports no ray" rule are quick tests without a cluster.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, standin_dir, wav_clip
from daemon_proc import DaemonProcess, http_exchange, read_response
from forms import chunked, form

from e2vd.config import ConfigError

DOWNSCALE_DELAY_S = 3.0         # the app's downscale_delay: no traffic this long, one replica fewer (to 0)
MAX_BODY_BYTES = 400_000        # small limits, so that too_large and too_long are cheap to provoke
MAX_SECONDS = 4.0
SCALE_WAIT_S = 90.0             # longest wait for a replica count Ray's autoscaler should reach
HTTP_TIMEOUT_S = 120.0          # a cold replica imports torch and loads the model: well under this


# --- without a cluster -------------------------------------------------------------------------

def test_e2vd_modules_do_not_import_ray() -> None:
    """Every module of e2vd but ray_serve imports without pulling ray (or Ray's starlette) in."""
    import e2vd

    names = sorted(p.stem for p in Path(e2vd.__file__).parent.glob("*.py")
                   if p.stem not in ("ray_serve", "__main__"))
    assert {"cli", "daemon", "engine", "server", "routes", "web"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module('e2vd' if name == '__init__' else 'e2vd.' + name)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'starlette'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"imported by e2vd: {out.stdout.strip()}"


def test_app_arguments_are_checked(tiny_model: Path) -> None:
    """Bad app arguments are refused when the app is built, naming the key and what is accepted."""
    from e2vd.ray_serve import parse_args

    model = str(tiny_model)
    env = {"E2VD_CONFIG": os.devnull}
    settings, scaling = parse_args({"model": model, "device": "cpu", "idle_timeout": "90s"}, env=env)
    assert (settings.model, settings.device, scaling.min_replicas) == (model, "cpu", 0)
    assert scaling.downscale_delay == 90.0 and scaling.gpus_per_replica == 0.0
    settings, scaling = parse_args({"model": model, "max_replicas": 4, "downscale_delay": "2m",
                                    "gpus_per_replica": "0.5", "max_seconds": "12"}, env=env)
    assert (scaling.max_replicas, scaling.downscale_delay, scaling.gpus_per_replica, settings.max_seconds) == \
        (4, 120.0, 0.5, 12.0)
    bad = [
        ({"model": model, "max_replica": "2"}, "did you mean 'max_replicas'"),
        ({"model": model, "min_replicas": "-1"}, "min_replicas must be >= 0"),
        ({"model": model, "min_replicas": "3", "max_replicas": "2"}, "above max_replicas"),
        ({"model": model, "max_replicas": "1.5"}, "whole number"),
        ({"model": model, "max_replicas": True}, "whole number"),
        ({"model": model, "downscale_delay": "soon"}, "duration"),
        ({"model": model, "downscale_delay": "1e999"}, "downscale_delay"),
        ({"model": model, "gpus_per_replica": "nan"}, "gpus_per_replica"),
        ({"model": model, "gpus_per_replica": "1.5"}, "fraction up to 1"),
        ({"model": model, "device": "cpu", "gpus_per_replica": "1"}, "device=cpu"),
        ({"model": model, "device": "cuda:1"}, "cuda:0, cuda:1"),
        ({"model": model, "max_ongoing_requests": "0"}, "max_ongoing_requests"),
        ({"model": model, "max_seconds": "-3"}, "max_seconds"),
        ({"model": model, "device": "tpu"}, "auto, cpu, cuda"),
        ({"model": "not a model"}, "app argument model: must be an absolute model directory or a ModelScope id"),
        ({"model": "./models/e2v"}, "app argument model: must be an absolute model directory"),   # e2vd.config
        ({"model": model, "config": "/nonexistent/e2vd.toml"}, "does not exist"),
    ]
    for args, fragment in bad:
        with pytest.raises(ConfigError, match=None) as info:
            parse_args(args, env=env)
        assert fragment in str(info.value), (args, str(info.value))


# --- on a local Ray cluster --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayApp:
    """The e2vd application on a local Ray cluster, reached over HTTP on 127.0.0.1:`port`."""

    def __init__(self, port: int) -> None:
        self.port = port

    def replicas(self) -> dict[str, int]:
        """Replica counts of the e2vd deployment by state (RUNNING, STARTING, ...), none listed when 0."""
        from ray import serve

        status = serve.status().applications.get("e2vd")
        if status is None or "e2vd" not in status.deployments:
            return {}
        return {str(getattr(k, "value", k)): v for k, v in status.deployments["e2vd"].replica_states.items() if v}

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """One request on a fresh connection: (status, lower-cased headers, JSON or raw bytes)."""
        return http_exchange(http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S),
                             method, url, body, headers)

    def raw(self, data: bytes) -> tuple[int, dict[str, str], Any]:
        """Send raw bytes on a fresh connection and read one answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=HTTP_TIMEOUT_S) as s:
            s.sendall(data)
            return read_response(s)

    def wait_replicas(self, running: int, timeout: float = SCALE_WAIT_S) -> dict[str, int]:
        """Wait until exactly `running` replicas exist (in any state); the counts seen last."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.replicas()
            if sum(counts.values()) == running:
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"the e2vd deployment did not reach {running} replicas within "
                                     f"{timeout:g} s: {counts}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[int]:
    """A local Ray cluster with Serve listening on a free port of 127.0.0.1; torn down after the module."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="e2vd-test")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def app_settings(model: Path) -> dict[str, str]:
    """The settings the application and the daemon share."""
    return {"model": str(model), "device": "cpu", "max_body_bytes": str(MAX_BODY_BYTES),
            "max_seconds": str(MAX_SECONDS)}


@pytest.fixture(scope="module")
def ray_app(cluster: int, tiny_model: Path) -> Iterator[tuple[RayApp, dict[str, Any]]]:
    """The app deployed with min_replicas 0, and what happened around its first request:
    {"before": replica counts right after deploying, "first": (status, headers, payload) of the
    first POST /v1/recognize, "during": counts seen while it was in flight, "after": counts once
    answered}."""
    from ray import serve

    from e2vd.ray_serve import app

    args = {**app_settings(tiny_model), "config": os.devnull, "min_replicas": "0", "max_replicas": "2",
            "cpus_per_replica": "0.5",
            "downscale_delay": str(DOWNSCALE_DELAY_S), "upscale_delay": "1", "metrics_interval": "0.5",
            "look_back_period": "2"}
    serve.run(app(args), name="e2vd", route_prefix="/")
    target = RayApp(cluster)
    facts: dict[str, Any] = {"before": target.replicas(), "during": []}
    answer: list[Any] = []
    sender = threading.Thread(target=lambda: answer.append(
        target.request("POST", "/v1/recognize", wav_clip(2.0, seed=1))))
    sender.start()
    while sender.is_alive():
        facts["during"].append(target.replicas())
        sender.join(0.1)
    facts["first"] = answer[0] if answer else None
    facts["after"] = target.replicas()
    try:
        yield target, facts
    finally:
        serve.delete("e2vd")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DaemonProcess]:
    """`e2vd serve` with the app's settings, ready."""
    settings = app_settings(tiny_model)
    settings.pop("model")
    path = tmp_path_factory.mktemp("ray-daemon") / "e2vd.sock"
    with DaemonProcess(path, tiny_model, wait_ready=True, idle_timeout=600, **settings) as d:
        yield d


@pytest.mark.slow
@pytest.mark.ray
def test_no_replica_until_the_first_request_which_is_answered(ray_app: tuple[RayApp, dict[str, Any]]) -> None:
    """With min_replicas 0 nothing runs after deploying; the first request starts a replica and
    is answered with a result, not an error, once it is up."""
    _, facts = ray_app
    assert facts["before"] == {}, facts
    status, _, payload = facts["first"]
    assert status == 200, payload
    assert payload["top"]["label"] in payload["labels"] and abs(sum(payload["scores"]) - 1.0) < 1e-5
    assert any(counts.get("STARTING") or counts.get("PENDING_MIGRATION") or counts.get("RUNNING")
               for counts in facts["during"]), facts
    assert facts["after"].get("RUNNING", 0) >= 1, facts


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("query", ["", "?embedding=1", "?granularity=frame&embedding=1"])
def test_results_equal_the_daemons(ray_app: tuple[RayApp, dict[str, Any]], daemon: DaemonProcess,
                                   query: str) -> None:
    """The same audio gets the same result through Ray Serve as from the daemon: labels, the
    scores within 1e-5, the embedding within 1e-4, the same keys."""
    import numpy as np

    target, _ = ray_app
    audio = wav_clip(3.0, seed=7)
    r_status, _, ours = target.request("POST", "/v1/recognize" + query, audio)
    d_status, _, theirs = daemon.request("POST", "/v1/recognize" + query, audio)
    assert (r_status, d_status) == (200, 200), (ours, theirs)
    assert sorted(ours) == sorted(theirs)
    assert ours["labels"] == theirs["labels"] and ours["model_labels"] == theirs["model_labels"]
    assert ours["top"]["label"] == theirs["top"]["label"]
    assert np.max(np.abs(np.array(ours["scores"]) - np.array(theirs["scores"]))) <= 1e-5
    assert ours["duration_s"] == theirs["duration_s"] and ours["model"] == theirs["model"]
    if "embedding" in theirs:
        mine, daemons = np.array(ours["embedding"]), np.array(theirs["embedding"])
        assert mine.shape == daemons.shape and mine.size > 0
        assert np.max(np.abs(mine - daemons)) <= 1e-4


def bad_requests() -> list[tuple[str, str, str, bytes | None, dict[str, str]]]:
    """(what, method, url, body, headers) of requests both must refuse with a 4xx JSON error."""
    form_ok, form_type = form(("file", wav_clip(1.0), "a.wav"))
    open_form, _ = form(("file", wav_clip(1.0), "a.wav"), end=b"")
    two_files, _ = form(("file", wav_clip(1.0), "a.wav"), ("audio", wav_clip(1.0), "b.wav"))
    frame_field, _ = form(("granularity", b"frame", None), ("file", wav_clip(1.0), "a.wav"))
    return [
        ("no such route", "GET", "/v1/nope", None, {}),
        ("wrong method", "GET", "/v1/recognize", None, {}),
        ("bad granularity", "POST", "/v1/recognize?granularity=word", wav_clip(1.0), {}),
        ("unknown option", "POST", "/v1/recognize?bogus=1", wav_clip(1.0), {}),
        ("bad boolean", "POST", "/v1/recognize?embedding=maybe", wav_clip(1.0), {}),
        ("option twice", "POST", "/v1/recognize?embedding=1&embedding=0", wav_clip(1.0), {}),
        ("not audio", "POST", "/v1/recognize", b"this is not audio at all" * 10, {}),
        ("empty body", "POST", "/v1/recognize", b"", {}),
        ("too large", "POST", "/v1/recognize", b"\0" * (MAX_BODY_BYTES + 1), {}),
        ("too long", "POST", "/v1/recognize", wav_clip(MAX_SECONDS + 2.0), {}),
        ("too short", "POST", "/v1/recognize", wav_clip(0.01), {}),
        ("form without its end", "POST", "/v1/recognize", open_form, {"Content-Type": form_type}),
        ("form with two files", "POST", "/v1/recognize", two_files, {"Content-Type": form_type}),
        ("option in query and form", "POST", "/v1/recognize?granularity=utterance", frame_field,
         {"Content-Type": form_type}),
        ("multipart/mixed", "POST", "/v1/recognize", form_ok, {"Content-Type": "multipart/mixed; boundary=x"}),
        ("negative hold", "POST", "/v1/warmup?hold=-1", None, {}),
        ("body on a GET", "GET", "/v1/health", b"x" * 70_000, {}),
    ]


def exchange(sock: socket.socket, method: str, url: str, body: bytes | None,
             headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """Send one request on `sock` as a client that keeps sending while the server may already
    have answered and closed (a refused large body), then read the answer."""
    head = f"{method} {url} HTTP/1.1\r\nHost: e2vd\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    try:
        sock.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
    except (BrokenPipeError, ConnectionResetError):
        pass   # refused before all of it was read: the answer is waiting
    return read_response(sock)


@pytest.mark.slow
@pytest.mark.ray
def test_bad_inputs_get_the_daemons_errors(ray_app: tuple[RayApp, dict[str, Any]], daemon: DaemonProcess) -> None:
    """Each bad request gets the same status, error code (and Allow header) from Ray Serve as
    from the daemon, in the error shape {"error": {"code", "message"}}."""
    from e2vd.client import connect_unix

    target, _ = ray_app
    seen = []
    for what, method, url, body, headers in bad_requests():
        with socket.create_connection(("127.0.0.1", target.port), timeout=HTTP_TIMEOUT_S) as s:
            r_status, r_headers, ours = exchange(s, method, url, body, headers)
        with connect_unix(str(daemon.socket), HTTP_TIMEOUT_S) as s:
            d_status, d_headers, theirs = exchange(s, method, url, body, headers)
        assert 400 <= d_status < 500, (what, d_status, theirs)
        assert isinstance(ours, dict) and set(ours) == {"error"} and ours["error"]["message"], (what, ours)
        assert (r_status, ours["error"]["code"]) == (d_status, theirs["error"]["code"]), (what, ours, theirs)
        assert r_headers.get("allow") == d_headers.get("allow"), what
        seen.append(theirs["error"]["code"])
    assert {"not_found", "method_not_allowed", "bad_option", "bad_audio", "too_large", "too_long", "too_short",
            "bad_form"} <= set(seen)


@pytest.mark.slow
@pytest.mark.ray
def test_bodies_without_length_and_chunked_ones_over_the_limit(ray_app: tuple[RayApp, dict[str, Any]],
                                                               daemon: DaemonProcess) -> None:
    """A POST without Content-Length or chunked framing is 411, a chunked body that crosses
    max_body_bytes is 413, and a chunked clip within it is recognised, as by the daemon."""
    target, _ = ray_app
    cases = [
        (b"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nConnection: close\r\n\r\n", 411, "length_required"),
        (b"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
         + chunked(b"\0" * (MAX_BODY_BYTES + 10), size=65536), 413, "too_large"),
        (b"POST /v1/recognize HTTP/1.1\r\nHost: e2vd\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
         + chunked(wav_clip(1.0), size=5000), 200, None),
    ]
    for data, status, code in cases:
        for name, send in (("ray", target.raw), ("daemon", lambda d: _daemon_raw(daemon, d))):
            got, _, payload = send(data)
            assert got == status, (name, data[:80], payload)
            if code:
                assert payload["error"]["code"] == code, (name, payload)
            else:
                assert payload["top"]["label"] in payload["labels"], (name, payload)


def _daemon_raw(daemon: DaemonProcess, data: bytes) -> tuple[int, dict[str, str], Any]:
    from daemon_proc import raw_request

    return raw_request(daemon.socket, data)


@pytest.mark.slow
@pytest.mark.ray
def test_same_openapi_document(ray_app: tuple[RayApp, dict[str, Any]], daemon: DaemonProcess) -> None:
    """GET /v1/openapi.json is the daemon's document, from the same protocol code."""
    target, _ = ray_app
    r_status, _, ours = target.request("GET", "/v1/openapi.json")
    d_status, _, theirs = daemon.request("GET", "/v1/openapi.json")
    assert (r_status, d_status) == (200, 200) and ours == theirs and "/v1/recognize" in ours["paths"]
    r_status, r_headers, r_body = target.request("HEAD", "/v1/openapi.json")   # GET's head, no body
    d_status, d_headers, d_body = daemon.request("HEAD", "/v1/openapi.json")
    assert (r_status, r_body) == (d_status, d_body) == (200, b"")
    assert r_headers["content-length"] == d_headers["content-length"] != "0"


@pytest.mark.slow
@pytest.mark.ray
def test_32_concurrent_requests_all_succeed(ray_app: tuple[RayApp, dict[str, Any]]) -> None:
    """32 clients at once (max_replicas 2): every one gets its result."""
    target, _ = ray_app
    clips = [wav_clip(1.0 + (i % 4) * 0.5, seed=i) for i in range(32)]
    results: list[Any] = [None] * 32
    barrier = threading.Barrier(32)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = target.request("POST", "/v1/recognize", clips[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HTTP_TIMEOUT_S * 2)
    assert all(r is not None for r in results), "a client got no answer"
    bad = [(i, r[0], r[2]) for i, r in enumerate(results) if r[0] != 200]
    assert not bad, bad[:3]
    assert all(r[2]["duration_s"] == pytest.approx(1.0 + (i % 4) * 0.5) for i, r in enumerate(results))


@pytest.mark.slow
@pytest.mark.ray
def test_back_to_zero_replicas_after_downscale_delay(ray_app: tuple[RayApp, dict[str, Any]]) -> None:
    """downscale_delay after the last request no replica is left and its process has ended; the
    next request starts one again and is answered."""
    target, _ = ray_app
    status, _, _ = target.request("POST", "/v1/recognize", wav_clip(1.0))
    assert status == 200
    assert sum(target.replicas().values()) >= 1
    pid = target.request("GET", "/v1/status")[2]["pid"]
    target.wait_replicas(0)
    deadline = time.monotonic() + SCALE_WAIT_S
    while not process_gone(pid):   # the replica's process ends: what it held (a GPU) goes with it
        assert time.monotonic() < deadline, f"replica process {pid} still runs with 0 replicas"
        time.sleep(0.2)
    status, _, payload = target.request("POST", "/v1/recognize", wav_clip(1.0))
    assert status == 200, payload


@pytest.mark.slow
@pytest.mark.ray
def test_a_model_that_cannot_load_is_answered_not_restarted(cluster: int, tmp_path: Path) -> None:
    """A replica whose model cannot load answers 503 model_unavailable with the reason (health:
    503 "unavailable") and stays the same replica: Ray does not restart it in a loop. Served under
    a route prefix, which the routes do not see."""
    from ray import serve

    from e2vd.ray_serve import app

    missing = tmp_path / "no-model-here"
    serve.run(app({"model": str(missing), "device": "cpu", "config": os.devnull, "cpus_per_replica": "0.5",
                   "downscale_delay": "60"}), name="broken", route_prefix="/broken")
    try:
        target = RayApp(cluster)
        status, headers, payload = target.request("POST", "/broken/v1/recognize", wav_clip(1.0))
        assert status == 503 and payload["error"]["code"] == "model_unavailable", payload
        assert str(missing) in payload["error"]["message"]
        status, _, health = target.request("GET", "/broken/v1/health")
        assert (status, health["status"], health["error"]["code"]) == (503, "unavailable", "model_unavailable")
        first = target.request("GET", "/broken/v1/status")[2]
        status, _, again = target.request("POST", "/broken/v1/recognize", wav_clip(1.0))
        assert status == 503 and again["error"]["code"] == "model_unavailable"
        second = target.request("GET", "/broken/v1/status")[2]
        assert first["replica"] == second["replica"] and first["pid"] == second["pid"], (first, second)
        assert first["state"] == "unavailable" and str(missing) in first["error"]
    finally:
        serve.delete("broken")


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.ray
def test_a_stuck_model_call_gets_its_replica_replaced(cluster: int) -> None:
    """A model call past inference_timeout is found by the replica's health check, which ends the
    replica's process at once (its memory goes with it, no drain); the client gets Ray's error,
    not a hang, and a new replica answers the next request. As in
    tests/test_systemd_failures.py, the large stand-in on the CPU takes seconds for a 20 s clip,
    and inference_timeout = 1 makes that call stuck, with no test-only hook."""
    from ray import serve

    from e2vd.ray_serve import app

    serve.run(app({"model": str(standin_dir("large")), "device": "cpu", "config": os.devnull,
                   "cpus_per_replica": "0.5", "inference_timeout": "1", "downscale_delay": "60"}),
              name="stuck", route_prefix="/stuck")
    try:
        target = RayApp(cluster)
        status, _, before = target.request("POST", "/stuck/v1/warmup")
        assert status == 200, before
        pid = target.request("GET", "/stuck/v1/status")[2]["pid"]
        status, _, payload = target.request("POST", "/stuck/v1/recognize", wav_clip(20.0, seed=3))
        assert status >= 500, payload.get("timing_ms") if isinstance(payload, dict) else payload
        deadline = time.monotonic() + SCALE_WAIT_S
        while not process_gone(pid):
            assert time.monotonic() < deadline, f"the stuck replica's process {pid} is still there"
            time.sleep(0.2)
        status, _, after = target.request("GET", "/stuck/v1/status")
        assert status == 200 and after["pid"] != pid, after
    finally:
        serve.delete("stuck")
