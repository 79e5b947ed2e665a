#!/usr/bin/env python3
"""Ray Serve (e2vd.ray_serve) against the socket-activated daemon, on this machine, in one run.

For the same stand-in model, clip and settings, both sides measure:
  cold:  nothing running -> the first POST /v1/recognize answered (medians of --cold starts).
         daemon: `systemd-socket-activate -l SOCK python -m e2vd serve` is listening (systemd's
         socket-activation helper, not a booted systemd: bench/activation.py measures that) and the
         first connection starts the daemon, which imports torch, loads the model and answers;
         Ray: the app is deployed with min_replicas 0 on a local Ray cluster already running
         (ray.init + serve.start are not counted, as a cluster is up before anybody asks), and the
         first request makes Ray start a replica, which imports torch, loads the model and answers;
         between cold starts the replica count is waited back to 0 (downscale_delay 2 s).
  warm:  one request at a time to the running service, a fresh connection each (median of --warm);
         for this and rps the app is redeployed with min_replicas 1 (a config change: the replica
         stays), so that it does not scale down between requests.
  rps:   --clients clients at once, each with its own kept-open connection, --per-client requests
         each; requests per second over the whole burst (median of --rounds).
The two sides take turns (a daemon cold start, then a Ray one; a daemon request, then a Ray one;
a daemon burst, then a Ray one), so that both see the same machine load.
Ray runs one replica with --cpus CPUs (torch threads), so one model instance on the same cores
as the daemon's; its HTTP proxy listens on 127.0.0.1 (TCP), the daemon on a Unix socket.
The page cache is warm (the files were read before): cold is a process cold start.
Figures only; nothing is asserted. CPU only here.

    .venv/bin/python bench/ray_serve.py [--preset large] [--seconds 3] [--cold 3] [--warm 20]
                                        [--clients 16] [--per-client 4] [--rounds 2]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from concurrency import at_once  # noqa: E402  (bench/concurrency.py)
from conftest import standin_dir, wav_clip  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from e2vd.client import Client  # noqa: E402

DOWNSCALE_DELAY_S = 2.0


# --- clients ---------------------------------------------------------------------------------------

class TcpClient:
    """A kept-open HTTP/1.1 connection to Ray Serve's proxy on 127.0.0.1:`port`."""

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def recognize(self, audio: bytes) -> dict:
        self.conn.request("POST", "/v1/recognize", body=audio)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"Ray Serve answered {resp.status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def one_request_s(make: Callable[[], object], audio: bytes) -> float:
    """Seconds from connecting to the decoded result, on a fresh connection."""
    t0 = time.perf_counter()
    client = make()
    try:
        client.recognize(audio)  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def burst_rps(make: Callable[[], object], audio: bytes, clients: int, per_client: int) -> float:
    """Requests per second of `clients` clients at once, `per_client` requests each on one connection."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run() -> None:
        client = make()
        try:
            barrier.wait()
            for _ in range(per_client):
                client.recognize(audio)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()  # type: ignore[attr-defined]

    elapsed = at_once([threading.Thread(target=run) for _ in range(clients)], barrier)
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, e.g. {errors[0]!r}")
    return clients * per_client / elapsed


# --- the daemon ----------------------------------------------------------------------------------

def daemon_cold_s(model: Path, audio: bytes, workdir: Path, settings: dict[str, object]) -> float:
    """Seconds from the first connect to a socket-activated daemon's first result."""
    path = workdir / f"cold-{time.monotonic_ns()}.sock"
    helper = DaemonProcess(path, model, **settings)
    env = helper.environment()
    passed = [arg for k, v in env.items() if k.startswith(("E2VD_", "OMP_")) or k == "PYTHONPATH"
              for arg in ("-E", f"{k}={v}")]
    log_path = workdir / (path.name + ".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(path), *passed, *helper.command()],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"Listening on" not in log_path.read_bytes():   # it says so once it listens
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("systemd-socket-activate did not listen: " + log_path.read_text()[-2000:])
            time.sleep(0.01)
        return one_request_s(lambda: Client(str(path), timeout=600), audio)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Ray Serve -----------------------------------------------------------------------------------

def replicas() -> int:
    from ray import serve

    status = serve.status().applications.get("e2vd")
    if status is None or "e2vd" not in status.deployments:
        return 0
    return sum(status.deployments["e2vd"].replica_states.values())


def wait_zero(timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while replicas():
        if time.monotonic() > deadline:
            raise RuntimeError("the e2vd deployment did not scale back to 0 replicas")
        time.sleep(0.1)


class RaySide:
    """A local Ray cluster with Serve on 127.0.0.1 and the e2vd app deployed (min_replicas 0)."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        import ray
        from ray import serve

        self.model, self.args = model, args
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace="e2vd-bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.deploy(min_replicas=0)

    def deploy(self, min_replicas: int) -> None:
        """(Re)deploy with `min_replicas`; a change of it alone keeps running replicas."""
        from ray import serve

        from e2vd.ray_serve import app

        a = self.args
        serve.run(app({"model": str(self.model), "device": "cpu", "config": os.devnull, "min_replicas": min_replicas,
                       "max_replicas": 1, "cpus_per_replica": a.cpus, "downscale_delay": DOWNSCALE_DELAY_S,
                       "max_ongoing_requests": a.clients, "metrics_interval": 0.5, "look_back_period": 2}),
                  name="e2vd", route_prefix="/")

    def client(self) -> TcpClient:
        return TcpClient(self.port)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large", choices=("tiny", "large"))
    parser.add_argument("--seconds", type=float, default=3.0, help="clip length")
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1),
                        help="the Ray cluster's CPUs and the replica's (its torch threads)")
    args = parser.parse_args()
    if shutil.which("systemd-socket-activate") is None:
        print("systemd-socket-activate is missing (apt-get install systemd)", file=sys.stderr)
        return 2
    model = standin_dir(args.preset)
    audio = wav_clip(args.seconds, seed=3)
    d: dict[str, list[float]] = {"cold": [], "warm": [], "rps": []}
    r: dict[str, list[float]] = {"cold": [], "warm": [], "rps": []}
    settings: dict[str, object] = {"idle_timeout": 600, "device": "cpu"}
    ray_side = RaySide(model, args)
    try:
        with tempfile.TemporaryDirectory(prefix="e2vd-bench-ray-") as tmp:
            for i in range(args.cold):   # taking turns, so that both see the same machine load
                d["cold"].append(daemon_cold_s(model, audio, Path(tmp), settings))
                wait_zero()
                r["cold"].append(one_request_s(ray_side.client, audio))
                print(f"cold {i + 1}: daemon {d['cold'][-1]:.3f} s, Ray Serve {r['cold'][-1]:.3f} s", flush=True)
            ray_side.deploy(min_replicas=1)   # stays up between the warm requests below
            with DaemonProcess(Path(tmp) / "warm.sock", model, wait_ready=True, **settings) as daemon:
                daemon_client = lambda: Client(str(daemon.socket), timeout=600)  # noqa: E731
                one_request_s(daemon_client, audio)
                one_request_s(ray_side.client, audio)
                for _ in range(args.warm):
                    d["warm"].append(one_request_s(daemon_client, audio))
                    r["warm"].append(one_request_s(ray_side.client, audio))
                for i in range(args.rounds):
                    d["rps"].append(burst_rps(daemon_client, audio, args.clients, args.per_client))
                    r["rps"].append(burst_rps(ray_side.client, audio, args.clients, args.per_client))
                    print(f"round {i + 1}: daemon {d['rps'][-1]:.2f} req/s, Ray Serve {r['rps'][-1]:.2f} req/s",
                          flush=True)
    finally:
        ray_side.close()
    daemon = {k: statistics.median(v) for k, v in d.items()}
    ray_result = {k: statistics.median(v) for k, v in r.items()}
    print(f"\n{args.preset} stand-in, {args.seconds:g} s clip, CPU ({os.cpu_count()} cores), "
          f"cold: median of {args.cold}, warm: median of {args.warm}, "
          f"{args.clients} clients x {args.per_client} requests: median of {args.rounds}")
    print(f"{'':24}{'daemon':>12}{'Ray Serve':>12}{'Ray/daemon':>12}")
    rows = [("cold first request, s", "cold", "{:.3f}"), ("warm request, ms", "warm", "{:.1f}"),
            (f"{args.clients} clients, req/s", "rps", "{:.2f}")]
    for label, key, fmt in rows:
        scale = 1000.0 if key == "warm" else 1.0
        dv, rv = daemon[key] * scale, ray_result[key] * scale
        print(f"{label:24}{fmt.format(dv):>12}{fmt.format(rv):>12}{rv / dv:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
