"""e2vd.audio on real files written by soundfile: formats, downmix, resampling, every error path."""
from __future__ import annotations

import io
import math
import struct
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from conftest import speechlike
from e2vd.audio import MAX_SAMPLE_MAGNITUDE, MIN_SECONDS, SAMPLE_RATE, Audio, AudioError, decode, from_samples
from e2vd.vocabulary import ExitCode


def encode(seconds: float = 1.0, sr: int = 16000, channels: int = 1, fmt: str = "WAV",
           subtype: str | None = None, data: np.ndarray | None = None, seed: int = 0) -> bytes:
    """Bytes of a speech-like clip written by soundfile in memory."""
    buf = io.BytesIO()
    x = speechlike(seconds, sr, channels, seed) if data is None else data
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def error(data: bytes, **kw) -> AudioError:
    with pytest.raises(AudioError) as info:
        decode(data, **kw)
    err = info.value
    assert str(err) == err.message
    return err


# --- formats --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,subtype,tol", [
    ("WAV", "PCM_16", 1e-4), ("WAV", "FLOAT", 0.0), ("FLAC", "PCM_24", 1e-6),
    ("OGG", "VORBIS", None), ("OGG", "OPUS", None), ("MP3", "MPEG_LAYER_III", None),
])
def test_formats_decode_to_16k_mono(fmt, subtype, tol):
    sr = 48000 if subtype == "OPUS" else 16000  # Opus only takes 8/12/16/24/48 kHz; test 48 kHz
    src = speechlike(1.5, sr)
    audio = decode(encode(data=src, sr=sr, fmt=fmt, subtype=subtype))
    assert isinstance(audio, Audio)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.samples.flags.c_contiguous
    assert audio.source_rate == sr and audio.source_channels == 1
    assert audio.duration_s == pytest.approx(1.5, abs=0.001)
    assert len(audio.samples) == pytest.approx(1.5 * SAMPLE_RATE, abs=1)
    if tol is not None:
        np.testing.assert_allclose(audio.samples, src[:, 0], atol=tol)
    else:  # lossy codecs: the decoded signal still correlates with the source
        ref = from_samples(src, sr).samples
        n = min(len(ref), len(audio.samples))
        lag = int(np.argmax(np.correlate(audio.samples[:4000], ref[:2000], "valid")))
        corr = np.corrcoef(audio.samples[lag:n], ref[:n - lag])[0, 1]
        assert corr > 0.9, (fmt, subtype, lag, corr)


def test_memoryview_and_bytearray_accepted(wav_bytes):
    a = decode(wav_bytes)
    np.testing.assert_array_equal(decode(bytearray(wav_bytes)).samples, a.samples)
    np.testing.assert_array_equal(decode(memoryview(wav_bytes)).samples, a.samples)


def test_fixture_file_is_2s_16k(wav_bytes):
    audio = decode(wav_bytes)
    assert audio.duration_s == 2.0 and len(audio.samples) == 32000


# --- downmix and resampling -----------------------------------------------------------------------

def test_stereo_is_averaged_not_interleaved():
    left = speechlike(1.0, 16000, seed=1)[:, 0]
    right = speechlike(1.0, 16000, seed=2)[:, 0] * 0.5
    audio = decode(encode(data=np.stack([left, right], axis=1), fmt="WAV", subtype="FLOAT"))
    assert audio.source_channels == 2 and len(audio.samples) == 16000
    np.testing.assert_allclose(audio.samples, (left + right) / 2, atol=1e-7)


def test_six_channels_downmixed():
    audio = decode(encode(1.0, channels=6, fmt="FLAC"))
    assert audio.source_channels == 6 and audio.samples.shape == (16000,)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_equals_librosa_soxr_hq(sr):
    """funasr without torchaudio resamples with librosa's default soxr_hq: e2vd must match it."""
    librosa = pytest.importorskip("librosa")
    data = encode(2.0, sr=sr, fmt="WAV", subtype="FLOAT")
    audio = decode(data)
    x, _ = sf.read(io.BytesIO(data), dtype="float32")
    expected = librosa.resample(x, orig_sr=sr, target_sr=SAMPLE_RATE)
    assert audio.samples.shape == expected.shape == (math.ceil(len(x) * SAMPLE_RATE / sr),)
    np.testing.assert_allclose(audio.samples, expected, atol=1e-6)


def test_resampling_keeps_a_tone_and_removes_aliases():
    sr = 44100
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t) + 0.5 * np.sin(2 * np.pi * 12000 * t)  # 12 kHz > 8 kHz Nyquist
    out = from_samples(tone.astype(np.float32), sr).samples
    spectrum = np.abs(np.fft.rfft(out[2000:-2000] * np.hanning(len(out) - 4000)))
    freqs = np.fft.rfftfreq(len(out) - 4000, 1 / SAMPLE_RATE)
    peak = freqs[np.argmax(spectrum)]
    assert abs(peak - 1000) < 5
    alias = spectrum[np.abs(freqs - 4000) < 50].max()  # 12 kHz would fold to 4 kHz
    assert alias < spectrum.max() * 1e-3


# --- errors ---------------------------------------------------------------------------------------

def test_empty_input():
    err = error(b"")
    assert err.code == "bad_audio" and "empty" in err.message and "WAV" in err.message


@pytest.mark.parametrize("data", [
    b"hello, this is plain text and not audio\n" * 50,
    b"<html><body>502 Bad Gateway</body></html>",
    b"\x00" * 4096,
    np.random.default_rng(7).bytes(20000),
    b"RIFX" + b"\x00" * 3,
])
def test_not_audio(data):
    err = error(data)
    assert err.code == "bad_audio"
    assert "libsndfile" in err.message and "ffmpeg -i" in err.message  # how to convert, not "install"
    assert "not installed" not in err.message and "BytesIO" not in err.message


def test_m4a_is_named():
    err = error(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 200)
    assert err.code == "bad_audio" and "MP4/M4A" in err.message


def test_wav_cut_mid_data_is_detected():
    """libsndfile alone reads a cut WAV without complaint; e2vd checks the data chunk size."""
    data = encode(2.0)
    cut = data[: len(data) // 2]
    assert sf.info(io.BytesIO(cut)).frames > 0  # the silent acceptance we guard against
    err = error(cut)
    assert err.code == "bad_audio" and "truncated" in err.message
    assert "64000 bytes" in err.message and "complete file" in err.message


def test_wav_cut_inside_header():
    data = encode(1.0)
    for n in (4, 11, 20, 40):
        err = error(data[:n])
        assert err.code == "bad_audio" and "truncated" in err.message, (n, err.message)


def test_wav_with_trailing_chunk_and_streaming_size_accepted():
    data = encode(1.0)
    assert decode(data + b"LIST" + struct.pack("<I", 4) + b"INFO").duration_s == 1.0
    i = data.index(b"data")
    for placeholder in (0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000):  # ffmpeg, arecord/sox to a pipe
        streamed = data[: i + 4] + struct.pack("<I", placeholder) + data[i + 8:]
        assert decode(streamed).duration_s == 1.0, hex(placeholder)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_cut_in_half_is_detected(fmt, subtype):
    data = encode(3.0, fmt=fmt, subtype=subtype)
    err = error(data[: len(data) // 2])
    assert err.code == "bad_audio" and "truncated" in err.message, err.message


def test_ogg_cut_at_page_boundary():
    data = encode(3.0, fmt="OGG", subtype="VORBIS")
    last = data.rindex(b"OggS")
    err = error(data[:last])
    assert err.code == "bad_audio" and "end-of-stream" in err.message


def test_header_only_wav_has_no_samples():
    err = error(encode(data=np.zeros((0, 1), np.float32)))
    assert err.code == "bad_audio" and "no audio samples" in err.message


def test_too_short():
    ok = encode(data=speechlike(MIN_SECONDS, 16000))
    assert len(decode(ok).samples) == 400
    err = error(encode(data=speechlike(0.010, 16000)))
    assert err.code == "too_short" and "10.0 ms" in err.message and "25 ms" in err.message
    assert error(encode(data=speechlike(0.024, 44100), sr=44100)).code == "too_short"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    x = speechlike(1.0, 16000)
    x[8000, 0] = bad
    err = error(encode(data=x, fmt="WAV", subtype="FLOAT"))
    assert err.code == "bad_audio" and "NaN or infinite" in err.message and "0.500 s" in err.message


@pytest.mark.parametrize("peak", [3e38, -3e38, 1e20, 2.0 ** 31 * 1.001])
def test_finite_samples_beyond_any_audio_format_are_bad_audio(peak):
    """Finite float samples around ±3e38 made the model's scores NaN (an HTTP 500 `internal`), and
    samples of 1e17 and more changed them: anything beyond ±2^31 is refused as bad audio."""
    x = speechlike(1.0, 16000)
    x[8000, 0] = peak
    x[9000, 0] = peak
    err = error(encode(data=x, fmt="WAV", subtype="FLOAT"))
    assert err.code == "bad_audio" and err.exit_code == ExitCode.REJECTED
    assert "2 sample value(s) of the WAV file lie beyond ±2^31 = 2147483648" in err.message
    assert f"peak {abs(peak):.3g}, first at 0.500 s" in err.message
    assert "scale the samples into [-1, 1]" in err.message


def test_unscaled_integer_samples_stored_as_float_are_still_audio():
    """The bound is 32-bit PCM's full scale: 16- and 32-bit values written as float pass."""
    unit = speechlike(1.0, 16000) / np.abs(speechlike(1.0, 16000)).max()
    for scale in (32768.0, MAX_SAMPLE_MAGNITUDE):
        x = (unit * scale).astype(np.float32)
        assert decode(encode(data=x, fmt="WAV", subtype="FLOAT")).duration_s == 1.0
    assert from_samples(np.float32(-MAX_SAMPLE_MAGNITUDE) * np.ones(1600, np.float32), 16000).duration_s == 0.1


def test_float64_samples_beyond_float32_are_named_not_called_infinite():
    """from_samples checks a float64 array before converting it: 1e300 would become inf."""
    x = np.zeros(16000)
    x[4000] = 1e300
    err = pytest.raises(AudioError, from_samples, x, 16000).value
    assert err.code == "bad_audio" and "of the samples lie beyond ±2^31" in err.message
    assert "peak 1e+300, first at 0.250 s" in err.message and "infinite" not in err.message


def test_too_long_from_header_and_limit_is_inclusive():
    data = encode(3.0, sr=8000)
    assert decode(data, max_seconds=3.0).duration_s == 3.0
    err = error(data, max_seconds=2.5)
    assert err.code == "too_long" and "3.0 s" in err.message and "2.5 s" in err.message
    assert "header" in err.message and "max_seconds" in err.message


def test_too_long_when_header_understates():
    """A header that lies (or streams) cannot make decode read past the limit."""
    data = encode(3.0, sr=8000)
    i = data.index(b"data")
    streamed = data[: i + 4] + struct.pack("<I", 0xFFFFFFFF) + data[i + 8:]
    assert error(streamed, max_seconds=1.0).code == "too_long"


def flac_with_length(seconds: float, total_samples: int, sr: int = 16000, channels: int = 1) -> bytes:
    """A FLAC written by soundfile whose STREAMINFO states `total_samples` (0: "unknown", as
    streaming encoders write it)."""
    data = bytearray(encode(seconds, sr, channels, fmt="FLAC", subtype="PCM_16"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0      # the first metadata block is STREAMINFO
    at = 8 + 13                  # STREAMINFO body starts at byte 8; total samples is 36 bits from here
    data[at] = (data[at] & 0xF0) | (total_samples >> 32)
    data[at + 1:at + 5] = (total_samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def peak_allocation(fn) -> int:
    """Bytes allocated at the peak (Python and numpy) while `fn()` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_flac_of_unknown_length_is_read_as_a_stream():
    """libsndfile reports 2^63-1 frames for such a FLAC; it must be read, not refused as too long."""
    data = flac_with_length(2.0, 0)
    assert sf.info(io.BytesIO(data)).frames == 2 ** 63 - 1          # the case of the issue
    audio = decode(data)
    assert audio.duration_s == 2.0
    assert np.array_equal(audio.samples, decode(encode(2.0, fmt="FLAC", subtype="PCM_16")).samples)
    assert decode(flac_with_length(2.0, 0, sr=44100, channels=2)).duration_s == 2.0
    assert peak_allocation(lambda: decode(data)) < 4_000_000     # nothing sized by 2^63-1 frames


def test_long_flac_of_unknown_length_stops_reading_past_the_limit():
    data = flac_with_length(60.0, 0)
    err = error(data, max_seconds=1.0)
    assert err.code == "too_long" and "while decoding" in err.message
    assert "1.0001 s" in err.message    # it read 1 s and one frame (16001 frames), not the 60 s
    assert peak_allocation(lambda: error(data, max_seconds=1.0)) < 1_000_000  # 60 s is 3.84 MB
    assert decode(data, max_seconds=60.0).duration_s == 60.0
    assert decode(data, max_seconds=math.inf).duration_s == 60.0


def test_header_length_the_file_cannot_hold_is_treated_as_unknown():
    """2^36-1 samples (the largest a FLAC header can state) in a 2 s file of ~60 kB."""
    data = flac_with_length(2.0, 2 ** 36 - 1)
    assert sf.info(io.BytesIO(data)).frames == 2 ** 36 - 1
    assert decode(data).duration_s == 2.0


def test_honest_flac_header_is_still_checked_before_decoding():
    data = flac_with_length(3.0, 48000)
    assert "from its header" in error(data, max_seconds=2.0).message


def test_lengths_just_past_a_limit_print_the_digits_that_show_it():
    """Not "30.0 s long; the limit is 30 s": as many decimals as it takes to differ from the limit."""
    err = error(encode(30.01, sr=16000))
    assert err.code == "too_long" and "30.01 s long" in err.message and "limit is 30 s" in err.message
    one_frame = np.zeros(30 * 16000 + 1, np.float32)
    err = pytest.raises(AudioError, from_samples, one_frame, 16000, max_seconds=30).value
    assert "30.0001 s long" in err.message and "limit is 30 s" in err.message
    err = error(encode(2.6, sr=8000), max_seconds=2.55)
    assert "2.6 s long" in err.message and "limit is 2.55 s" in err.message
    err = error(encode(data=speechlike(1102 / 44100, 44100), sr=44100))      # 24.989 ms
    assert err.code == "too_short" and "24.99 ms long" in err.message and "25 ms" in err.message


def test_default_limit_is_30s():
    assert error(encode(31.0, sr=8000)).code == "too_long"


def test_sample_rate_too_low():
    err = error(encode(1.0, sr=2000))
    assert err.code == "bad_audio" and "2000 Hz" in err.message


def test_bad_max_seconds_is_a_programming_error(wav_bytes):
    with pytest.raises(ValueError):
        decode(wav_bytes, max_seconds=0)


def test_unknown_code_rejected():
    with pytest.raises(ValueError):
        AudioError("nope", "x")
    assert isinstance(AudioError("too_long", "x"), ValueError)


# --- from_samples ---------------------------------------------------------------------------------

def test_from_samples_matches_decode():
    x = speechlike(1.0, 22050, channels=2)
    a = from_samples(x, 22050)
    b = decode(encode(data=x, sr=22050, fmt="WAV", subtype="FLOAT"))
    np.testing.assert_array_equal(a.samples, b.samples)
    assert (a.duration_s, a.source_rate, a.source_channels) == (b.duration_s, 22050, 2)


def test_from_samples_int16_scaled():
    x = (speechlike(0.5, 16000)[:, 0] * 32767).astype(np.int16)
    out = from_samples(x, 16000).samples
    np.testing.assert_allclose(out, x / 32768.0, atol=1e-7)


def test_from_samples_errors():
    assert pytest.raises(AudioError, from_samples, np.zeros(100, np.float32), 16000).value.code == "too_short"
    assert pytest.raises(AudioError, from_samples, np.zeros(0, np.float32), 16000).value.code == "bad_audio"
    assert pytest.raises(AudioError, from_samples, np.full(1600, np.nan, np.float32), 16000).value.code == "bad_audio"
    assert pytest.raises(AudioError, from_samples, np.zeros(16000 * 31, np.float32), 16000).value.code == "too_long"
    transposed = pytest.raises(AudioError, from_samples, np.zeros((2, 16000), np.float32), 16000).value
    assert "transpose" in transposed.message
    assert pytest.raises(AudioError, from_samples, np.zeros(1600, np.float32), 16000.5).value.code == "bad_audio"
    assert pytest.raises(AudioError, from_samples, np.zeros(1600, complex), 16000).value.code == "bad_audio"


def test_no_limit_with_infinite_max_seconds():
    data = encode(31.0, sr=8000)
    assert decode(data, max_seconds=math.inf).duration_s == 31.0
    i = data.index(b"data")
    streamed = data[: i + 4] + struct.pack("<I", 0xFFFFFFFF) + data[i + 8:]
    assert decode(streamed, max_seconds=math.inf).duration_s == 31.0  # read block by block


def test_path_instead_of_bytes_is_a_clear_type_error(wav_file):
    with pytest.raises(TypeError, match="read_bytes"):
        decode(str(wav_file))
    with pytest.raises(TypeError, match="not a path"):
        decode(wav_file)


def test_wav_with_zero_data_size_but_data_following():
    data = encode(1.0)
    i = data.index(b"data")
    unsized = data[: i + 4] + struct.pack("<I", 0) + data[i + 8:]
    err = error(unsized)
    assert err.code == "bad_audio" and "marked 0 bytes" in err.message and "32000 bytes follow" in err.message


@pytest.mark.parametrize("fmt, channels", [("WAV", 1), ("WAV", 2), ("FLAC", 1)])
def test_pcm16_fast_path_equals_libsndfile_float_conversion(fmt, channels):
    """16-bit PCM is read as int16 and scaled by us: bit-identical to libsndfile's float read,
    full-scale extremes included."""
    rng = np.random.default_rng(3)
    pcm = rng.integers(-32768, 32768, size=(16000, channels), dtype=np.int16)
    pcm[:2] = [[-32768] * channels, [32767] * channels]
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format=fmt, subtype="PCM_16")
    expected, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    got = decode(buf.getvalue()).samples
    want = expected.mean(axis=1, dtype=np.float32) if channels > 1 else expected[:, 0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


# --- decompression bombs: tiny files whose headers claim huge rates or many channels ------------

def silence(seconds: int, rate: int, channels: int, fmt: str, subtype: str | None = None) -> bytes:
    """A file of `seconds` of silence, written a second at a time (FLAC and Vorbis compress it to KB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((rate, channels), dtype=np.float32)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def test_a_sample_rate_above_384_khz_is_refused_before_decoding():
    """165 KB of 8-channel FLAC at 655350 Hz decoded to 1.2 GB of float32 before the limit."""
    data = silence(29, 655350, 8, "FLAC", "PCM_16")
    assert len(data) < 200_000
    err = error(data)
    assert err.code == "bad_audio" and "655350 Hz; at most 384000 Hz" in err.message
    assert peak_allocation(lambda: error(data)) < 4_000_000
    assert decode(silence(1, 384000, 1, "FLAC", "PCM_16")).duration_s == 1.0   # the limit itself is fine


def test_more_than_64_channels_are_refused():
    err = error(silence(1, 16000, 65, "WAV", "PCM_16"))
    assert err.code == "bad_audio" and "65 channels; at most 64" in err.message


def test_many_channels_are_downmixed_block_by_block():
    """17 KB of 64-channel Vorbis silence, 29 s at 48 kHz: all channels at once were 356 MB (twice,
    with the concatenation); downmixed as each block is read, at most one block and the mono clip."""
    data = silence(29, 48000, 64, "OGG", "VORBIS")
    assert len(data) < 100_000
    audio = decode(data)
    assert audio.duration_s == 29.0 and audio.source_channels == 64
    assert peak_allocation(lambda: decode(data)) < 120_000_000


def test_nan_is_placed_at_its_time_with_many_channels():
    x = speechlike(3.0, 16000, 6)
    x[40000, 5] = np.nan
    err = error(encode(data=x, subtype="FLOAT"))
    assert err.code == "bad_audio" and "first at 2.500 s" in err.message


# --- garbage that looks like MP3 ------------------------------------------------------------------

def real_mp3(seconds: float = 3.0, sr: int = 16000) -> bytes:
    return encode(seconds, sr=sr, fmt="MP3", subtype="MPEG_LAYER_III")


def id3v2(body: bytes = b"") -> bytes:
    """An ID3v2.4 tag holding `body` (its size syncsafe-encoded), as taggers put before MPEG frames."""
    n = len(body)
    return b"ID3\x04\x00\x00" + bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F]) + body


GARBAGE_MP3 = {   # each: bytes libsndfile hands to libmpg123 (or reads as an ID3 tag) but that hold no MP3
    "MPEG header, then random bytes": lambda: real_mp3()[:4] + np.random.default_rng(3).bytes(20000),
    "MPEG header, then zeros": lambda: b"\xff\xfb\x90\x64" + b"\x00" * 5000,
    "random bytes that start with an MPEG sync": lambda: b"\xff\xe4" + np.random.default_rng(1).bytes(20000),
    "cut inside its first frame": lambda: real_mp3()[:100],
    "an ID3 tag, then random bytes": lambda: id3v2(b"\x00" * 30) + np.random.default_rng(4).bytes(20000),
    "an ID3 tag and nothing else": lambda: id3v2(b"\x00" * 30),
}


@pytest.mark.parametrize("make", GARBAGE_MP3.values(), ids=GARBAGE_MP3.keys())
def test_garbage_mp3_is_named_not_decodable(make):
    err = error(make())
    assert err.code == "bad_audio"
    assert "not decodable audio" in err.message and "MP3" in err.message, err.message
    assert "WAV or FLAC" in err.message and "ffmpeg -i" in err.message, err.message
    # libsndfile's "File does not exist or is not a regular file (possibly a pipe?)" is not what happened
    assert "does not exist" not in err.message and "pipe" not in err.message, err.message


def test_garbage_mp3_leaves_stderr_quiet():
    """libmpg123 writes its notes straight to fd 2 (libsndfile never sets MPG123_QUIET, and the
    statically linked libmpg123 cannot be reached to set it): garbage is refused before it gets
    there. Run in a child so that its real fd 2 is what is checked."""
    import subprocess
    import sys
    code = ("import sys\nfrom e2vd.audio import decode, AudioError\nfor data in sys.stdin.buffer.read().split(b'<SEP>'):\n"
            "    try:\n        decode(data)\n    except AudioError as err:\n        print(err.code)\n")
    data = b"<SEP>".join(make() for make in GARBAGE_MP3.values())
    child = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    assert child.stdout.decode().split() == ["bad_audio"] * len(GARBAGE_MP3), child
    assert child.stderr == b"", child.stderr[:500]


def test_mp3_damaged_after_a_good_start_is_named():
    good = real_mp3()
    err = error(good[:2000] + np.random.default_rng(5).bytes(20000))
    assert err.code == "bad_audio"
    assert "not decodable audio" in err.message and "damaged" in err.message, err.message
    assert "WAV or FLAC" in err.message, err.message


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_real_mp3_at_every_mpeg_rate_passes_the_frame_check(sr):
    """MPEG-1, -2 and -2.5 rates: the check of the first frames must not refuse a real file."""
    assert decode(real_mp3(1.0, sr)).duration_s == pytest.approx(1.0, abs=0.15)


def test_real_mp3_behind_an_id3_tag_still_decodes():
    tagged = id3v2(b"TIT2\x00\x00\x00\x05\x00\x00\x03clip" + b"\x00" * 100) + real_mp3(1.0)
    assert sf.info(io.BytesIO(tagged)).format == "MP3"   # libsndfile reads past the tag itself
    assert decode(tagged).duration_s == pytest.approx(1.0, abs=0.15)
