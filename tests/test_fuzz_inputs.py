"""A seeded mutation fuzzer over every byte a client sends: audio files (e2vd.audio.decode), form
uploads (e2vd.upload), request lines, header lines, Content-Length and chunked framing
(e2vd.http_wire, e2vd.http_chunked, e2vd.http_io), then the nastiest cases against a real daemon.

Every case must end in one of two ways: a valid result (for audio: finite float32 mono at 16 kHz
within max_seconds) or the project's own error (AudioError, ApiError) with a message; never
another exception, never a hang (each case runs under a watchdog of CASE_SECONDS, far above the
milliseconds a case takes: it only catches runaway work), never output on fd 1 or 2 (the daemon's
stdout and stderr are its journal: a libsndfile printf or a Python "Traceback" there is noise an
operator would chase; an exception raised inside a soundfile callback, which Python reports through
sys.unraisablehook as "Exception ignored ... Traceback", counts as such output). Seeds are fixed, so a failure names a case that fails again.
"""
from __future__ import annotations

import io
import random
import signal
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from conftest import speechlike
from e2vd.audio import ERROR_CODES, SAMPLE_RATE, Audio, AudioError, decode
from e2vd.http_chunked import ChunkedReader
from e2vd.http_wire import RequestHead, RequestLine, parse_chunk_size, parse_field_line
from e2vd.protocol import ApiError
from e2vd.upload import FormReader, form_boundary

CASE_SECONDS = 20          # watchdog per case: a case takes milliseconds; this only catches runaways
MAX_SECONDS = 2.0          # decode's limit in these cases (the seeds are 0.3 s)
PEAK_BYTES = 64 << 20      # most Python/numpy memory one decode may hold (the seeds are a few KB)


class Runaway(Exception):
    """A case ran past CASE_SECONDS."""


@contextmanager
def watchdog(case: str, seconds: float = CASE_SECONDS) -> Iterator[None]:
    """Raise Runaway (naming `case`) in the main thread when the block runs past `seconds`."""
    def expire(signum: int, frame: Any) -> None:
        raise Runaway(f"{case} ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- audio ---------------------------------------------------------------------------------------

def encode(fmt: str, subtype: str, sr: int = 16000, channels: int = 1, seconds: float = 0.3) -> bytes:
    """A speech-like clip written by soundfile in memory."""
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, sr, channels), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


SEED_FORMATS = {   # name: (format, subtype, rate, channels)
    "wav16": ("WAV", "PCM_16", 44100, 2), "wavfloat": ("WAV", "FLOAT", 16000, 1),
    "wavadpcm": ("WAV", "IMA_ADPCM", 16000, 1), "flac": ("FLAC", "PCM_16", 22050, 1),
    "vorbis": ("OGG", "VORBIS", 16000, 1), "opus": ("OGG", "OPUS", 48000, 1),
    "mp3": ("MP3", "MPEG_LAYER_III", 16000, 1), "aiff": ("AIFF", "PCM_16", 16000, 1),
    "au": ("AU", "PCM_16", 8000, 1), "caf": ("CAF", "PCM_16", 16000, 1), "w64": ("W64", "PCM_16", 16000, 1),
    "rf64": ("RF64", "PCM_16", 16000, 1), "nist": ("NIST", "PCM_16", 16000, 1),
    "sds": ("SDS", "PCM_16", 16000, 1), "mat5": ("MAT5", "PCM_16", 16000, 1), "voc": ("VOC", "PCM_16", 16000, 1),
}


def seed(name: str) -> bytes:
    fmt, subtype, sr, channels = SEED_FORMATS[name]
    return encode(fmt, subtype, sr, channels)


def check_decode(case: str, data: bytes, capfd: pytest.CaptureFixture[str]) -> str:
    """Decode `data` as the daemon does; assert the outcome is a valid Audio or an AudioError
    with a message, within the watchdog, PEAK_BYTES and without a byte on fd 1 or 2. "ok" or
    the error's code."""
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append   # what the daemon prints as "Traceback"
    tracemalloc.start()
    try:
        with watchdog(case):
            try:
                audio = decode(data, max_seconds=MAX_SECONDS)
            except AudioError as err:
                outcome = err.code
                assert err.code in ERROR_CODES and len(err.message) > 20 and str(err) == err.message, case
            else:
                outcome = "ok"
                check_audio(case, audio)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sys.unraisablehook = hook
    assert not unraisable, f"{case}: an exception inside a callback: {unraisable[0].exc_value!r}"
    assert peak < PEAK_BYTES, f"{case}: decoding {len(data)} bytes held {peak} bytes"
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"{case} wrote to the journal: {(out + err)[:300]!r}"
    return outcome


def check_audio(case: str, audio: Audio) -> None:
    """A decode the model can take: finite float32 mono at 16 kHz, 25 ms to MAX_SECONDS."""
    samples = audio.samples
    assert isinstance(samples, np.ndarray) and samples.dtype == np.float32 and samples.ndim == 1, case
    assert np.isfinite(samples).all(), case
    assert 0.025 <= audio.duration_s <= MAX_SECONDS, (case, audio.duration_s)
    assert abs(len(samples) - audio.duration_s * SAMPLE_RATE) <= 1, case


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of `data`: (what was done, the result)."""
    out = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        spots = [rng.randrange(len(out)) for _ in range(rng.randint(1, 8))]
        for spot in spots:
            out[spot] ^= 1 << rng.randrange(8)
        return f"bit flips at {spots}", bytes(out)
    if kind == 1:
        cut = rng.randrange(len(out))
        return f"cut at {cut}", bytes(out[:cut])
    if kind == 2:
        spot, value = rng.randrange(min(len(out), 200)), rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
        layout = rng.choice(["<I", ">I", "<H", ">H"])
        if spot + struct.calcsize(layout) <= len(out):
            struct.pack_into(layout, out, spot, value & (0xFFFF if "H" in layout else 0xFFFFFFFF))
        return f"{layout} {value:#x} at {spot}", bytes(out)
    if kind == 3:
        spot, junk = rng.randrange(min(len(out), 300)), rng.randbytes(rng.randint(1, 16))
        out[spot:spot] = junk
        return f"{junk.hex()} inserted at {spot}", bytes(out)
    if kind == 4:
        spot, source = rng.randrange(min(len(out), 300)), rng.randrange(len(out))
        out[spot:spot + 4] = data[source:source + 4]
        return f"bytes {source}.. copied to {spot}", bytes(out)
    spot = rng.randrange(min(len(out), 400))
    out[spot] = rng.randrange(256)
    return f"byte {spot} set", bytes(out)


MUTATIONS_PER_SEED = 40


@pytest.mark.parametrize("name", sorted(SEED_FORMATS))
def test_random_mutations_of_real_audio_decode_or_fail_cleanly(name, capfd):
    data = seed(name)
    rng = random.Random(f"e2vd-fuzz-{name}")
    outcomes = {check_decode(f"{name} unchanged", data, capfd)}
    for index in range(MUTATIONS_PER_SEED):
        what, mutated = mutate(data, rng)
        outcomes.add(check_decode(f"{name} #{index}: {what}", mutated, capfd))
    assert outcomes - {"ok"}, f"no mutation of {name} was refused: the fuzzer is not reaching the checks"


def structural_offsets(data: bytes) -> list[int]:
    """Offsets where a cut is interesting: every byte of the first 64, each RIFF/AIFF-style chunk
    boundary and the bytes around it, Ogg page starts, and the last few bytes."""
    spots = set(range(min(64, len(data))))
    for marker in (b"fmt ", b"data", b"COMM", b"SSND", b"OggS", b"LIST", b"fact", b"ds64", b"desc", b"caff"):
        at = data.find(marker)
        while at >= 0:
            spots.update(range(max(0, at - 2), min(len(data), at + 12)))
            at = data.find(marker, at + 1)
    spots.update(range(max(0, len(data) - 4), len(data)))
    return sorted(spots)


@pytest.mark.parametrize("name", ["wav16", "flac", "vorbis", "mp3", "aiff", "caf", "w64"])
def test_truncation_at_every_structural_offset_decodes_or_fails_cleanly(name, capfd):
    data = seed(name)
    for cut in structural_offsets(data):
        check_decode(f"{name} cut at {cut}", data[:cut], capfd)


def wav_with(fields: dict[int, tuple[str, int]], base: bytes | None = None) -> bytes:
    """A 16-bit mono 16 kHz WAV (soundfile's, fmt at 12, data at 36) with `fields` overwritten:
    {offset: (struct layout, value)}."""
    out = bytearray(base or encode("WAV", "PCM_16"))
    for offset, (layout, value) in fields.items():
        struct.pack_into(layout, out, offset, value)
    return bytes(out)


def riff(*chunks: bytes, magic: bytes = b"RIFF") -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(body)) + body


def chunk(tag: bytes, payload: bytes, size: int | None = None) -> bytes:
    return tag + struct.pack("<I", len(payload) if size is None else size) + payload + b"\0" * (len(payload) & 1)


FMT16 = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
PCM = (speechlike(0.3)[:, 0] * 32767).astype("<i2").tobytes()


def aiff_with_chunk(size: int) -> bytes:
    """A valid AIFF with an extra chunk of declared `size` between COMM and SSND."""
    data = encode("AIFF", "PCM_16")
    at = data.find(b"SSND")
    return data[:at] + b"ABCD" + struct.pack(">I", size) + data[at:]


HOSTILE_HEADERS: dict[str, Callable[[], bytes]] = {
    "channels 0": lambda: wav_with({22: ("<H", 0)}),
    "channels 65535": lambda: wav_with({22: ("<H", 65535)}),
    "rate 0": lambda: wav_with({24: ("<I", 0)}),
    "rate 1": lambda: wav_with({24: ("<I", 1)}),
    "rate 2^31-1": lambda: wav_with({24: ("<I", 2**31 - 1)}),
    "rate 2^32-1": lambda: wav_with({24: ("<I", 2**32 - 1)}),
    "byte rate 0": lambda: wav_with({28: ("<I", 0)}),
    "block align 0": lambda: wav_with({32: ("<H", 0)}),
    "block align 65535": lambda: wav_with({32: ("<H", 65535)}),
    "bits 0": lambda: wav_with({34: ("<H", 0)}),
    "bits 1": lambda: wav_with({34: ("<H", 1)}),
    "bits 65535": lambda: wav_with({34: ("<H", 65535)}),
    "format tag 0x1234": lambda: wav_with({20: ("<H", 0x1234)}),
    "format tag extensible, short fmt": lambda: wav_with({20: ("<H", 0xFFFE)}),
    "RIFF size 0xFFFFFFFF": lambda: wav_with({4: ("<I", 0xFFFFFFFF)}),
    "RIFF size 0": lambda: wav_with({4: ("<I", 0)}),
    "fmt size 0xFFFFFFFF": lambda: wav_with({16: ("<I", 0xFFFFFFFF)}),
    "fmt size 0": lambda: wav_with({16: ("<I", 0)}),
    "fmt size 2": lambda: wav_with({16: ("<I", 2)}),
    "data size 0xFFFFFFFF": lambda: wav_with({40: ("<I", 0xFFFFFFFF)}),
    "data size 0x7FFF0000": lambda: wav_with({40: ("<I", 0x7FFF0000)}),
    "data size 0": lambda: wav_with({40: ("<I", 0)}),
    "data size odd": lambda: wav_with({40: ("<I", 9601)}),
    "data before fmt": lambda: riff(chunk(b"data", PCM), chunk(b"fmt ", FMT16)),
    "two fmt chunks": lambda: riff(chunk(b"fmt ", FMT16), chunk(b"fmt ", struct.pack("<HHIIHH", 3, 9, 7, 1, 0, 64)),
                                   chunk(b"data", PCM)),
    "no fmt chunk": lambda: riff(chunk(b"data", PCM)),
    "no data chunk": lambda: riff(chunk(b"fmt ", FMT16)),
    "two data chunks": lambda: riff(chunk(b"fmt ", FMT16), chunk(b"data", PCM), chunk(b"data", PCM)),
    "junk chunk of 0xFFFFFFFF": lambda: riff(chunk(b"fmt ", FMT16), chunk(b"JUNK", b"", 0xFFFFFFFF), chunk(b"data", PCM)),
    "LIST of 0x80000000": lambda: riff(chunk(b"fmt ", FMT16), chunk(b"LIST", b"INFO", 0x80000000), chunk(b"data", PCM)),
    "RIFX (big-endian) with little-endian fields": lambda: b"RIFX" + encode("WAV", "PCM_16")[4:],
    "RF64 without ds64": lambda: b"RF64" + encode("WAV", "PCM_16")[4:],
    "RF64 ds64 sizes 2^63": lambda: encode("RF64", "PCM_16")[:20] + struct.pack("<QQQ", 2**63, 2**63, 2**63)
                                    + encode("RF64", "PCM_16")[44:],
    "W64 magic on a WAV": lambda: b"riff" + encode("WAV", "PCM_16")[4:],
    "W64 size fields 2^64-1": lambda: encode("W64", "PCM_16")[:16] + b"\xff" * 8 + encode("W64", "PCM_16")[24:],
    "AIFF chunk of 0xFFFFFFFF": lambda: aiff_with_chunk(0xFFFFFFFF),
    "AIFF chunk of 0x80000000": lambda: aiff_with_chunk(0x80000000),
    "AIFF channels 0": lambda: bytes(encode("AIFF", "PCM_16")[:20]) + b"\0\0" + encode("AIFF", "PCM_16")[22:],
    "AU data offset 0xFFFFFFFF": lambda: encode("AU", "PCM_16")[:4] + b"\xff" * 4 + encode("AU", "PCM_16")[8:],
    "AU rate 0": lambda: encode("AU", "PCM_16")[:16] + b"\0" * 4 + encode("AU", "PCM_16")[20:],
    "CAF desc rate NaN": lambda: encode("CAF", "PCM_16")[:20] + b"\x7f\xf8" + b"\0" * 6 + encode("CAF", "PCM_16")[28:],
    "FLAC STREAMINFO 655 kHz 8 ch": lambda: flac_streaminfo(rate=655350, channels=8),
    "FLAC STREAMINFO total 2^36-1": lambda: flac_streaminfo(total=2**36 - 1),
    "FLAC STREAMINFO rate 0": lambda: flac_streaminfo(rate=0),
    "Ogg page of 255 segments of 255": lambda: b"OggS\0\x02" + b"\0" * 20 + b"\xff" + b"\xff" * 255,
    "ID3 tag of 2^28-1 bytes": lambda: b"ID3\x04\0\0\x7f\x7f\x7f\x7f" + b"\0" * 100,
    "ID3 then SDS": lambda: b"ID3\x03\0\0\0\0\0\0" + encode("SDS", "PCM_16"),
    "MAT5 of 0xFFFFFFFF elements": lambda: encode("MAT5", "PCM_16")[:128] + b"\xff" * 64 + encode("MAT5", "PCM_16")[192:],
}


def flac_streaminfo(rate: int = 22050, channels: int = 1, total: int | None = None) -> bytes:
    """A real FLAC with STREAMINFO's rate, channel count and total samples overwritten."""
    data = bytearray(encode("FLAC", "PCM_16", 22050))
    bits = int.from_bytes(data[18:26], "big")        # rate:20 channels-1:3 bps-1:5 total:36
    total = bits & (2**36 - 1) if total is None else total
    bits = (rate << 44) | ((channels - 1) << 41) | (bits & (0x1F << 36)) | total
    data[18:26] = bits.to_bytes(8, "big")
    return bytes(data)


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_header_fields_decode_or_fail_cleanly(case, capfd):
    check_decode(case, HOSTILE_HEADERS[case](), capfd)


@pytest.mark.parametrize("size", [0x80000000, 0xFFFFFFFF])
def test_an_aiff_chunk_size_past_2_gib_writes_no_traceback(size, capfd):
    """libsndfile seeks before byte 0 on it; soundfile's BytesIO callback raised, and cffi printed
    "Exception ignored from cffi callback ... Traceback" to stderr (the daemon's journal)."""
    check_decode(f"AIFF chunk of {size:#x}", aiff_with_chunk(size), capfd)


def test_a_damaged_midi_sample_dump_is_refused_without_writing_to_stdout(capfd):
    """libsndfile's SDS reader printf()s two lines per damaged block; the format is refused first."""
    data = bytearray(encode("SDS", "PCM_16", seconds=1.0))
    for spot in range(40, len(data), 127):     # break every block's checksum
        data[spot] ^= 0x55
    assert check_decode("damaged SDS", bytes(data), capfd) == "bad_audio"
    with pytest.raises(AudioError, match=r"MIDI Sample Dump .* Send a WAV, FLAC"):
        decode(bytes(data))


# --- header lines, request lines, Content-Length -------------------------------------------------

def outcome_of(case: str, call: Callable[[], Any]) -> str:
    """Run `call` under the watchdog: "ok", or the ApiError's code (a message is required)."""
    with watchdog(case):
        try:
            call()
        except ApiError as err:
            assert err.code and len(err.message) > 20, (case, err.message)
            assert 400 <= err.status < 500, (case, err.status)
            return err.code
    return "ok"


@pytest.mark.parametrize("blank", [b" ", b"\t", b" \t"])
def test_a_header_value_with_a_long_blank_run_inside_is_parsed_in_linear_time(blank):
    """The field-line regex backtracked quadratically over blanks inside a value: a 64 KiB header
    line (the most accepted) held the GIL, and so the whole daemon, for about a minute."""
    run = blank * (60000 // len(blank))
    assert outcome_of("blank run", lambda: parse_field_line(b"X-Note: a" + run + b"b\r\n")) == "ok"
    assert parse_field_line(b"X-Note: a" + run + b"b\r\n") == ("X-Note", "a" + run.decode() + "b")
    assert outcome_of("blank run, control", lambda: parse_field_line(b"X-Note: a" + run + b"\x01\r\n")) == "bad_request"
    assert parse_field_line(b"X-Note:" + run + b"b" + run + b"\r\n") == ("X-Note", "b")


FIELD_PIECES = [b"Host", b"Content-Length", b"X", b":", b" ", b"\t", b"\0", b"\r", b"\n", b"\x7f", b"\xff", b"a",
                b"1", b",", b";", b"\"", b"=", b"\x0b", b"\x0c", b"chunked", b"-1", b"+5"]


def test_random_header_lines_parse_or_are_refused(capfd):
    rng = random.Random("e2vd-fuzz-fields")
    for index in range(3000):
        line = b"".join(rng.choice(FIELD_PIECES) for _ in range(rng.randint(0, 12))) + rng.choice([b"\r\n", b"\n", b""])
        outcome = outcome_of(f"field line #{index} {line!r}", lambda: parse_field_line(line))
        if outcome == "ok":
            name, value = parse_field_line(line)
            assert ":" not in name and not any(c in value for c in "\0\r\n\x7f"), line
    assert capfd.readouterr() == ("", "")


def request_head(*lines: bytes, request: bytes = b"POST /v1/recognize HTTP/1.1\r\n") -> RequestHead:
    parsed = RequestLine.parse(request)
    return RequestHead.build(parsed, parsed.check(), list(lines))


CONTENT_LENGTHS = [b"10", b"010", b"0", b"-1", b"+10", b" 10", b"10 ", b"1_0", b"0x10", b"1e3", b"10, 10", b"10,10",
                   b"10,", b",10", b"\xd9\xa1\xd9\xa0", b"\xef\xbc\x91", b"99999999999999999999999", b"0" * 5000 + b"7",
                   b"", b"1" * 19, b"9" * 18, b"\x0010"]


@pytest.mark.parametrize("value", CONTENT_LENGTHS, ids=[v[:20].hex() for v in CONTENT_LENGTHS])
def test_content_length_values_are_numbers_or_refused(value):
    line = b"Content-Length: " + value + b"\r\n"
    outcome = outcome_of(repr(value), lambda: request_head(b"Host: e2vd\r\n", line))
    if outcome == "ok":
        length = request_head(b"Host: e2vd\r\n", line).content_length
        assert isinstance(length, int) and 0 <= length < 10**18 and value.strip(b" \t").isdigit()


@pytest.mark.parametrize("lines", [
    [b"Content-Length: 5\r\n", b"Content-Length: 5\r\n"],
    [b"Content-Length: 5\r\n", b"content-length: 6\r\n"],
    [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"],
    [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n"],
    [b"Transfer-Encoding: chunked, identity\r\n"],
    [b"Transfer-Encoding: xchunked\r\n"],
    [b"Transfer-Encoding: chunked\x0b\r\n"],
    [b"Transfer-Encoding:\r\n"],
    [b"Content-Length: 5\r\n", b" Content-Length: 6\r\n"],
])
def test_ambiguous_framing_is_refused(lines):
    assert outcome_of(repr(lines), lambda: request_head(b"Host: e2vd\r\n", *lines)) == "bad_request"


REQUEST_PIECES = [b"GET", b"POST", b" ", b"\t", b"/v1/health", b"/", b"//", b"*", b"?", b"#", b"HTTP/1.1", b"HTTP/1.0",
                  b"HTTP/2.0", b"HTTP/1.12", b"\0", b"\r", b"\x0b", b"\xff", b"http://[::1", b"%", b"[", b"CONNECT"]


def test_random_request_lines_parse_or_are_refused(capfd):
    rng = random.Random("e2vd-fuzz-request-lines")
    for index in range(3000):
        line = b"".join(rng.choice(REQUEST_PIECES) for _ in range(rng.randint(0, 8))) + b"\r\n"

        def parse_and_check() -> None:
            RequestLine.parse(line).check()
        outcome_of(f"request line #{index} {line!r}", parse_and_check)
    assert capfd.readouterr() == ("", "")


# --- chunked bodies --------------------------------------------------------------------------------

class BytesWire:
    """A ChunkWire over bytes already received (the connection then ends): what http_io.Wire
    does with the socket, minus the socket."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BufferedReader(io.BytesIO(data))

    def read_raw_line(self, limit: int) -> bytes:
        return self.stream.readline(limit + 1)

    def read_some(self, most: int) -> bytes:
        return self.stream.read1(most)

    def stopped(self, got: str, ended: str) -> ApiError:
        return ApiError("bad_request", f"the body ended after {got}; {ended}")


def read_chunked(data: bytes, limit: int = 1 << 20) -> bytes:
    return b"".join(ChunkedReader(BytesWire(data), limit))


CHUNK_SIZE_LINES = [b"0\r\n", b"00000000000000000000000005\r\n", b"0" * 4000 + b"1\r\n", b"ffffffffffffffff\r\n",
                    b"10000000000000000\r\n", b"-1\r\n", b"+5\r\n", b"0x5\r\n", b" 5\r\n", b"5 \r\n", b"5\n",
                    b"5\r\r\n", b"5;ext\r\n", b"5;a=\"b\\\"c\"\r\n", b"5;\0\r\n", b"5;\r\r\n", b"5 ; x\r\n",
                    b"\r\n", b"5\x0b\r\n", b"\xd9\xa5\r\n", b"5" + b";x" * 2000 + b"\r\n"]


@pytest.mark.parametrize("line", CHUNK_SIZE_LINES, ids=[line[:24].hex() for line in CHUNK_SIZE_LINES])
def test_chunk_size_lines_are_sizes_or_refused(line):
    if outcome_of(repr(line[:40]), lambda: parse_chunk_size(line)) == "ok":
        size = parse_chunk_size(line)
        assert 0 <= size < 2**64 and line.split(b";")[0].strip(b" \t\r\n").lstrip(b"0") in (b"", b"%x" % size)


def chunked_body(data: bytes, rng: random.Random) -> bytes:
    out, pos = [], 0
    while pos < len(data):
        piece = data[pos:pos + rng.randint(1, 700)]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        pos += len(piece)
    return b"".join(out) + b"0\r\n\r\n"


def test_random_mutations_of_chunked_bodies_read_or_are_refused(capfd):
    rng = random.Random("e2vd-fuzz-chunked")
    payload = rng.randbytes(5000)
    good = chunked_body(payload, rng)
    assert read_chunked(good) == payload
    for index in range(1500):
        what, mutated = mutate(good, rng)
        outcome = outcome_of(f"chunked #{index}: {what}", lambda: read_chunked(mutated, limit=6000))
        assert outcome in ("ok", "bad_request", "too_large"), (what, outcome)
    assert capfd.readouterr() == ("", "")


# --- multipart forms ------------------------------------------------------------------------------

OPTIONS = ("granularity", "embedding")


def read_form(body: bytes, boundary: str, pieces: int = 1) -> Any:
    reader = FormReader(boundary, OPTIONS)
    step = max(1, len(body) // max(1, pieces))
    for at in range(0, len(body), step):
        reader.feed(body[at:at + step])
    return reader.finish()


def form_body(boundary: bytes, audio: bytes) -> bytes:
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"granularity\"\r\n\r\nframe\r\n"
            b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--" + boundary + b"--\r\n")


def test_random_mutations_of_forms_read_or_are_refused(capfd):
    rng = random.Random("e2vd-fuzz-forms")
    audio = rng.randbytes(3000)
    good = form_body(b"xYz", audio)
    upload = read_form(good, "xYz")
    assert upload.audio == audio and upload.fields == {"granularity": "frame"}
    for index in range(1500):
        what, mutated = mutate(good, rng)
        pieces = rng.choice([1, 3, 50, len(mutated)])
        outcome = outcome_of(f"form #{index}: {what} in {pieces} pieces", lambda: read_form(mutated, "xYz", pieces))
        assert outcome in ("ok", "bad_form", "bad_option"), (what, outcome)
    assert capfd.readouterr() == ("", "")


HOSTILE_FORMS = {
    "no boundary at all": b"just bytes",
    "no closing boundary": b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
    "closing boundary only": b"--b--\r\n",
    "boundary twice in a row": b"--b\r\n--b\r\nContent-Disposition: form-data; name=file\r\n\r\nabc\r\n--b--\r\n",
    "part without headers": b"--b\r\n\r\nabc\r\n--b--\r\n",
    "NUL in a part header": b"--b\r\nContent-Disposition: form-data; na\0me=file\r\n\r\nabc\r\n--b--\r\n",
    "bare CR in a part header": b"--b\r\nContent-Disposition: form-data; name=file\rX: y\r\n\r\nabc\r\n--b--\r\n",
    "obs-fold in a part header": b"--b\r\nContent-Disposition: form-data;\r\n name=file\r\n\r\nabc\r\n--b--\r\n",
    "header without colon": b"--b\r\nContent-Disposition form-data\r\n\r\nabc\r\n--b--\r\n",
    "non-UTF-8 header": b"--b\r\nContent-Disposition: form-data; name=\"\xff\xfe\"\r\n\r\nabc\r\n--b--\r\n",
    "9 header lines": b"--b\r\n" + b"X-A: 1\r\n" * 8 + b"Content-Disposition: form-data; name=file\r\n\r\nabc\r\n--b--\r\n",
    "header line of 5000 bytes": b"--b\r\nContent-Disposition: form-data; name=file; x=" + b"a" * 5000 + b"\r\n\r\nabc\r\n--b--\r\n",
    "filename* of bad UTF-8": b"--b\r\nContent-Disposition: form-data; name=file; filename*=UTF-8''%ff%fe\r\n\r\nabc\r\n--b--\r\n",
    "filename* unterminated quote": b"--b\r\nContent-Disposition: form-data; name=file; filename*=\"UTF-8''a\r\n\r\nabc\r\n--b--\r\n",
    "name*= only": b"--b\r\nContent-Disposition: form-data; name*=UTF-8''file\r\n\r\nabc\r\n--b--\r\n",
    "long quoted parameter chain": b"--b\r\nContent-Disposition: form-data; name=file" + b"; a=\"\\" * 600 + b"\r\n\r\nabc\r\n--b--\r\n",
    "two file parts": b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=c\r\n\r\ny\r\n--b--\r\n",
    "option given twice": b"--b\r\nContent-Disposition: form-data; name=embedding\r\n\r\n1\r\n--b\r\nContent-Disposition: form-data; name=embedding\r\n\r\n1\r\n--b\r\nContent-Disposition: form-data; name=file\r\n\r\nx\r\n--b--\r\n",
    "option of 1 MB": b"--b\r\nContent-Disposition: form-data; name=granularity\r\n\r\n" + b"u" * 1_000_000 + b"\r\n--b--\r\n",
    "nested multipart": b"--b\r\nContent-Disposition: form-data; name=file\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c--\r\n--b--\r\n",
    "base64 part": b"--b\r\nContent-Disposition: form-data; name=file\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n--b--\r\n",
    "junk after the closing boundary": b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nabc\r\n--b--\r\n" + b"\0" * 100000,
    "10000 empty parts": b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nabc\r\n" + b"--b\r\n\r\n\r\n" * 10000 + b"--b--\r\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FORMS))
def test_hostile_forms_are_read_or_refused(case, capfd):
    body = HOSTILE_FORMS[case]
    for pieces in (1, 7, len(body)):
        outcome = outcome_of(f"{case} in {pieces} pieces", lambda: read_form(body, "b", pieces))
        assert outcome in ("ok", "bad_form", "bad_option"), (case, outcome)
    assert capfd.readouterr() == ("", "")


CONTENT_TYPES = ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=" + "a" * 71,
                 "multipart/form-data; boundary=" + "a" * 70, "multipart/form-data; boundary=a; boundary=b",
                 "multipart/form-data; boundary=\"a b\"", "multipart/form-data; boundary=\"a\\\"b\"",
                 "multipart/form-data; boundary=\"unterminated", "multipart/form-data; boundary=a\0b",
                 "multipart/form-data;boundary=a;", "multipart/form-data; boundary=a;;", "multipart/mixed; boundary=a",
                 "multipart/", "MULTIPART/FORM-DATA; BOUNDARY=Ab", "multipart/form-data; boundary=" + "\xe9" * 5,
                 "multipart/form-data; " + "x=y; " * 2000 + "boundary=a", "multipart/form-data; boundary=a " + " " * 60000]


@pytest.mark.parametrize("content_type", CONTENT_TYPES, ids=[ct[:40] for ct in CONTENT_TYPES])
def test_content_types_give_a_boundary_or_are_refused(content_type):
    if outcome_of(content_type[:60], lambda: form_boundary(content_type)) == "ok":
        boundary = form_boundary(content_type)
        assert boundary and len(boundary) <= 70 and boundary.isascii()


# --- the nastiest, through a real daemon ------------------------------------------------------------

def test_the_nastiest_cases_get_4xx_json_from_a_real_daemon_which_keeps_serving(tiny_model, tmp_path):
    from daemon_proc import DaemonProcess, raw_request

    def post(body: bytes, *lines: str) -> bytes:
        head = ["POST /v1/recognize HTTP/1.1", "Host: e2vd", f"Content-Length: {len(body)}", *lines]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    damaged_mp3 = bytearray(encode("MP3", "MPEG_LAYER_III", seconds=2.0))
    damaged_mp3[len(damaged_mp3) // 2:len(damaged_mp3) // 2] = b"\0" * 40   # the frames after it no longer chain
    sds = bytearray(encode("SDS", "PCM_16", seconds=1.0))
    for spot in range(40, len(sds), 127):
        sds[spot] ^= 0x55
    cases = {
        "header with a blank run": (post(encode("WAV", "PCM_16"), "X-Note: a" + " " * 60000 + "b"), 200),
        "AIFF chunk of 0xFFFFFFFF": (post(aiff_with_chunk(0xFFFFFFFF)), None),
        "damaged SDS": (post(bytes(sds)), 400),
        "damaged MP3": (post(bytes(damaged_mp3)), 400),
        "WAV data before fmt": (post(HOSTILE_HEADERS["data before fmt"]()), None),
        "form without closing boundary": (post(HOSTILE_FORMS["no closing boundary"],
                                               "Content-Type: multipart/form-data; boundary=b"), 400),
    }
    config = tmp_path / "e2vd.toml"   # an empty config file of its own (config refuses /dev/null, a device)
    config.write_text("")
    with DaemonProcess(tmp_path / "e2vd.sock", tiny_model, wait_ready=True, idle_timeout=600, max_seconds=30,
                       config=config) as d:
        for case, (request, expected) in cases.items():
            status, _, payload = raw_request(d.socket, request)
            if expected is not None:
                assert status == expected, (case, status, payload)
            if status != 200:
                assert 400 <= status < 500 and payload["error"]["code"] and payload["error"]["message"], (case, payload)
            assert d.request("GET", "/v1/health")[0] == 200, case
        log = d.log_text()
    assert "Traceback" not in log and "Error A :" not in log and "Note: " not in log, log[-2000:]
