"""The low-confidence fallback's costs: what a configured but unused fallback costs (it should cost
nothing: it loads on first need), and what a request answered by the fallback costs on the CPU.

    .venv/bin/python bench/fallback.py [--primary tiny|large] [--cold 5] [--n 100] [--n-fallback 20]
                                       [--device cpu|cuda]

1. Cold start, interleaved `--cold` times each way: a daemon started with `python -m e2vd serve`
   until its first recognition is answered (process start, imports, model load, one inference),
   without a fallback and with the base stand-in configured as fallback but not used
   (fallback_below = 0: no top score is below it). Median of each and their ratio.
2. Warm requests: both daemons up at once, one 2 s clip sent `--n` times to each, alternating;
   p50 of each round trip and their ratio.
3. A daemon with fallback_below = 1 (every answer is the fallback's): the first request (the
   fallback model's load on the CPU included), then `--n-fallback` warm ones: p50 of the round
   trip and of the daemon's timing_ms.fallback, against the primary-only p50 of step 2.

The primary runs on --device (the CPU by default); the fallback on the CPU (fallback_device's
default). Figures only; nothing is asserted. Stand-ins are built on first use by
tests.conftest.standin_dir (base: ~4 s; large: minutes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as e2vd.daemon does
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from e2vd import Client  # noqa: E402


def p50(values: list[float]) -> float:
    return statistics.median(values)


def daemon(tmp: Path, name: str, primary: Path, device: str, **fallback: object):
    from daemon_proc import DaemonProcess

    return DaemonProcess(tmp / f"{name}.sock", primary, wait_ready=False, start_timeout=900,
                         idle_timeout=3600, connection_timeout=600, device=device, **fallback)


def cold_start(tmp: Path, primary: Path, device: str, clip: bytes, **fallback: object) -> float:
    """Seconds from starting a daemon to its first answer."""
    d = daemon(tmp, "cold", primary, device, **fallback)
    t0 = time.perf_counter()
    d.start()
    try:
        status, _, answer = d.request("POST", "/v1/recognize", clip)
        elapsed = time.perf_counter() - t0
        if status != 200 or answer.get("decided_by") != "primary":
            raise SystemExit(f"unexpected first answer {status}: {answer}")
        return elapsed
    finally:
        d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--primary", default="tiny", choices=("tiny", "large"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--n-fallback", type=int, default=20)
    args = parser.parse_args()

    from conftest import standin_dir, wav_clip

    primary, base = standin_dir(args.primary), standin_dir("base")
    clip = wav_clip(2.0, seed=1)
    unused = {"fallback_model": base, "fallback_below": 0.0}
    print(f"primary: {args.primary} stand-in on {args.device}; fallback: base stand-in on the CPU; "
          f"clip 2.0 s; {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="e2vd-fb-") as name:
        tmp = Path(name)
        plain, configured = [], []
        for _ in range(args.cold):
            plain.append(cold_start(tmp, primary, args.device, clip))
            configured.append(cold_start(tmp, primary, args.device, clip, **unused))
        print(f"cold start to first answer, median of {args.cold}: no fallback {p50(plain):.3f} s, "
              f"fallback configured (unused) {p50(configured):.3f} s, ratio {p50(configured) / p50(plain):.3f}")

        with daemon(tmp, "plain", primary, args.device) as a, daemon(tmp, "unused", primary, args.device,
                                                                       **unused) as b:
            a.wait_ready_state()
            b.wait_ready_state()
            ca, cb = Client(a.socket), Client(b.socket)
            for _ in range(5):
                ca.recognize(clip)
                cb.recognize(clip)
            ta, tb = [], []
            for _ in range(args.n):
                for client, times in ((ca, ta), (cb, tb)):
                    t0 = time.perf_counter()
                    r = client.recognize(clip)
                    times.append((time.perf_counter() - t0) * 1e3)
                    assert r.decided_by == "primary"
        print(f"warm request p50 of {args.n}: no fallback {p50(ta):.2f} ms, fallback configured (unused) "
              f"{p50(tb):.2f} ms, ratio {p50(tb) / p50(ta):.3f}")

        with daemon(tmp, "used", primary, args.device, fallback_model=base, fallback_below=1.0) as c:
            c.wait_ready_state()
            client = Client(c.socket)
            t0 = time.perf_counter()
            first = client.recognize(clip)
            first_ms = (time.perf_counter() - t0) * 1e3
            total, inside = [], []
            for _ in range(args.n_fallback):
                t0 = time.perf_counter()
                r = client.recognize(clip)
                total.append((time.perf_counter() - t0) * 1e3)
                inside.append(r.timing_ms["fallback"])
                assert r.decided_by == "fallback"
        print(f"first fallback request (its model's load on the CPU included): {first_ms:.0f} ms "
              f"(timing_ms.fallback {first.timing_ms['fallback']:.0f} ms)")
        print(f"warm fallback request p50 of {args.n_fallback}: {p50(total):.1f} ms round trip "
              f"(timing_ms.fallback {p50(inside):.1f} ms) vs {p50(ta):.2f} ms primary only: "
              f"+{p50(total) - p50(ta):.1f} ms, x{p50(total) / p50(ta):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
