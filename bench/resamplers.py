"""Compare resamplers on a speech-like clip: peak and RMS difference from e2vd's soxr "HQ".

Run: .venv/bin/python bench/resamplers.py
Prints, for 44.1 kHz, 48 kHz, 22.05 kHz and 8 kHz sources, the difference between e2vd.audio's
output and (a) librosa's default soxr_hq (what funasr uses without torchaudio; expected 0),
(b) soxr "VHQ", (c) torchaudio's default Resample (windowed sinc, Hann window, 6 zero crossings,
rolloff 0.99), re-implemented here in numpy because torchaudio must not be installed beside
torch 2.13, and (d) scipy's resample_poly (Kaiser-windowed FIR).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import soxr
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import speechlike  # noqa: E402
from e2vd.audio import SAMPLE_RATE, from_samples  # noqa: E402


def torchaudio_sinc(x: np.ndarray, orig: int, new: int, width_zc: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """torchaudio.functional.resample(method="sinc_interp_hann") defaults, in float64 numpy."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    width = math.ceil(width_zc * orig / base)
    idx = np.arange(-width, width + orig)[None, :] / orig
    t = (np.arange(0, -new, -1)[:, None] / new + idx) * base
    t = np.clip(t, -width_zc, width_zc)
    window = np.cos(t * math.pi / width_zc / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(t == 0, 1.0, np.sin(t) / t)
    k = k * window * base / orig
    n = len(x)
    xp = np.pad(x.astype(np.float64), (width, width + orig))
    steps = (len(xp) - k.shape[1]) // orig + 1
    frames = np.lib.stride_tricks.sliding_window_view(xp, k.shape[1])[::orig][:steps]
    out = (frames @ k.T).reshape(-1)
    return out[: math.ceil(new * n / orig)].astype(np.float32)


def main() -> None:
    import librosa

    print(f"{'source':>9} {'method':<28} {'peak diff':>10} {'rms diff':>10} {'rms signal':>10}")
    for rate in (44100, 48000, 22050, 8000):
        x = speechlike(5.0, rate, seed=1)[:, 0]
        ours = from_samples(x, rate).samples
        others = {
            "librosa soxr_hq (funasr)": librosa.resample(x, orig_sr=rate, target_sr=SAMPLE_RATE),
            "soxr VHQ": soxr.resample(x, rate, SAMPLE_RATE, quality="VHQ"),
            "torchaudio sinc_interp_hann": torchaudio_sinc(x, rate, SAMPLE_RATE),
            "scipy resample_poly": resample_poly(x, SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE),
                                                 rate // math.gcd(rate, SAMPLE_RATE)).astype(np.float32),
        }
        for name, y in others.items():
            m = min(len(y), len(ours))
            d = (ours[:m] - y[:m]).astype(np.float64)
            print(f"{rate:>9} {name:<28} {np.abs(d).max():>10.2e} {np.sqrt((d ** 2).mean()):>10.2e} "
                  f"{np.sqrt((ours.astype(np.float64) ** 2).mean()):>10.2e}")


if __name__ == "__main__":
    main()
