"""Throughput under concurrency: 16 clients at once against the daemon (each with its own Client and
connection) versus the same requests made one after another in process with Engine.recognize.
Large stand-in, on the CPU unless --device names a GPU (both sides then use it, with --dtype).

    .venv/bin/python bench/concurrency.py [--preset large] [--clients 16] [--per-client 2]
                                          [--seconds 5] [--mixed] [--rounds 2] [--max-batch N]
                                          [--device cpu|cuda] [--dtype fp32|fp16|bf16]

throughput ratio = (requests/s through the daemon with 16 concurrent clients)
                 / (requests/s of sequential in-process calls); goal >= 0.9.

By default every clip is --seconds long (the daemon can batch them however it batches). With
--mixed every request sends its own clip, its length drawn from 1-10 s (seeded: the same clips
on every run), as real clients do, and two daemons are measured against the same sequential
calls: one that batches only clips of equal length (as e2vd did before padded batching, and
still does on the CPU) and one with padded batching (a GPU's default), chosen with the engine's
benchmark switch E2VD_BENCH_BATCHING=equal|padded. With max_batch 1 (the CPU's automatic value)
neither forms batches: add --max-batch.
Each daemon's `request` events give the mean number of clips per forward pass (batch_size).
The sides alternate for --rounds rounds and the medians are printed. The in-process side runs
with the daemon's thread count and OpenMP wait policy (PASSIVE unless OMP_WAIT_POLICY is set):
with spin-waiting, its threads stall behind other processes on a shared CPU. Figures only;
nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as e2vd.daemon does; before torch loads libgomp

from e2vd import Client  # noqa: E402

#: Shortest and longest clip of --mixed, seconds.
MIXED_SECONDS = (1.0, 10.0)


def at_once(threads: list[threading.Thread], barrier: threading.Barrier) -> float:
    """Start `threads` and return the seconds from their release at `barrier` (each thread waits
    there once it is set up; so does this one, the last of the barrier's parties) until all have
    ended. Also bench/ray_serve.py's."""
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_concurrent(socket: str, clips: list[list[bytes]]) -> float:
    """Seconds for len(clips) clients, client i sending the clips of clips[i] one after another,
    all clients at once."""
    barrier = threading.Barrier(len(clips) + 1)
    errors: list[BaseException] = []

    def client(audios: list[bytes]) -> None:
        try:
            with Client(socket) as c:
                c.health()  # connect before the clock starts
                barrier.wait()
                for audio in audios:
                    c.recognize(audio)
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    elapsed = at_once([threading.Thread(target=client, args=(a,)) for a in clips], barrier)
    if errors:
        raise errors[0]
    return elapsed


def run_sequential(engine, clips: list[list[bytes]]) -> float:
    """Seconds for the same requests made one after another in process."""
    t0 = time.perf_counter()
    for r in range(max(len(c) for c in clips)):
        for audios in clips:
            if r < len(audios):
                engine.recognize(audios[r])
    return time.perf_counter() - t0


def clip_seconds(args: argparse.Namespace) -> list[list[float]]:
    """The length (s) of each client's clip for each of its requests: --seconds for all, or with
    --mixed drawn uniformly from MIXED_SECONDS (rounded to 1 ms; seeded)."""
    if not args.mixed:
        return [[args.seconds] * args.per_client for _ in range(args.clients)]
    rng = random.Random(2026)
    return [[round(rng.uniform(*MIXED_SECONDS), 3) for _ in range(args.per_client)]
            for _ in range(args.clients)]


def mean_batch_size(log_text: str, since: int) -> float:
    """Mean batch_size (clips per forward pass) of the `request` events in a daemon's stderr log
    from character `since` on; nan when there are none."""
    sizes = [int(m) for m in re.findall(r"event=request .*?batch_size=(\d+)", log_text[since:])]
    return statistics.fmean(sizes) if sizes else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="large", choices=["tiny", "large"])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length (default 5 s)")
    p.add_argument("--mixed", action="store_true",
                   help="each request its own clip of 1-10 s; equal-length-only vs padded batching")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=None, help="the daemon's max_batch (default: its own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for the daemon and the in-process engine")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision on a GPU")
    args = p.parse_args()

    import torch
    from conftest import standin_dir, wav_clip
    from daemon_proc import DaemonProcess
    from e2vd.engine import BENCH_BATCHING_ENV, Engine

    model = standin_dir(args.preset)
    seconds = clip_seconds(args)
    clips = [[wav_clip(s, seed=100 * c + r) for r, s in enumerate(row)] for c, row in enumerate(seconds)]
    n = sum(len(row) for row in clips)
    threads = torch.get_num_threads()
    audio = sum(map(sum, seconds))
    print(f"# concurrency: {args.preset} stand-in, {args.device} {args.dtype}, torch threads {threads}, "
          f"{os.cpu_count()} cores visible (shared: expect noise); {args.clients} clients x "
          f"{args.per_client} requests, clips "
          + (f"drawn from {MIXED_SECONDS[0]:g}-{MIXED_SECONDS[1]:g} s ({audio:.1f} s of audio)" if args.mixed
             else f"{args.seconds:g} s")
          + f", daemon max_batch {args.max_batch or 'auto'}; load average {os.getloadavg()[0]:.2f} at start")
    sides = {"equal-length batching": "equal", "padded batching": "padded"} if args.mixed else {"daemon": ""}
    with tempfile.TemporaryDirectory(prefix="e2vd-b-") as tmp, ExitStack() as stack:
        daemons = {}
        for i, (name, batching) in enumerate(sides.items()):
            env = {"OMP_NUM_THREADS": str(threads)}
            if batching:
                env[BENCH_BATCHING_ENV] = batching
            daemons[name] = stack.enter_context(DaemonProcess(
                Path(tmp) / f"d{i}.sock", model, wait_ready=True, start_timeout=900, env=env,
                idle_timeout=3600, connection_timeout=600, queue_size=max(64, args.clients),
                device=args.device, dtype=args.dtype,
                **({"max_batch": args.max_batch} if args.max_batch else {})))
        engine = Engine.load(str(model), device=args.device, dtype=args.dtype)
        engine.recognize(clips[0][0])
        for d in daemons.values():
            run_concurrent(str(d.socket), [[clips[0][0]], [clips[1][0]]])  # warm each daemon's worker
        seq: list[float] = []
        conc: dict[str, list[float]] = {name: [] for name in daemons}
        logged = {name: len(d.log_text()) for name, d in daemons.items()}
        for r in range(args.rounds):
            seq.append(run_sequential(engine, clips))
            line = f"round {r + 1}: sequential in-process {n / seq[-1]:.3f} req/s ({seq[-1]:.1f} s)"
            for name, d in daemons.items():
                conc[name].append(run_concurrent(str(d.socket), clips))
                line += f"; {name} {n / conc[name][-1]:.3f} req/s, ratio {seq[-1] / conc[name][-1]:.3f}"
            print(line + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
        s = statistics.median(seq)
        print(f"median of {args.rounds}: sequential {n / s:.3f} req/s")
        for name, d in daemons.items():
            c = statistics.median(conc[name])
            print(f"  {name:<22} {n / c:.3f} req/s, throughput ratio daemon/sequential {s / c:.3f} "
                  f"(goal >= 0.9); clips per forward pass {mean_batch_size(d.log_text(), logged[name]):.2f}")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
