"""Shared fixtures: stand-in model directories and real audio files written with soundfile.

Stand-ins are built once by the project's own builder (`python -m e2vd.standin`) and cached in
`.cache/standin/<preset>-<hash of e2vd/standin.py>` so repeated runs skip the ~10 s funasr import.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "standin"
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # journal MESSAGE_ID of "Starting UNIT..."


def standin_dir(preset: str) -> Path:
    """Return a built stand-in model directory for `preset` ("tiny", "base" or "large"), building it if needed."""
    digest = hashlib.sha256((ROOT / "e2vd" / "standin.py").read_bytes()).hexdigest()[:12]
    out = CACHE / f"{preset}-{digest}"
    if not (out / "model.pt").exists():
        tmp = out.with_name(out.name + ".partial")
        subprocess.run([sys.executable, "-m", "e2vd.standin", preset, str(tmp)], check=True, cwd=ROOT)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Absolute path of the tiny stand-in model directory (a few hundred thousand parameters)."""
    return standin_dir("tiny")


@pytest.fixture(scope="session")
def base_model() -> Path:
    """Absolute path of the base stand-in model directory (emotion2vec base shape, ~95 M
    parameters, 379 MB; the fallback model of tests/test_fallback.py)."""
    return standin_dir("base")


def speechlike(seconds: float, sr: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like signal: a gliding harmonic tone with noise, shape (frames, channels)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    cols = [0.3 * voice + 0.02 * rng.standard_normal(n) for _ in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float = 2.0, sr: int = 16000, channels: int = 1,
                seed: int = 0, **sf_kwargs) -> Path:
    """Write a speech-like clip to `path` with soundfile (format from the suffix) and return the path."""
    sf.write(str(path), speechlike(seconds, sr, channels, seed), sr, **sf_kwargs)
    return path


def wav_clip(seconds: float = 2.0, seed: int = 0, sr: int = 16000) -> bytes:
    """The bytes of a speech-like mono 16-bit WAV file of `seconds`, written with soundfile."""
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, sr, seed=seed), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def wav_file(tmp_path: Path) -> Path:
    """A 2 s, 16 kHz mono 16-bit WAV file."""
    return write_audio(tmp_path / "clip.wav")


@pytest.fixture
def wav_bytes(wav_file: Path) -> bytes:
    """The bytes of `wav_file`."""
    return wav_file.read_bytes()


@pytest.fixture
def srv_model() -> Iterator[Path]:
    """An (empty) model directory in /srv, where the service's sandbox can see it (the install
    tests of tests/test_install.py and tests/test_instances.py); skips without a writable /srv."""
    try:
        Path("/srv").mkdir(exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix="e2vd-test-", dir="/srv"))
    except OSError as exc:
        pytest.skip(f"needs a writable /srv: {exc}")
    (d / "model.pt").write_bytes(b"")
    yield d
    shutil.rmtree(d)


def unit_starts(box, unit: str) -> int:
    """How many times the systemd of `box` (a tests/sdbox.Box) has begun starting `unit` so far
    (a daemon with a broken model never sends READY=1, so "Started" would miss it)."""
    out = box.run(["journalctl", "--no-pager", "-o", "cat", f"MESSAGE_ID={UNIT_STARTING}",
                   f"UNIT={unit}"], check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Starting"))


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    """Poll `cond` every 0.1 s until it is true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what}")
        time.sleep(0.1)
