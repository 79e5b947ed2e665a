"""Cold start: time to first result and peak memory of funasr's AutoModel path vs e2vd's Engine.

Both run in a fresh Python process on the `large` stand-in (real sizes, ~1.95 GB model.pt) and
recognize the same 5 s WAV file on the CPU:

  (a) the seed's path: ``AutoModel(model=DIR, disable_update=True, device="cpu").generate(WAV)``
  (b) e2vd:            ``Engine.load(DIR, device="cpu").recognize(<bytes of WAV>)``

Time is measured by this process from starting the child to reading its result line (interpreter
start, imports, model load, decoding, inference); each child also reports its phases. Also
printed: "model ready" (process start to the model being loaded, before the first inference:
the part the engine changes; the inference is the same work in both paths, so on a slow CPU it
bounds the first-result ratio) and CPU time (user + system, from wait4; on a shared machine it
moves much less with other people's load than wall time). Peak RSS is the child's ru_maxrss.
The model file is read once beforehand so both paths find it in the page cache. Both paths run
with the same number of torch threads (--threads): more threads take a larger share of a
shared CPU.

Usage: ``python bench/cold_start.py [--model DIR] [--seconds 5] [--repeat 1] [--threads N]``
(without --model the large stand-in is built once into .cache/standin/, ~2 GB).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "E2VD_BENCH_RESULT"
READY = "E2VD_BENCH_READY"

FUNASR_CHILD = f"""
import sys, time
t0 = time.perf_counter()
from funasr import AutoModel
t1 = time.perf_counter()
model = AutoModel(model=sys.argv[1], disable_update=True, device="cpu", disable_pbar=True,
                  ncpu=int(sys.argv[3]))
t2 = time.perf_counter()
print("{READY}", flush=True)
res = model.generate(sys.argv[2])[0]
t3 = time.perf_counter()
best = max(range(len(res["scores"])), key=res["scores"].__getitem__)
print("{MARK}", res["labels"][best], res["scores"][best],
      f"(import {{t1 - t0:.1f}} s, load {{t2 - t1:.1f}} s, recognize {{t3 - t2:.1f}} s)", flush=True)
"""

ENGINE_CHILD = f"""
import sys, time
t0 = time.perf_counter()
from e2vd.engine import Engine
import torch
torch.set_num_threads(int(sys.argv[3]))
t1 = time.perf_counter()
engine = Engine.load(sys.argv[1], device="cpu")
t2 = time.perf_counter()
print("{READY}", flush=True)
with open(sys.argv[2], "rb") as f:
    top = engine.recognize(f.read()).top
t3 = time.perf_counter()
print("{MARK}", top.label, top.score,
      f"(import {{t1 - t0:.1f}} s, load {{t2 - t1:.1f}} s, recognize {{t3 - t2:.1f}} s)", flush=True)
"""


@dataclass(frozen=True)
class Run:
    """One cold start: wall seconds from process start to its first result and to its model being
    loaded, CPU seconds (user + system) the process used in all, peak RSS in bytes."""

    seconds: float
    ready_seconds: float
    cpu_seconds: float
    peak_rss: int
    result: str


def cold_start(code: str, model: Path, wav: Path, threads: int) -> Run:
    """Run `code` in a fresh interpreter with argv (model, wav, threads); time it, take its peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(model), str(wav), str(threads)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    result, seconds, ready = "", float("nan"), float("nan")
    for line in proc.stdout:
        if line.startswith(READY):
            ready = time.perf_counter() - start
        if line.startswith(MARK):
            seconds = time.perf_counter() - start
            result = line[len(MARK):].strip()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result:
        raise SystemExit(f"benchmark child failed (exit {proc.returncode}); run it by hand:\n"
                         f"{sys.executable} -c '{code}' {model} {wav} {threads}")
    return Run(seconds, ready, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, result)


def large_standin() -> Path:
    """The large stand-in directory, built on first use by the tests' shared helper."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import standin_dir  # noqa: E402 - the one place that names the stand-in cache

    return standin_dir("large")


def write_clip(path: Path, seconds: float) -> Path:
    """Write a speech-like 16 kHz mono 16-bit WAV of `seconds` to `path`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_audio  # noqa: E402

    return write_audio(path, seconds=seconds)


def warm_page_cache(path: Path) -> None:
    """Read `path` once so that neither benchmarked path pays for the first disk read."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the large stand-in)")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length in seconds")
    parser.add_argument("--repeat", type=int, default=1, help="cold starts per path (best is kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads in both paths (default: the CPU count; funasr's own "
                             "default would be 4)")
    args = parser.parse_args(argv)

    model = (args.model or large_standin()).resolve()
    weights = model / "model.pt"
    warm_page_cache(weights)
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_clip(Path(tmp) / "clip.wav", args.seconds)
        runs = {}
        for name, code in (("a", FUNASR_CHILD), ("b", ENGINE_CHILD)):
            tries = [cold_start(code, model, wav, args.threads) for _ in range(args.repeat)]
            runs[name] = min(tries, key=lambda r: r.seconds)

    a, b = runs["a"], runs["b"]
    gb = 1e9
    print(f"cold start, {args.seconds:g} s clip, CPU ({os.cpu_count()} cores, {args.threads} torch "
          f"threads in both paths), model {model}")
    print(f"  model.pt {weights.stat().st_size / gb:.2f} GB; best of {args.repeat} per path")
    print(f"  {'path':<32} {'first result':>12} {'CPU time':>10} {'peak RSS':>10} {'model ready':>12}"
          "  top label (phases, wall)")
    for label, run in (("(a) funasr AutoModel.generate", a), ("(b) e2vd Engine.load+recognize", b)):
        print(f"  {label:<32} {run.seconds:>10.2f} s {run.cpu_seconds:>8.2f} s "
              f"{run.peak_rss / gb:>7.2f} GB {run.ready_seconds:>10.2f} s  {run.result}")
    time_ratio, rss_ratio = b.seconds / a.seconds, b.peak_rss / a.peak_rss
    cpu_ratio, ready_ratio = b.cpu_seconds / a.cpu_seconds, b.ready_seconds / a.ready_seconds
    print(f"  {'ratio (b)/(a)':<32} {time_ratio:>12.3f} {cpu_ratio:>10.3f} {rss_ratio:>10.3f} "
          f"{ready_ratio:>12.3f}")
    time_ok, rss_ok = time_ratio <= 0.2, b.peak_rss <= 1.6 * gb
    print(f"goal time (b) <= 0.2 x (a): {'met' if time_ok else 'NOT met'} ({time_ratio:.3f}); "
          f"goal peak RSS (b) <= 1.6 GB: {'met' if rss_ok else 'NOT met'} ({b.peak_rss / gb:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
