#!/usr/bin/env python3
"""Cold start vs warm request through a real systemd (socket activation), tiny and large stand-ins.

Boots a throw-away systemd (tests/sdbox.py), runs `e2vd install` in it, and for each stand-in:
  cold: e2vd.service inactive (no process) -> connect to /run/e2vd/e2vd.sock -> first result:
        systemd starts the daemon, it imports torch/funasr, loads the model, answers;
  warm: the same request to the running daemon (fresh connection each time).
Prints the median of each and the ratio cold/warm.  The page cache is warm (files were read
before), so "cold" is a process cold start, not a disk cold start.  CPU only here.

    sudo .venv/bin/python bench/activation.py [--presets tiny large] [--cold 3] [--warm 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


import sdbox  # noqa: E402
from conftest import standin_dir, wav_clip  # noqa: E402
from e2vd.client import Client  # noqa: E402

PY = str(Path(sys.executable))
ENV = {"PYTHONPATH": str(ROOT)}


def request_s(sock: str, data: bytes) -> float:
    """Seconds from connect() to the decoded result, on a fresh connection."""
    t0 = time.perf_counter()
    with Client(sock, timeout=900) as c:
        r = c.recognize(data)
    assert len(r.scores) == 9
    return time.perf_counter() - t0


def measure(box: sdbox.Box, model: str, data: bytes, cold_runs: int, warm_runs: int) -> tuple[list[float], list[float]]:
    """Cold and warm request times (seconds) for `model`."""
    box.write("/etc/e2vd/e2vd.toml", f'model = "{model}"\ndevice = "cpu"\nidle_timeout = 600\n')
    sock = f"/proc/{box.init}/root/run/e2vd/e2vd.sock"
    cold, warm = [], []
    for _ in range(cold_runs):
        box.run(["systemctl", "stop", "e2vd.service"])
        state = box.run(["systemctl", "is-active", "e2vd.service"], check=False).stdout.strip()
        assert state in ("inactive", "failed"), state
        cold.append(request_s(sock, data))
        warm += [request_s(sock, data) for _ in range(warm_runs)]
    box.run(["systemctl", "stop", "e2vd.service"])
    return cold, warm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "large"], choices=["tiny", "large"])
    ap.add_argument("--cold", type=int, default=3, help="cold starts per preset")
    ap.add_argument("--warm", type=int, default=10, help="warm requests after each cold start")
    ap.add_argument("--seconds", type=float, default=2.0, help="audio length of each request")
    args = ap.parse_args()
    reason = sdbox.unavailable_reason()
    if reason:
        print(f"activation bench: cannot boot a systemd here: {reason}", file=sys.stderr)
        return 2
    models = {p: standin_dir(p) for p in args.presets}
    data = wav_clip(args.seconds)
    print(f"e2vd activation through systemd, CPU, {args.seconds:g} s clip, {os.cpu_count()} CPUs; "
          f"median of {args.cold} cold / {args.cold * args.warm} warm requests")
    # models bound read-only to a neutral path (a checkout below /home or /root is hidden from the service)
    binds = [f"{path}:/srv/e2vd-models/{preset}" for preset, path in models.items()]
    with sdbox.Box.start(f"bench-{os.getpid()}", binds_ro=binds) as box:
        box.run([PY, "-m", "e2vd", "install", "--no-pull"], env=ENV)   # each preset sets its model below
        for preset in models:
            cold, warm = measure(box, f"/srv/e2vd-models/{preset}", data, args.cold, args.warm)
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"{preset:>5}: cold start (connect -> first result) {c:7.2f} s  "
                  f"[{min(cold):.2f}..{max(cold):.2f}]   warm request {w * 1000:8.1f} ms  "
                  f"[{min(warm) * 1000:.1f}..{max(warm) * 1000:.1f}]   cold/warm = {c / w:6.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
