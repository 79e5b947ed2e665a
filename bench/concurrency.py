"""Throughput under concurrency: 16 clients at once against the daemon (each with its own Client and
connection) versus the same number of Engine.recognize calls made one after another in process.
Large stand-in, on the CPU unless --device names a GPU (both sides then use it, with --dtype).

    .venv/bin/python bench/concurrency.py [--preset large] [--clients 16] [--per-client 2]
                                          [--seconds 5] [--mixed] [--rounds 2] [--max-batch N]
                                          [--device cpu|cuda] [--dtype fp32|fp16|bf16]

throughput ratio = (requests/s through the daemon with 16 concurrent clients)
                 / (requests/s of sequential in-process calls); goal >= 0.9.
With --mixed every client sends a clip of a different length (3..7 s), so the daemon cannot batch
equal lengths together (its worst case); by default all clips are 5 s long. The two sides alternate
for --rounds rounds and the median is printed. Figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from e2vd import Client  # noqa: E402


def run_concurrent(socket: str, clips: list[bytes], per_client: int) -> float:
    """Seconds for len(clips) clients, client i sending clips[i] `per_client` times, all at once."""
    barrier = threading.Barrier(len(clips) + 1)
    errors: list[BaseException] = []

    def client(audio: bytes) -> None:
        try:
            with Client(socket) as c:
                c.health()  # connect before the clock starts
                barrier.wait()
                for _ in range(per_client):
                    c.recognize(audio)
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(a,)) for a in clips]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def run_sequential(engine, clips: list[bytes], per_client: int) -> float:
    """Seconds for the same requests made one after another in process."""
    t0 = time.perf_counter()
    for _ in range(per_client):
        for audio in clips:
            engine.recognize(audio)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="large", choices=["tiny", "large"])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length (default 5 s)")
    p.add_argument("--mixed", action="store_true", help="a different clip length per client (3..7 s)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=None, help="the daemon's max_batch (default: its own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for the daemon and the in-process engine")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision on a GPU")
    args = p.parse_args()

    import torch
    from conftest import standin_dir, wav_clip
    from daemon_proc import DaemonProcess
    from e2vd.engine import Engine

    model = standin_dir(args.preset)
    if args.mixed:
        lengths = [3.0 + 4.0 * i / max(1, args.clients - 1) for i in range(args.clients)]
    else:
        lengths = [args.seconds] * args.clients
    clips = [wav_clip(s, seed=i) for i, s in enumerate(lengths)]
    n = args.clients * args.per_client
    threads = torch.get_num_threads()
    print(f"# concurrency: {args.preset} stand-in, {args.device} {args.dtype}, torch threads {threads}, {os.cpu_count()} cores "
          f"visible (shared: expect noise); {args.clients} clients x {args.per_client} requests, "
          f"clips {'3..7 s mixed' if args.mixed else f'{args.seconds:g} s'}"
          + (f", daemon max_batch {args.max_batch}" if args.max_batch else ""))
    with tempfile.TemporaryDirectory(prefix="e2vd-b-") as tmp:
        with DaemonProcess(Path(tmp) / "d.sock", model, wait_ready=True, start_timeout=900,
                           env={"OMP_NUM_THREADS": str(threads)}, idle_timeout=3600,
                           connection_timeout=600, queue_size=max(64, args.clients),
                           device=args.device, dtype=args.dtype,
                           **({"max_batch": args.max_batch} if args.max_batch else {})) as d:
            engine = Engine.load(str(model), device=args.device, dtype=args.dtype)
            engine.recognize(clips[0])
            run_concurrent(str(d.socket), clips[:2], 1)  # warm the daemon's worker
            seq, conc = [], []
            for r in range(args.rounds):
                seq.append(run_sequential(engine, clips, args.per_client))
                conc.append(run_concurrent(str(d.socket), clips, args.per_client))
                print(f"round {r + 1}: sequential in-process {n / seq[-1]:.3f} req/s ({seq[-1]:.1f} s), "
                      f"daemon {args.clients} clients {n / conc[-1]:.3f} req/s ({conc[-1]:.1f} s), "
                      f"ratio {seq[-1] / conc[-1]:.3f}", flush=True)
            served = d.request("GET", "/v1/status")[2].get("requests_served")
    s, c = statistics.median(seq), statistics.median(conc)
    print(f"median: sequential {n / s:.3f} req/s, daemon {n / c:.3f} req/s, "
          f"throughput ratio daemon/sequential {s / c:.3f} (goal >= 0.9); daemon served {served} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
