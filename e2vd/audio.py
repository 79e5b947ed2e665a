"""Audio bytes -> 16 kHz mono float32 samples, with limits and errors an operator can act on.

`decode(data)` reads anything libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...) from
memory — no temporary file, no ffmpeg, no torchaudio. `from_samples(samples, rate)` applies the
same checks to an array the caller already holds. Both return an `Audio`.

Channels are downmixed by averaging (funasr's own loader hands stereo to the model as
interleaved samples, which doubles the duration and mixes channels sample by sample — wrong).

Resampling: libsoxr through python-soxr, quality "HQ" (20-bit precision, passband to 91 % of
Nyquist, linear phase), output length ceil(n * 16000 / rate). That is exactly what
`librosa.resample(..., res_type="soxr_hq")` does, and librosa is what funasr itself falls back to
when torchaudio is absent (as in this project, which must not install torchaudio): scores from
e2vd therefore match funasr's own `AutoModel.generate` on the same mono non-16 kHz file.
Emotion2vec's scores move with the resampler (its features come straight from the waveform),
so the choice is pinned here and tested for equality with librosa. Measured on a 5 s speech-like
clip (`python bench/resamplers.py`): soxr "VHQ" differs from "HQ" by < 7e-4 peak (RMS 0.1 % of
the signal's); torchaudio's default windowed-sinc Resample (Hann, 6 zero crossings, rolloff
0.99; what funasr uses when torchaudio is installed) and scipy's resample_poly differ by ~1e-2
peak (RMS ~1.5 % of the signal's), mostly near the band edge.

Limits and errors: every problem raises `AudioError(code, message)` (a ValueError) whose message
names the problem and what to do. Codes: "bad_audio" (empty, not audio, truncated or damaged,
NaN/inf samples, samples beyond ±MAX_SAMPLE_MAGNITUDE, no samples, sample rate below 4 kHz or above 384 kHz, more than 64 channels), "too_short" (< 25 ms: emotion2vec's
convolutional front end needs 400 samples at 16 kHz to produce one frame), "too_long" (more
than `max_seconds`; checked from the header before decoding when the header states a length,
and enforced again while decoding, so a lying header cannot make us decode more).
Unknown lengths: a header that states none (libsndfile reports 2^63-1 frames, e.g. a FLAC from a
streaming encoder with a zero total-samples field) or more frames than the file's bytes could
hold is not used at all: the file is read as a stream in blocks of 65536 frames, stopping one
frame past `max_seconds`, and answered like any other.
Truncation: libsndfile silently accepts a WAV whose data chunk is shorter than its header says
and reads what is there, and reads a cut Ogg stream as 0 frames; both are detected here from the
container itself (a WAV data size of 0x7FFF0000 or more is a streaming writer's "unknown
length" placeholder and is accepted; a data size of 0 with data after it is reported). A cut
FLAC fails inside libsndfile while decoding; a cut MP3 decodes fewer frames than its Xing/Info
header states (tolerance: 2 MPEG frames or 2 %, since MP3 lengths without such a header are
estimates).
MP3 garbage: data that starts like an MP3 (an ID3v2 tag or an MPEG frame sync) must begin with
3 MPEG frames that chain (each header valid, the next one where the previous frame ends, same
version, layer and rate; looked for within libmpg123's 1024-byte resync range), else it is
"bad_audio" ("not decodable audio: ... re-export it as WAV or FLAC") before libsndfile sees it.
Reason: libmpg123 prints its notes on bad frames straight to fd 2 (libsndfile never sets
MPG123_QUIET and offers no way to; its libmpg123 is linked in statically, out of reach), and
redirecting fd 2 around a decode is not safe in the threaded daemon. For the same reason the frames
must go on chaining up to the end of the data (or a trailing tag), as far as decoding within
max_seconds reaches: an MP3 damaged or cut later is refused the same way. MIDI Sample Dump (SDS)
data is refused outright: libsndfile's reader for it printf()s to stdout on every damaged block.
Sample magnitude: float samples are full scale at ±1.0, but a float file or array may hold any
finite value. The model layer-norms each whole waveform in fp32 (emotion2vec+ configs set
`normalize: true`), so its scores do not depend on the scale until the sum of squares overflows:
measured with the tiny stand-in, a 30 s clip's scores change from about 1e17 on, and scores are
NaN (an HTTP 500) from about 1e25. Samples beyond ±MAX_SAMPLE_MAGNITUDE = 2^31 are therefore
"bad_audio". The bound is the full scale of 32-bit integer PCM, the largest of any audio format:
a float file holding unscaled integer samples (a common export mistake: 16- or 32-bit values
written as float) stays within it and is still recognised correctly (tests/test_engine.py
compares a clip at full scale 1 with the same clip at 2^31), and it lies 7 orders of magnitude
below where the arithmetic fails.
"""
from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from e2vd.vocabulary import ExitCode

SAMPLE_RATE = 16000
"""Output sample rate in Hz (emotion2vec's input rate)."""
MIN_SECONDS = 0.025
"""Shortest accepted audio in seconds (400 samples at 16 kHz: one frame of the conv front end)."""
MIN_SOURCE_RATE = 4000
# Highest source sample rate accepted: 384 kHz (DXD), the highest of recording practice. With the
# per-block downmix in `decode`, the decoded audio held at once is max_seconds x rate mono float32
# samples (46 MB at 30 s): a tiny FLAC or Ogg file whose header claims 655 kHz or 255 channels of
# silence cannot make the daemon allocate gigabytes.
MAX_SOURCE_RATE = 384000
MAX_CHANNELS = 64          # most channels accepted (a block of 65536 frames is then at most 16 MB)
"""Lowest accepted source sample rate in Hz (below telephone band speech is gone)."""
RESAMPLE_QUALITY = "HQ"
"""python-soxr quality recipe; "HQ" is librosa's default `soxr_hq`, see the module docstring."""
MAX_SAMPLE_MAGNITUDE = float(2 ** 31)
"""Largest accepted |sample| (full scale of 32-bit integer PCM); see the module docstring."""
ERROR_CODES = frozenset({"bad_audio", "too_long", "too_short"})

_FORMATS = "a WAV, FLAC, OGG (Vorbis/Opus) or MP3 file"
_CONVERT = "`ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav`"
_BLOCK_FRAMES = 1 << 16
_ONE_READ_SAMPLES = 1 << 24
_MP3_FRAME = 1152
_WAV_STREAMED = 0x7FFF0000  # data sizes from here up are "length unknown" placeholders
_UNKNOWN_FRAMES = (1 << 63) - 1  # libsndfile's SF_COUNT_MAX: the header does not state the length
# More frames per byte of file than any codec libsndfile reads can hold: FLAC's densest frame
# (constant subframes, 65535 frames) takes about 10 bytes, i.e. ~6500 frames per byte.
_MAX_FRAMES_PER_BYTE = 1 << 16


class AudioError(ValueError):
    """Audio that cannot be used; `.code` is one of ERROR_CODES, `.message` equals `str(err)`."""

    exit_code = ExitCode.REJECTED

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown audio error code {code!r}; expected one of {sorted(ERROR_CODES)}")
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Audio:
    """Decoded audio ready for the model.

    samples: float32, mono, 16 kHz, 1-D, C-contiguous.
    duration_s: duration of the source audio in seconds (source frames / source rate).
    source_rate: the source sample rate in Hz. source_channels: channels before downmixing.
    """

    samples: np.ndarray
    duration_s: float
    source_rate: int
    source_channels: int


def decode(data: bytes, max_seconds: float = 30.0) -> Audio:
    """Decode an audio file held in memory (`bytes`, `bytearray` or `memoryview`).

    Raises AudioError for empty, unreadable, truncated, non-finite, too short (< 25 ms) or too
    long (> `max_seconds` seconds) audio. `max_seconds` must be positive (math.inf: no limit).
    """
    _check_limit(max_seconds)
    if isinstance(data, (str, os.PathLike)):
        raise TypeError(f"decode() takes the audio file's bytes, not a path ({data!r}); "
                        f"pass Path(...).read_bytes()")
    data = bytes(data)
    if not data:
        raise AudioError("bad_audio", f"The audio is empty (0 bytes). Send the bytes of {_FORMATS}.")
    kind = _container(data)
    problem = _container_truncation(data, kind)
    if problem:
        raise AudioError("bad_audio", f"The {kind} file is truncated: {problem}. Send the complete file.")
    if kind == "MP3" and (problem := _mpeg_start_problem(data, _mpeg_frames_to_check(max_seconds))):
        raise AudioError("bad_audio", _not_decodable_mp3(problem))
    if (refused := _refused_format(data)):
        raise AudioError("bad_audio", f"The data is {refused}, which is not accepted here: libsndfile's reader "
                                      f"for it writes a line to the daemon's stdout for every damaged block. "
                                      f"Send {_FORMATS}; convert it first, e.g. {_CONVERT}.")
    try:
        handle = _SoundFile(_Memory(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError("bad_audio", _unreadable(data, kind, err)) from None
    with handle:
        fmt = handle.format or kind
        rate, channels = int(handle.samplerate), int(handle.channels)
        declared = _declared_frames(int(handle.frames), len(data))
        handle.streaming = declared is None
        _check_rate(rate, f"The {fmt} file")
        if channels > MAX_CHANNELS:
            raise AudioError("bad_audio", (
                f"The {fmt} file has {channels} channels; at most {MAX_CHANNELS} are accepted. "
                f"Mix it down first, e.g. {_CONVERT}."))
        if declared and declared / rate > max_seconds:
            raise AudioError("too_long", _too_long(declared / rate, max_seconds, "from its header"))
        limit = math.floor(max_seconds * rate) + 1 if math.isfinite(max_seconds) else None
        blocks: list[np.ndarray] = []   # mono: each block is checked and downmixed as it is read
        total = 0
        while limit is None or total < limit:
            # Known length: read it in one go (no concatenation), at most _ONE_READ_SAMPLES at once
            # so a header that lies about a huge length cannot make us allocate it up front.
            # Unknown length: blocks of _BLOCK_FRAMES until the end or just past the limit.
            first = max(_BLOCK_FRAMES, min(declared or 0, _ONE_READ_SAMPLES // channels))
            step = _BLOCK_FRAMES if blocks else first
            want = step if limit is None else min(step, limit - total)
            try:
                block = _read_float32(handle, want)
            except (sf.LibsndfileError, RuntimeError) as err:
                where = f" after {total / rate:.3f} s" if total else ""
                if fmt == "MP3":
                    raise AudioError("bad_audio", _not_decodable_mp3(
                        f"the MPEG decoder found invalid data{where} ({_lib_reason(err)})")) from None
                raise AudioError("bad_audio", (
                    f"The {fmt} file is truncated or damaged: decoding failed{where} "
                    f"({_lib_reason(err)}). Send the complete file, or re-encode it, "
                    f"e.g. {_CONVERT}.")) from None
            if len(block) == 0:
                break
            _check_samples(block, rate, f"The {fmt} file", start=total)
            blocks.append(_downmix(block))
            total += len(block)
    if limit is not None and total >= limit:
        raise AudioError("too_long", _too_long(total / rate, max_seconds, "at least, while decoding"))
    if declared and declared - total > _shortfall_tolerance(fmt, declared):
        raise AudioError("bad_audio", (
            f"The {fmt} file is truncated: its header announces {declared / rate:.3f} s but only "
            f"{total / rate:.3f} s could be decoded. Send the complete file."))
    if total == 0 and kind == "WAV" and (trailing := _wav_unsized_data(data)):
        raise AudioError("bad_audio", (
            f"The WAV file's data chunk is marked 0 bytes long although {trailing} bytes follow "
            f"(its writer never finished the header). Rewrite it, e.g. {_CONVERT}."))
    mono = blocks[0] if len(blocks) == 1 else np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return _finish_mono(mono, rate, channels, f"The {fmt} file")


class _Memory(io.BytesIO):
    """The file's bytes as libsndfile's virtual I/O reads them (through soundfile's callbacks).

    A seek before the start goes to the start instead of raising: libsndfile asks for one on
    damaged headers (e.g. an AIFF whose chunk sizes point backwards), and an exception inside a
    soundfile callback is printed to stderr by cffi as "Exception ignored ... Traceback", which
    is noise in the daemon's journal (libsndfile gets position 0 either way, and fails or reads
    garbage it then reports)."""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` bytes from `whence`; a target before byte 0 is byte 0. The new position."""
        try:
            return super().seek(offset, whence)
        except (ValueError, OverflowError):
            return super().seek(0)


class _SoundFile(sf.SoundFile):
    """A soundfile.SoundFile that reads front to back without seeking once `streaming` is set.

    After every read soundfile seeks to the new position; libsndfile cannot seek to the end of a
    FLAC whose header leaves the length unknown, so the last read of such a file would fail.
    With `streaming` set, soundfile treats the file like a pipe: no seeks, reads of the size asked.
    """

    streaming = False

    def seekable(self) -> bool:
        """False while streaming, else whether libsndfile can seek in the file."""
        return not self.streaming and super().seekable()


def _declared_frames(frames: int, size: int) -> int | None:
    """The length in frames that libsndfile read from the header, or None if it is unknown.

    Unknown: libsndfile's SF_COUNT_MAX (2^63-1; e.g. a FLAC from a streaming encoder, whose
    STREAMINFO leaves the total 0), a negative count, or more frames than `size` bytes of file
    can hold with any codec (_MAX_FRAMES_PER_BYTE), i.e. a damaged or lying header. Such a file
    is read as a stream, never trusted for an allocation or a verdict.
    """
    if frames < 0 or frames >= _UNKNOWN_FRAMES or frames > size * _MAX_FRAMES_PER_BYTE:
        return None
    return frames


def _read_float32(handle: sf.SoundFile, frames: int) -> np.ndarray:
    """Read up to `frames` frames as float32 (frames, channels), full scale 1.0.

    16-bit PCM (most WAV files) is read as int16 and scaled here: the same values libsndfile's
    own float conversion gives (x / 32768, exact in float32), in less than half the time."""
    if handle.subtype == "PCM_16":
        block = handle.read(frames, dtype="int16", always_2d=True)
        return block.astype(np.float32) * np.float32(1.0 / 32768.0)
    return handle.read(frames, dtype="float32", always_2d=True)


def from_samples(samples: np.ndarray, rate: int, max_seconds: float = 30.0) -> Audio:
    """Check, downmix and resample samples already in memory, with the same errors as `decode`.

    `samples` is 1-D (mono) or 2-D shaped (frames, channels) like soundfile returns. Floats are
    taken as they are (full scale 1.0); integer samples are scaled to [-1, 1) by their dtype
    (int8/int16/int32 signed, uint8 offset by 128). `rate` is the sample rate in Hz.
    """
    _check_limit(max_seconds)
    what = "The samples"
    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim != 2:
        raise AudioError("bad_audio", f"{what} have shape {arr.shape}; pass a 1-D array (mono) or "
                                      f"a 2-D array shaped (frames, channels).")
    if arr.shape[1] > MAX_CHANNELS:
        raise AudioError("bad_audio", f"{what} have shape {arr.shape}, i.e. {arr.shape[1]} channels; "
                                      f"pass (frames, channels) — transpose a (channels, frames) array.")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise AudioError("bad_audio", f"The sample rate must be a whole number of Hz, got {rate!r}.")
    rate = int(rate)
    _check_rate(rate, what)
    check_duration(len(arr) / rate, max_seconds)
    if arr.dtype.kind == "f" and arr.size:
        _check_samples(arr, rate, what)   # before float32, which would turn 1e300 into inf
    return _finish(_to_float32(arr, what), rate, what)


def check_duration(duration_s: float, max_seconds: float) -> None:
    """Raise AudioError "too_long" if `duration_s` exceeds `max_seconds` (both in seconds; the
    limit itself is allowed), with the same message as `decode`."""
    if duration_s > max_seconds:
        raise AudioError("too_long", _too_long(duration_s, max_seconds, ""))


def _finish(frames: np.ndarray, rate: int, what: str) -> Audio:
    """Reject empty/short/non-finite/out-of-range audio, downmix (frames, channels) float32 and
    resample."""
    _check_samples(frames, rate, what)
    return _finish_mono(_downmix(frames), rate, frames.shape[1], what)


def _finish_mono(mono: np.ndarray, rate: int, channels: int, what: str) -> Audio:
    """Reject empty/short audio (already downmixed, its samples checked) and resample."""
    n = len(mono)
    if n == 0:
        raise AudioError("bad_audio", f"{what} holds no audio samples (0 frames). "
                                      f"Send audio of at least {MIN_SECONDS * 1000:.0f} ms.")
    duration = n / rate
    if duration < MIN_SECONDS:
        raise AudioError("too_short", (
            f"{what} is {_beside(duration * 1000, MIN_SECONDS * 1000)} ms long; at least "
            f"{_number(MIN_SECONDS * 1000)} ms is needed. Send a longer recording."))
    return Audio(samples=_resample(mono, rate), duration_s=duration,
                 source_rate=rate, source_channels=channels)


def _check_samples(frames: np.ndarray, rate: int, what: str, start: int = 0) -> None:
    """Raise AudioError "bad_audio" for NaN or infinite samples, or samples beyond
    ±MAX_SAMPLE_MAGNITUDE, naming how many and where the first one is (`frames` begins at frame
    `start` of the audio; `decode` checks block by block, so the count is the first bad block's).

    Two reductions without a temporary array on the common path: NaN makes both comparisons
    false, so one test catches NaN, infinity and out-of-range values alike."""
    if not frames.size or (frames.min() >= -MAX_SAMPLE_MAGNITUDE and frames.max() <= MAX_SAMPLE_MAGNITUDE):
        return
    finite = np.isfinite(frames)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise AudioError("bad_audio", (
            f"{what} contains {int((~finite).sum())} NaN or infinite sample values (first at "
            f"{(start + bad[0]) / rate:.3f} s). Fix or re-export the recording; a float WAV written from a "
            f"failed computation is the usual cause."))
    loud = np.abs(frames) > MAX_SAMPLE_MAGNITUDE
    first = int(np.flatnonzero(loud.any(axis=1))[0])
    raise AudioError("bad_audio", (
        f"{int(loud.sum())} sample value(s) of {what[0].lower() + what[1:]} lie beyond ±2^31 = "
        f"{MAX_SAMPLE_MAGNITUDE:.0f} (peak {float(np.abs(frames).max()):.3g}, first at "
        f"{(start + first) / rate:.3f} s): float audio is full scale at ±1.0 and no audio format reaches "
        f"that far, so these are not audio samples (the model's arithmetic would overflow on them). "
        f"Re-export the recording, or scale the samples into [-1, 1] (divide by their peak)."))


def _downmix(frames: np.ndarray) -> np.ndarray:
    """Average of the channels of (frames, channels) float32, column by column (numpy's
    mean(axis=1) over a short axis is ~20x slower on long clips)."""
    if frames.shape[1] == 1:
        return frames[:, 0]
    mono = frames[:, 0].copy()
    for c in range(1, frames.shape[1]):
        mono += frames[:, c]
    mono /= np.float32(frames.shape[1])
    return mono


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    """Resample 1-D float32 to SAMPLE_RATE with soxr HQ; length ceil(n * 16000 / rate) like librosa."""
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return mono
    out = soxr.resample(mono, rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    size = math.ceil(len(mono) * SAMPLE_RATE / rate)
    if len(out) < size:
        out = np.pad(out, (0, size - len(out)))
    return np.ascontiguousarray(out[:size], dtype=np.float32)


def _to_float32(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "i" and arr.dtype.itemsize in (1, 2, 4):
        return (arr.astype(np.float32) / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)
    if arr.dtype == np.uint8:
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    raise AudioError("bad_audio", f"{what} have dtype {arr.dtype}; pass float32/float64 in [-1, 1] "
                                  f"or int16/int32 PCM.")


def _check_limit(max_seconds: float) -> None:
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")


def _check_rate(rate: int, what: str) -> None:
    if rate < MIN_SOURCE_RATE:
        raise AudioError("bad_audio", (
            f"{what} has a sample rate of {rate} Hz; at least {MIN_SOURCE_RATE} Hz is needed for "
            f"speech. Check how it was recorded or exported."))
    if rate > MAX_SOURCE_RATE:
        raise AudioError("bad_audio", (
            f"{what} has a sample rate of {rate} Hz; at most {MAX_SOURCE_RATE} Hz is accepted (the model "
            f"hears 16 kHz). Re-export it at a usual rate, e.g. {_CONVERT}."))


def _too_long(seconds: float, max_seconds: float, how: str) -> str:
    """The "too_long" message for audio of `seconds` against the limit `max_seconds`."""
    how = f" ({how})" if how else ""
    limit = _number(max_seconds)
    return (f"The audio is {_beside(seconds, max_seconds)} s long{how}; the limit is {limit} s "
            f"(inference cost grows with the square of the length). Cut it into pieces of at most "
            f"{limit} s, e.g. `sox IN.wav OUT.wav trim 0 {limit} : newfile : restart`, or raise "
            f"max_seconds.")


def _beside(value: float, limit: float) -> str:
    """`value` with one decimal, or as many more (up to 9) as it takes to read differently from
    `limit`: 30.01 against 30 is "30.01", not "30.0"; one frame past 30 s at 16 kHz "30.0001"."""
    for decimals in range(1, 10):
        text = f"{value:.{decimals}f}"
        if float(text) != limit:
            break
    return text


def _number(value: float) -> str:
    """A limit as the operator wrote it: 30 -> "30", 2.55 -> "2.55" (no rounding to 6 digits)."""
    return f"{value:.15g}"


def _shortfall_tolerance(fmt: str, declared: int) -> int:
    """Frames an MP3 may decode short of its announced length (lengths are estimates); 0 elsewhere."""
    return max(2 * _MP3_FRAME, declared // 50) if fmt == "MP3" else 0


def _container(data: bytes) -> str:
    """A human name for the container, from its magic bytes ("audio" when unknown)."""
    if data[:4] in (b"RIFF", b"RIFX", b"RF64"):
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "MP3"
    if data[:4] == b"FORM":
        return "AIFF"
    return "audio"


# MIDI Sample Dump Standard, as libsndfile recognises it (F0 7E xx 01, bit 7 of xx clear): its
# reader printf()s "Error A : .." and "Error 1 : .." to stdout for every damaged 127-byte block
# (src/sds.c), so one hostile upload could write hundreds of thousands of lines to the journal.
_SDS_MASK, _SDS_MAGIC = bytes((0xFF, 0xFF, 0x80, 0xFF)), bytes((0xF0, 0x7E, 0x00, 0x01))


def _refused_format(data: bytes) -> str | None:
    """What the data is when libsndfile would read it as a format refused here (only MIDI Sample
    Dump, see _SDS_MAGIC), else None. Looked for where libsndfile looks: at the start, and after
    any ID3v2 tags (libsndfile skips those and identifies what follows)."""
    start = _id3_end(data)
    head = data[start:start + 4]
    if len(head) == 4 and bytes(a & b for a, b in zip(head, _SDS_MASK)) == _SDS_MAGIC:
        return "a MIDI Sample Dump (SDS)" + (f" after an ID3 tag of {start} bytes" if start else "")
    return None


def _id3_end(data: bytes) -> int:
    """The offset just past the ID3v2 tags at the start of `data` (0 without one; a cut-off or
    malformed tag ends the walk where it begins)."""
    pos = 0
    while data.startswith(b"ID3", pos):
        header = data[pos:pos + 10]
        if len(header) < 10 or any(b & 0x80 for b in header[6:10]):
            return pos
        size = (header[6] << 21) | (header[7] << 14) | (header[8] << 7) | header[9]
        pos += 10 + size + (10 if header[5] & 0x10 else 0)
    return pos


def _container_truncation(data: bytes, kind: str) -> str | None:
    """Why a WAV or Ogg container is cut short, or None. libsndfile accepts both silently."""
    if kind == "WAV" and data[:4] == b"RIFF":
        return _wav_truncation(data)
    if kind == "OGG":
        return _ogg_truncation(data)
    return None


def _wav_truncation(data: bytes) -> str | None:
    if len(data) < 12:
        return f"it ends after {len(data)} bytes, inside the RIFF header"
    if data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"data":
            available = len(data) - offset - 8
            if size >= _WAV_STREAMED and available < size:
                return None  # a placeholder written by a streaming writer (ffmpeg, arecord to a pipe)
            if available < size:
                return (f"its header announces {size} bytes of audio data but only {available} "
                        f"bytes follow ({100 * available / size:.0f} %)")
            return None
        offset += 8 + size + (size & 1)
    return f"it ends after {len(data)} bytes, before the audio data begins (no complete 'data' chunk)"


def _wav_unsized_data(data: bytes) -> int:
    """Bytes after a RIFF/WAVE 'data' chunk header whose size field is 0 (else 0)."""
    offset = 12
    while data[8:12] == b"WAVE" and offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"data":
            return len(data) - offset - 8 if size == 0 else 0
        offset += 8 + size + (size & 1)
    return 0


def _ogg_truncation(data: bytes) -> str | None:
    """Walk the Ogg pages: the last page must be complete and carry the end-of-stream flag."""
    offset, last_flags = 0, None
    while offset < len(data):
        if data[offset:offset + 4] != b"OggS":
            return None  # trailing junk or not a plain Ogg stream: leave the verdict to libsndfile
        if offset + 27 > len(data):
            return f"its last Ogg page header is cut off at byte {len(data)}"
        segments = data[offset + 26]
        if offset + 27 + segments > len(data):
            return f"its last Ogg page header is cut off at byte {len(data)}"
        body = sum(data[offset + 27:offset + 27 + segments])
        end = offset + 27 + segments + body
        if end > len(data):
            return f"its last Ogg page needs {end - len(data)} more bytes"
        last_flags, offset = data[offset + 5], end
    if last_flags is not None and not last_flags & 0x04:
        return "its last Ogg page is not marked end-of-stream (the file was cut at a page boundary)"
    return None


def _lib_reason(err: BaseException) -> str:
    """libsndfile's own words, without soundfile's "Error opening <_io.BytesIO ...>:" prefix."""
    text = (getattr(err, "error_string", None) or str(err)).strip().rstrip(".")
    if text.startswith("Error : "):
        text = text[len("Error : "):]
    return "libsndfile: " + text


def _unreadable(data: bytes, kind: str, err: BaseException) -> str:
    reason = _lib_reason(err)
    if kind == "MP3":   # past _mpeg_start_problem: its first frames look right, libmpg123 still refused it
        if data[:3] == b"ID3":
            return _not_decodable_mp3(f"what follows its ID3 tag is neither MPEG audio nor another format ({reason})")
        return _not_decodable_mp3(f"the MPEG decoder could not read its first frames ({reason})")
    if kind != "audio":
        return (f"The {kind} file cannot be decoded ({reason}); it is truncated or damaged. Send the "
                f"complete file, or re-encode it, e.g. {_CONVERT}.")
    if data[4:8] == b"ftyp":
        found = "an MP4/M4A (AAC) file"
    elif data[:4] == b"\x1aE\xdf\xa3":
        found = "a WebM/Matroska file"
    else:
        found = f"not an audio file ({len(data)} bytes starting with {data[:12]!r})"
    return (f"The data is {found}, which libsndfile cannot read ({reason}). Send {_FORMATS}; "
            f"convert other formats first, e.g. {_CONVERT}.")


# --- MPEG audio (MP3) frames ---------------------------------------------------------------------
# Bitrates in kbit/s by bitrate index (1..14; 0 is "free format", 15 is invalid), for
# MPEG-1 layers I, II, III and MPEG-2/2.5 layer I, layers II and III (ISO 11172-3, 13818-3).
_MPEG_BITRATES = {
    (1, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
_MPEG_CHECKED_FRAMES = 3      # consecutive frames that must chain at the start of an MP3
_MPEG_RESYNC_BYTES = 1024     # libmpg123's default resync limit: how far it looks for a first frame
_MP3_TRAILERS = (b"TAG", b"APETAGEX", b"LYRICSBEGIN", b"ID3", b"3DI")   # tags that may follow the frames


def _mpeg_frame(data: bytes, pos: int) -> tuple[int, int, int, int] | None:
    """(version bits, layer, sample rate, frame length in bytes) of a valid MPEG audio frame header
    at `pos` (length 0: free format, not computable), or None. The checks are libmpg123's own:
    11 sync bits, no reserved version, layer, bitrate index 15 or sample rate index 3."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (data[pos + 1] >> 3) & 3, (data[pos + 1] >> 1) & 3
    bitrate_index, rate_index, padding = data[pos + 2] >> 4, (data[pos + 2] >> 2) & 3, (data[pos + 2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index == 15 or rate_index == 3:
        return None
    layer, rate = 4 - layer_bits, _MPEG_RATES[version][rate_index]
    if bitrate_index == 0:
        return version, layer, rate, 0
    table = (1, layer) if version == 3 else (2, 1 if layer == 1 else 2)
    bitrate = _MPEG_BITRATES[table][bitrate_index - 1] * 1000
    if layer == 1:
        size = (12 * bitrate // rate + padding) * 4
    elif layer == 3 and version != 3:
        size = 72 * bitrate // rate + padding
    else:
        size = 144 * bitrate // rate + padding
    return version, layer, rate, size


def _mpeg_frames_to_check(max_seconds: float) -> int | None:
    """How many MPEG frames decoding `max_seconds` (plus 1 s that libmpg123 may read ahead) can
    reach: 125 frames a second at most (layer I, 384 samples a frame, 48 kHz). None: no limit."""
    return math.ceil((max_seconds + 1) * 125) if math.isfinite(max_seconds) else None


def _mpeg_chain(data: bytes, start: int, frames: int | None = _MPEG_CHECKED_FRAMES) -> str | None:
    """Why the MPEG frames from `start` do not chain for `frames` frames (None: to the end of the
    data; each header valid, each next one where the previous frame ends, same version, layer and
    rate), or None. The data may end at a frame boundary or continue with a tag after the first frame."""
    first = _mpeg_frame(data, start)
    if first is None:
        return f"the bytes at offset {start} are not a valid MPEG frame header ({data[start:start + 4].hex()})"
    pos, index = start, 0
    while frames is None or index < frames:
        frame = _mpeg_frame(data, pos)
        if frame is None or frame[:3] != first[:3]:
            if index and data.startswith(_MP3_TRAILERS, pos):
                return None
            return (f"its MPEG frames break off at byte {pos}: frame {index + 1} should begin there, but the "
                    f"bytes there ({data[pos:pos + 4].hex() or 'none'}) are no frame header of the same stream")
        if frame[3] == 0:
            return None   # free format: the length is not in the header; leave the verdict to libmpg123
        pos += frame[3]
        if pos > len(data):
            return f"it ends at byte {len(data)}, inside MPEG frame {index + 1}, which needs {pos} bytes"
        if pos == len(data):
            return None
        index += 1
    return None


def _mpeg_start_problem(data: bytes, frames: int | None = None) -> str | None:
    """Why data that starts like an MP3 (an ID3v2 tag or an MPEG frame sync) holds no MPEG audio
    stream, or None when its first frames look right (or something else follows its ID3 tags,
    which libsndfile then identifies on its own).

    libmpg123 writes its complaints about bad frames straight to the process's fd 2 (libsndfile
    never sets MPG123_QUIET, and its libmpg123 is linked in statically, out of reach); a daemon
    cannot redirect fd 2 around one decode without taking other threads' output with it. So
    garbage is refused here, before libmpg123 sees it: like libmpg123, the first frame is looked
    for within _MPEG_RESYNC_BYTES of the start, but it must be followed by frames of the same
    stream, so that random bytes are not taken for one. From that first frame on, the frames must
    chain for `frames` frames (None: to the end; the most decoding within max_seconds can reach) up
    to the end of the data or a trailing tag: a break or a cut in the middle is refused here too,
    since libmpg123 writes a note to fd 2 for every resync over damaged data (dozens of lines for
    one damaged upload)."""
    pos = 0
    while data.startswith(b"ID3", pos):
        header = data[pos:pos + 10]
        if len(header) < 10 or any(b & 0x80 for b in header[6:10]):
            return f"its ID3 tag at byte {pos} is cut off or malformed"
        size = (header[6] << 21) | (header[7] << 14) | (header[8] << 7) | header[9]
        pos += 10 + size + (10 if header[5] & 0x10 else 0)
        if pos >= len(data):
            return "it is only an ID3 tag, with no audio after it"
    if data[pos] != 0xFF or data[pos + 1:pos + 2] and data[pos + 1] & 0xE0 != 0xE0:
        return None if pos else "its first bytes are not an MPEG frame header"
    problem = _mpeg_chain(data, pos)
    if problem is None or _mpeg_frame(data, pos) is not None:   # libmpg123 takes a valid header for the first frame
        return problem or _mpeg_chain(data, pos, frames)
    for start in range(pos + 1, min(len(data) - 3, pos + _MPEG_RESYNC_BYTES)):
        if data[start] == 0xFF and _mpeg_chain(data, start) is None:
            return _mpeg_chain(data, start, frames)
    return problem


def _not_decodable_mp3(problem: str) -> str:
    return (f"The data is not decodable audio: it looks like an MP3 file, but {problem}. The file is damaged, "
            f"truncated or not an MP3 at all. Send the complete file, or re-export it as WAV or FLAC, "
            f"e.g. {_CONVERT}.")
