"""Padded batching against one by one: the largest differences, with and without each mask.

    .venv/bin/python bench/padding.py [--preset tiny|large] [--mixes 24] [--threads N]

A pool of 12 speech-like clips (0.5 s, 12 s and 10 log-uniform lengths between, each with its
own gain; seeded) is drawn into --mixes random mixes of 2-4 clips; each mix runs in ONE forward
pass on the CPU in fp32, however uneven (padding up to 96 %), and every clip is compared with
its own one-by-one result. Printed, as the largest absolute difference over all clips: scores,
frame embeddings, utterance embeddings (mean over the clip's frames), for

  masked          what the engine does (funasr's padding_mask + PositionalConvMask);
  funasr mask     funasr's own padding_mask only: the convolutional positional encoder then sees
                  the padded frames' features;
  group norm      the engine's masking on a model built with extractor_mode "default" (first
                  convolution group-normed over time), tiny sizes with random weights;
  int8            INT8 dynamic quantization, 4 clips of equal length (2 s) in one pass.

Figures only; nothing is asserted (tests/test_engine.py holds the 1e-5 contract).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import speechlike, standin_dir  # noqa: E402
from e2vd import engine as E  # noqa: E402
from e2vd.engine import Engine  # noqa: E402


def pool(n: int = 12) -> list[np.ndarray]:
    """n clips (16 kHz float32): 0.5 s, 12 s and log-uniform lengths between, gains 0.1-3."""
    seconds = [0.5, 12.0] + list(np.exp(np.random.default_rng(12).uniform(np.log(0.5), np.log(12.0), n - 2)))
    gains = np.random.default_rng(13).uniform(0.1, 3.0, n)
    return [(g * speechlike(s, seed=100 + i)[:, 0]).astype(np.float32) for i, (s, g) in enumerate(zip(seconds, gains))]


@contextlib.contextmanager
def funasr_mask_only(engine: Engine) -> Iterator[None]:
    """Within the block the engine's positional-convolution masking never switches on."""
    mask = engine._positional_mask
    assert mask is not None
    mask.active = lambda keep: contextlib.nullcontext()  # type: ignore[method-assign]
    try:
        yield
    finally:
        del mask.active


def largest(engine: Engine, clips: list[np.ndarray], mixes: int) -> tuple[float, float, float]:
    """(scores, frame embeddings, utterance embeddings): the largest |one pass - one by one| over
    `mixes` random mixes of 2-4 of `clips` (seeded)."""
    rng = np.random.default_rng(14)
    alone: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    worst = [0.0, 0.0, 0.0]
    for _ in range(mixes):
        picks = [int(i) for i in rng.choice(len(clips), size=int(rng.integers(2, 5)), replace=False)]
        probs, frames = engine.forward([clips[i] for i in picks])
        for k, i in enumerate(picks):
            if i not in alone:
                alone[i] = engine.forward([clips[i]])
            p1, f1 = alone[i]
            worst[0] = max(worst[0], float(np.abs(probs[k] - p1[0]).max()))
            worst[1] = max(worst[1], float(np.abs(frames[k] - f1[0]).max()))
            worst[2] = max(worst[2], float(np.abs(frames[k].mean(0) - f1[0].mean(0)).max()))
    return worst[0], worst[1], worst[2]


def group_norm_engine() -> Engine:
    """The tiny stand-in's architecture with extractor_mode "default", random weights (seed 0)."""
    model_dir = standin_dir("tiny")
    config = copy.deepcopy(E.read_config(model_dir))
    config["model_conf"]["modalities"]["audio"]["extractor_mode"] = "default"
    torch.manual_seed(0)
    net = E.new_emotion2vec(copy.deepcopy(config["model_conf"]), 9).eval()
    for encoder in net.modality_encoders.values():
        encoder.remove_pretraining_modules()
    return Engine(net, "group-norm variant", model_dir, "cpu", "fp32", list(E.LABELS), True, 0.0,
                  batching="padded")


def int8_equal_batch(model_dir: Path) -> float:
    """Largest score difference of 4 equal-length clips in one INT8 pass vs one by one."""
    engine = Engine.load(str(model_dir), device="cpu", quantize=True)
    clips = [(0.2 + i) * speechlike(2.0, seed=i)[:, 0] for i in range(4)]
    probs, _ = engine.forward(clips)
    return max(float(np.abs(probs[i] - engine.forward([c])[0][0]).max()) for i, c in enumerate(clips))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "large"])
    p.add_argument("--mixes", type=int, default=24)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = standin_dir(args.preset)
    engine = Engine.load(str(model_dir), device="cpu", batching="padded")
    clips = pool()
    print(f"# padding: {args.preset} stand-in, CPU fp32, {args.threads} torch threads, {args.mixes} mixes of "
          f"2-4 clips of 0.5-12 s, each mix in one forward pass; load average {os.getloadavg()[0]:.2f}")
    print(f"{'':<14} {'scores':>9} {'frames':>9} {'utterance':>10}   (largest |one pass - one by one|)")
    rows = [("masked", lambda: largest(engine, clips, args.mixes))]
    rows.append(("funasr mask", lambda: _with(funasr_mask_only(engine), lambda: largest(engine, clips, args.mixes))))
    rows.append(("group norm", lambda: largest(group_norm_engine(), clips, args.mixes)))
    for name, measure in rows:
        s, f, u = measure()
        print(f"{name:<14} {s:>9.1e} {f:>9.1e} {u:>10.1e}", flush=True)
    print(f"{'int8':<14} {int8_equal_batch(model_dir):>9.1e}   (4 clips of 2 s, equal length)")
    return 0


def _with(context: contextlib.AbstractContextManager, fn):
    """fn() inside `context`."""
    with context:
        return fn()


if __name__ == "__main__":
    raise SystemExit(main())
