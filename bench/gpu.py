"""GPU checks in one run, for a machine with an NVIDIA GPU: device choice through NVML, the three
precisions against fp32 on the CPU, batching, the attention cache's growth, and the whole point of
e2vd: after the idle exit the GPU holds nothing for the daemon.

    python bench/gpu.py [--preset large] [--clips 6] [--calls 30]

Prints, in this order:
  nvml      the GPUs NVML lists and what `device = "auto"` picks, with its reason;
  precision for fp32 / fp16 / bf16 on the GPU: load seconds, weights and CUDA memory, p50 of a 5 s
            call, and against fp32 on the CPU (the parity reference) the largest score difference
            and how many of the clips keep their top label;
  batch     8 equal-length 5 s clips in one batch vs one by one (largest score difference, and
            the speed-up of the batch); then 8 clips of 1-10 s in the engine's padded passes, and
            all in one pass, vs one by one (largest score and frame-embedding differences, speed-up);
  cache     CUDA memory allocated before and after 8 x 30 s clips: funasr's attention-bias cache
            keeps tensors per sequence length;
  release   the caching allocator after 8 x 30 s clips: reserved vs allocated before and after
            Engine.release_cache (what the scheduler runs after a batch when nothing waits), the
            empty_cache call's time, and the next 8 x 30 s batch's time with the cache released
            vs kept;
  gpu lock  two daemons started at the same moment with min_free_mb = free memory - 100 MiB (only
            one fits): what each answered, with their shared lock file and, for comparison, with
            a lock file each (as if there were no lock: both pass the check);
  cold start a daemon on the GPU (idle_timeout 2 s): seconds from its process start to the
            first result of a 5 s clip;
  idle exit the same daemon: NVML's memory used on the GPU and the daemon's own share while it
            runs, then after it exited by itself.
Figures only; nothing is asserted. Needs a CUDA build of torch and a GPU; the large stand-in
(~1.95 GB) is built on first use by tests.conftest.standin_dir.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MB = 1024 * 1024


def nvml_section() -> str:
    """Print the GPUs and the automatic choice; return the chosen device."""
    from e2vd import gpu

    gpus = gpu.list_gpus()
    print(f"nvml: {len(gpus)} GPU(s); problem: {gpu.nvml_problem()}")
    for g in gpus:
        print(f"  cuda:{g.index} {g.name}: {g.free_mb} MiB free of {g.total_mb} MiB (NVML index {g.nvml_index})")
    choice = gpu.choose_device("auto")
    print(f"  auto -> {choice.device}: {choice.reason}")
    return choice.device


def scores(engine, clips: list[bytes]):
    import numpy as np

    return np.array([engine.recognize(c).scores for c in clips], dtype=np.float64)


def p50_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def precision_section(model: Path, device: str, clips: list[bytes], calls: int) -> None:
    import numpy as np
    import torch
    from e2vd.engine import Engine

    cpu = Engine.load(str(model), device="cpu")
    ref = scores(cpu, clips)
    ref_top = ref.argmax(axis=1)
    del cpu
    five = clips[0]
    print(f"precision: {len(clips)} clips (2..7 s), reference fp32 on the CPU")
    for dtype in ("fp32", "fp16", "bf16"):
        t0 = time.perf_counter()
        engine = Engine.load(str(model), device=device, dtype=dtype)
        load_s = time.perf_counter() - t0
        got = scores(engine, clips)
        engine.recognize(five)
        ms = p50_ms(functools.partial(engine.recognize, five), calls)
        mem = engine.memory()
        diff = float(np.abs(got - ref).max())
        agree = int((got.argmax(axis=1) == ref_top).sum())
        print(f"  {dtype}: load {load_s:6.2f} s, weights {mem['param_bytes'] / MB:7.1f} MiB, "
              f"CUDA allocated {mem.get('cuda_allocated_bytes', 0) / MB:7.1f} MiB, "
              f"reserved {mem.get('cuda_reserved_bytes', 0) / MB:7.1f} MiB; 5 s call p50 {ms:6.2f} ms; "
              f"max |score - cpu fp32| {diff:.2e}; top label kept {agree}/{len(clips)}", flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def batch_section(model: Path, device: str) -> None:
    import numpy as np
    import torch
    from conftest import wav_clip
    from e2vd.audio import decode
    from e2vd.engine import Engine

    engine = Engine.load(str(model), device=device, batching="padded")   # a GPU's default, also on the CPU
    audios = [decode(wav_clip(5.0, seed=i)) for i in range(8)]
    one = np.array([engine.recognize_batch([a])[0].scores for a in audios])
    batch = np.array([r.scores for r in engine.recognize_batch(audios)])
    t_one = p50_ms(lambda: [engine.recognize_batch([a]) for a in audios], 5)
    t_batch = p50_ms(lambda: engine.recognize_batch(audios), 5)
    print(f"batch: 8 x 5 s clips, fp32: max |batch - one by one| {float(np.abs(one - batch).max()):.2e}; "
          f"one by one {t_one:.1f} ms, one batch {t_batch:.1f} ms ({t_one / t_batch:.2f}x)")
    mixed_batch_section(engine)
    if device.startswith("cuda"):
        before = torch.cuda.memory_allocated(device)
        engine.recognize_batch([decode(wav_clip(30.0, seed=i)) for i in range(8)])
        after = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device)
        print(f"cache: CUDA allocated {before / MB:.1f} MiB before, {after / MB:.1f} MiB after 8 x 30 s "
              f"(peak {peak / MB:.1f} MiB)", flush=True)
        del engine
        torch.cuda.empty_cache()


def mixed_batch_section(engine) -> None:
    """8 clips of 1-10 s (seeded): the padded passes the engine plans, and all 8 in one pass
    (padding unbounded), each against one by one: largest score and embedding differences, p50
    times and speed-ups."""
    import random

    import numpy as np
    from conftest import wav_clip
    from e2vd.audio import decode

    rng = random.Random(12)
    audios = [decode(wav_clip(round(rng.uniform(1.0, 10.0), 3), seed=20 + i)) for i in range(8)]
    one = [engine.recognize(a, granularity="frame", embedding=True) for a in audios]
    planned = engine.forward_passes(audios)
    saved = engine.max_padding
    try:
        for label, max_padding in ((f"planned passes {planned}", saved), ("one pass of all 8", 1.0)):
            engine.max_padding = max_padding
            got = engine.recognize_batch(audios, granularity="frame", embedding=True)
            d_score = max(float(np.abs(np.subtract(g.scores, o.scores)).max()) for g, o in zip(got, one))
            d_emb = max(float(np.abs(g.embedding - o.embedding).max()) for g, o in zip(got, one))
            t_one = p50_ms(lambda: [engine.recognize_batch([a]) for a in audios], 5)
            t_batch = p50_ms(lambda: engine.recognize_batch(audios), 5)
            print(f"mixed batch: 8 clips of 1-10 s, {engine.dtype}, {label}: max |batch - one by one| "
                  f"scores {d_score:.2e}, frame embeddings {d_emb:.2e}; one by one {t_one:.1f} ms, "
                  f"batched {t_batch:.1f} ms ({t_one / t_batch:.2f}x)", flush=True)
    finally:
        engine.max_padding = saved


def release_section(model: Path, device: str) -> None:
    """Reserved vs allocated CUDA memory after a large batch, Engine.release_cache, and what it
    costs the next large batch."""
    import torch
    from conftest import wav_clip
    from e2vd.audio import decode
    from e2vd.engine import CACHE_SLACK_BYTES, Engine

    if not device.startswith("cuda"):
        print("release: n/a (no GPU)")
        return
    engine = Engine.load(str(model), device=device)
    clips = [decode(wav_clip(30.0, seed=i)) for i in range(8)]
    engine.recognize_batch(clips)
    torch.cuda.synchronize()

    def mib(n: int) -> str:
        return f"{n / MB:.0f} MiB"

    t0 = time.perf_counter()
    done = engine.release_cache()
    release_ms = (time.perf_counter() - t0) * 1e3
    if done is None:
        print(f"release: after 8 x 30 s, reserved {mib(torch.cuda.memory_reserved(device))}, allocated "
              f"{mib(torch.cuda.memory_allocated(device))}: within the {mib(CACHE_SLACK_BYTES)} slack, kept")
    else:
        print(f"release: after 8 x 30 s, reserved {mib(done.reserved_before_bytes)}, allocated "
              f"{mib(done.allocated_bytes)}; release_cache (slack {mib(CACHE_SLACK_BYTES)}) -> reserved "
              f"{mib(done.reserved_after_bytes)} in {release_ms:.1f} ms", flush=True)
    kept = released = 0.0
    for _ in range(3):
        engine.release_cache(slack_bytes=0)
        t0 = time.perf_counter()
        engine.recognize_batch(clips)
        torch.cuda.synchronize()
        released += (time.perf_counter() - t0) / 3
        t0 = time.perf_counter()
        engine.recognize_batch(clips)
        torch.cuda.synchronize()
        kept += (time.perf_counter() - t0) / 3
    print(f"  next 8 x 30 s batch: {released * 1e3:.1f} ms after a release, {kept * 1e3:.1f} ms with the "
          f"cache kept ({released / kept:.2f}x)", flush=True)
    del engine
    torch.cuda.empty_cache()


def lock_section(model: Path, device: str) -> None:
    """Two daemons started at once with min_free_mb only one fits: sharing the lock file, and with
    a lock file each (no mutual exclusion, as before the lock)."""
    from concurrent.futures import ThreadPoolExecutor

    from daemon_proc import DaemonProcess
    from e2vd import gpu

    if not device.startswith("cuda"):
        print("gpu lock: n/a (no GPU)")
        return
    for label, shared in (("one shared lock file", True), ("a lock file each (no lock)", False)):
        index = int(device.partition(":")[2] or 0)
        free_mb = next(g.free_mb for g in gpu.list_gpus() if g.index == index)
        with tempfile.TemporaryDirectory(prefix="e2vd-l-") as tmp:
            daemons = [DaemonProcess(Path(tmp) / f"{n}.sock", model, device=device, min_free_mb=free_mb - 100,
                                     unavailable_grace=2, idle_timeout=2, start_timeout=600,
                                     **({} if shared else {"gpu_lock": f"{tmp}/{n}.lock"}))
                       for n in ("a", "b")]
            t0 = time.monotonic()
            try:
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(DaemonProcess.start, daemons))
                answers = []
                for d in daemons:
                    while True:
                        status, _, body = d.request("GET", "/v1/health")
                        if status != 200 or body.get("status") != "loading":
                            break
                        time.sleep(0.05)
                    error = body.get("error") or {}
                    answers.append(f"{status} {error.get('code') or body.get('status')} after "
                                   f"{time.monotonic() - t0:.1f} s" + (f" ({error['message'][:90]}...)" if error else ""))
                waits = sum(d.log_text().count("event=gpu_lock_wait") for d in daemons)
            finally:
                for d in daemons:
                    if d.proc is not None:
                        d.__exit__(None, None, None)
        print(f"gpu lock: 2 daemons at once, min_free_mb {free_mb - 100} ({free_mb} MiB free), {label}: "
              f"{'; '.join(answers)}; lock waits logged: {waits}", flush=True)


def idle_exit_section(model: Path, device: str) -> None:
    from conftest import wav_clip
    from daemon_proc import DaemonProcess
    from e2vd import Client, gpu

    base = gpu.device_memory(device)
    with tempfile.TemporaryDirectory(prefix="e2vd-g-") as tmp:
        d = DaemonProcess(Path(tmp) / "d.sock", model, wait_ready=True, start_timeout=600,
                          idle_timeout=2, device=device)
        t0 = time.monotonic()
        with d:
            with Client(d.socket) as c:
                r = c.recognize(wav_clip(5.0))
                cold_s = time.monotonic() - t0
                status = c.status()
            during = gpu.device_memory(device, d.proc.pid)
            t0 = time.monotonic()
            code = d.wait(120)
            exited_after = time.monotonic() - t0
        time.sleep(0.5)
        after = gpu.device_memory(device, d.proc.pid)

    def used(m):
        return _mib(m.used_bytes if m else None)

    print(f"cold start: process start to the first result {cold_s:.2f} s on {status.get('device')} "
          f"(model load {status.get('load_seconds') or 0:.2f} s)")
    print(f"idle exit: the daemon answered ({r.top.label}); GPU memory used: "
          f"{used(base)} before it started, {used(during)} while it ran (its own share per NVML: "
          f"{_mib(during.process_bytes if during else None)}), {used(after)} after it exited by itself "
          f"(exit code {code}, {exited_after:.1f} s after its last connection closed; its share now: "
          f"{_mib(after.process_bytes if after else None)})")


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="large", choices=["tiny", "large"])
    p.add_argument("--clips", type=int, default=6, help="clips compared across precisions")
    p.add_argument("--calls", type=int, default=30, help="timed 5 s calls per precision")
    p.add_argument("--device", default="auto", help="auto (as the daemon picks), cuda:N, or cpu to try the script")
    args = p.parse_args()

    import torch
    from conftest import standin_dir, wav_clip

    print(f"# gpu checks: {args.preset} stand-in; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'}", flush=True)
    device = nvml_section() if args.device == "auto" else args.device
    if not device.startswith("cuda"):
        print(f"running on {device}: the CUDA figures below are n/a")
    t0 = time.perf_counter()
    model = standin_dir(args.preset)
    print(f"stand-in ready in {time.perf_counter() - t0:.1f} s: {model}", flush=True)
    clips = [wav_clip(5.0)] + [wav_clip(2.0 + i, seed=i) for i in range(1, args.clips)]
    precision_section(model, device, clips, args.calls)
    batch_section(model, device)
    release_section(model, device)
    lock_section(model, device)
    idle_exit_section(model, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
