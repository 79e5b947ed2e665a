"""A corpus of bad (and odd-but-fine) input against one real daemon (raw, chunked and multipart uploads): each case gets the right HTTP
status and error code, and after each case the daemon still recognises a good clip.

The daemon runs with short limits (connection_timeout 2 s, max_body_bytes 25 MB, max_seconds 30)
so the timeout cases stay quick.
"""
from __future__ import annotations

import io
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf
from conftest import speechlike
from daemon_proc import DaemonProcess, raw_request, read_response
from forms import Part, chunked, form

from e2vd.client import connect_unix

CONNECTION_TIMEOUT = 2
MAX_BODY = 25_000_000


def audio_bytes(seconds: float = 1.0, sr: int = 16000, channels: int = 1, fmt: str = "WAV",
                subtype: str | None = None, samples: np.ndarray | None = None) -> bytes:
    buf = io.BytesIO()
    data = speechlike(seconds, sr, channels) if samples is None else samples
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


GOOD = audio_bytes(0.5)


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    sock = tmp_path_factory.mktemp("bad") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600,
                       connection_timeout=CONNECTION_TIMEOUT, max_body_bytes=MAX_BODY, max_seconds=30,
                       max_connections_per_uid=1000) as d:
        yield d


def post(d: DaemonProcess, body: bytes, query: str = "") -> tuple[int, Any]:
    status, _, payload = d.request("POST", "/v1/recognize" + query, body)
    return status, payload


def head(method: str, path: str, *lines: str) -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: e2vd", *lines]) + "\r\n\r\n").encode()


def raw(d: DaemonProcess, data: bytes) -> tuple[int, Any]:
    status, _, payload = raw_request(d.socket, data)
    return status, payload


def hold_open(d: DaemonProcess, data: bytes, then: Callable[[socket.socket], None] | None = None) -> tuple[int, Any]:
    """Send `data`, optionally act on the socket, then read the daemon's answer."""
    with connect_unix(str(d.socket), CONNECTION_TIMEOUT * 10) as s:
        s.sendall(data)
        if then is not None:
            then(s)
        status, _, payload = read_response(s)
        return status, payload


def dripping(piece: bytes) -> Callable[[socket.socket], None]:
    """A sender of `piece` every 0.5 s (never silent for connection_timeout) until the daemon gives up."""
    def drip(s: socket.socket) -> None:
        try:
            for _ in range(CONNECTION_TIMEOUT * 6):
                s.send(piece)
                time.sleep(0.5)
        except OSError:
            pass
    return drip


trickle = dripping(b"x")                          # one body byte at a time
chunked_trickle = dripping(b"1\r\nx\r\n")         # a one-byte chunk at a time


def post_chunked(d: DaemonProcess, data: bytes, *lines: str) -> tuple[int, Any]:
    """`data` sent as it is after a chunked POST /v1/recognize head with `lines`."""
    return raw(d, head("POST", "/v1/recognize", "Transfer-Encoding: chunked", *lines) + data)


def post_form(d: DaemonProcess, *parts: Part, query: str = "", chunk: int | None = None,
              **form_args: Any) -> tuple[int, Any]:
    """A multipart/form-data POST of `parts`, with Content-Length, or chunked in pieces of `chunk` bytes."""
    body, content_type = form(*parts, **form_args)
    if chunk is not None:
        return post_chunked(d, chunked(body, chunk), f"Content-Type: {content_type}")
    return raw(d, head("POST", "/v1/recognize" + query, f"Content-Type: {content_type}",
                       f"Content-Length: {len(body)}") + body)


def star_form(params: bytes, *more: bytes) -> bytes:
    """A request whose form has GOOD in a part with Content-Disposition `form-data; <params>`,
    then the raw parts `more`."""
    body = (b"--b\r\nContent-Disposition: form-data; " + params + b"\r\nContent-Type: audio/wav\r\n\r\n" + GOOD
            + b"\r\n" + b"".join(more) + b"--b--\r\n")
    return head("POST", "/v1/recognize", "Content-Type: multipart/form-data; boundary=b",
                f"Content-Length: {len(body)}") + body


def crossing_max_body_chunked(d: DaemonProcess) -> tuple[int, Any]:
    """A chunked body refused the moment its chunks would cross max_body_bytes: 20 MB, then 6 MB more."""
    big = b"\0" * 20_000_000
    return hold_open(d, head("POST", "/v1/recognize", "Transfer-Encoding: chunked")
                     + b"%x\r\n%s\r\n%x\r\n" % (len(big), big, 6_000_000))


FILE: Part = ("file", GOOD, "a.wav")


def hang_up_mid_upload(d: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(d.socket))
        s.sendall(head("POST", "/v1/recognize", "Content-Length: 64000") + GOOD[:5000])
    return None


def silent_connection(d: DaemonProcess) -> tuple[str, float]:
    with connect_unix(str(d.socket), CONNECTION_TIMEOUT * 10) as s:
        start = time.monotonic()
        assert s.recv(10) == b""   # the daemon closed it
        return "closed", time.monotonic() - start


def too_many_connections(d: DaemonProcess) -> tuple[int, Any]:
    from e2vd.server import MAX_CONNECTIONS

    deadline = time.monotonic() + 10
    while d.request("GET", "/v1/status")[2]["connections"] != 1:   # only the status request itself
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            held.append(s)
        status, _, payload = raw_request(d.socket, head("GET", "/v1/health"))
        # the overall cap, not the per-uid one (this daemon allows one uid all of them)
        assert f"{MAX_CONNECTIONS} connections open" in payload["error"]["message"], payload
        return status, payload
    finally:
        for s in held:
            s.close()


def oversized_body_without_expect(d: DaemonProcess) -> tuple[int, Any]:
    """A client that just sends too much: the 413 is waiting for it even though its send failed."""
    import json

    conn = d.connection()
    try:
        try:
            conn.request("POST", "/v1/recognize", body=b"\0" * (MAX_BODY + 1_000_000))
        except (BrokenPipeError, ConnectionResetError):
            pass   # the daemon answered and closed without reading the body
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def curl_upload(d: DaemonProcess, data: bytes, tmp: Path) -> tuple[int, Any]:
    import json

    path = tmp / "upload.bin"
    path.write_bytes(data)
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(d.socket), "--data-binary", f"@{path}",
                          "-w", "\n%{http_code}", "http://e2vd/v1/recognize"],
                         capture_output=True, text=True, timeout=120, check=True)
    body, code = out.stdout.rsplit("\n", 1)
    return int(code), json.loads(body)


def nan_samples() -> bytes:
    x = speechlike(1.0)
    x[100:200] = np.nan
    return audio_bytes(samples=x, subtype="FLOAT")


def inf_samples() -> bytes:
    x = speechlike(1.0)
    x[5] = np.inf
    return audio_bytes(samples=x, subtype="FLOAT")


def short(outcome: tuple[int, Any]) -> tuple[int, Any]:
    """`outcome`, once its error message is checked to quote at most a bounded part of what was sent."""
    status, payload = outcome
    assert len(payload["error"]["message"]) < 400, payload
    return status, payload


LONG = "a" * 60000   # a query, path or method of 60 KB: the request line stays under 64 KiB


# (id, action(daemon, tmp) -> (status, payload) | None, expected status, expected error code or None for 200)
CASES: list[tuple[str, Callable[..., Any], int | None, str | None]] = [
    # --- bodies that are not usable audio ---
    ("empty body", lambda d, t: post(d, b""), 400, "bad_audio"),
    ("garbage bytes", lambda d, t: post(d, bytes(range(256)) * 40), 400, "bad_audio"),
    ("text that looks like a path", lambda d, t: post(d, b"/etc/shadow"), 400, "bad_audio"),
    ("truncated wav", lambda d, t: post(d, audio_bytes(1.0)[:20000]), 400, "bad_audio"),
    ("wav header only", lambda d, t: post(d, audio_bytes(1.0)[:44]), 400, "bad_audio"),
    ("NaN samples", lambda d, t: post(d, nan_samples()), 400, "bad_audio"),
    ("inf samples", lambda d, t: post(d, inf_samples()), 400, "bad_audio"),
    ("garbage after an MPEG frame header", lambda d, t: post(d, audio_bytes(1.0, fmt="MP3")[:4] + bytes(range(256)) * 40),
     400, "bad_audio"),
    ("mp3 cut inside its first frame", lambda d, t: post(d, audio_bytes(1.0, fmt="MP3")[:100]), 400, "bad_audio"),
    ("mp3 with random bytes after its first frames", lambda d, t: post(
        d, audio_bytes(3.0, fmt="MP3")[:2000] + np.random.default_rng(5).bytes(20000)), 400, "bad_audio"),
    ("random bytes as clip.mp3 in a form", lambda d, t: post_form(
        d, ("file", b"\xff\xfb\x90\x64" + np.random.default_rng(6).bytes(20000), "clip.mp3")), 400, "bad_audio"),
    ("10 ms of audio", lambda d, t: post(d, audio_bytes(0.01)), 422, "too_short"),
    ("10 min of audio", lambda d, t: post(d, audio_bytes(samples=np.zeros((9_600_000, 1), np.float32))), 422, "too_long"),
    ("31 s of audio", lambda d, t: post(d, audio_bytes(samples=np.zeros((496_000, 1), np.float32))), 422, "too_long"),
    # --- odd but fine audio ---
    ("stereo (ok)", lambda d, t: post(d, audio_bytes(1.0, channels=2)), 200, None),
    ("8 kHz (ok)", lambda d, t: post(d, audio_bytes(1.0, sr=8000)), 200, None),
    ("44.1 kHz flac (ok)", lambda d, t: post(d, audio_bytes(1.0, sr=44100, fmt="FLAC")), 200, None),
    ("ogg vorbis (ok)", lambda d, t: post(d, audio_bytes(1.0, fmt="OGG", subtype="VORBIS")), 200, None),
    ("mp3 (ok)", lambda d, t: post(d, audio_bytes(1.0, sr=16000, fmt="MP3")), 200, None),
    ("silence (ok)", lambda d, t: post(d, audio_bytes(samples=np.zeros((16000, 1), np.float32))), 200, None),
    # --- options, routes, methods ---
    ("granularity=word", lambda d, t: post(d, GOOD, "?granularity=word"), 400, "bad_option"),
    ("embedding=maybe", lambda d, t: post(d, GOOD, "?embedding=maybe"), 400, "bad_option"),
    ("unknown option", lambda d, t: post(d, GOOD, "?file=/etc/passwd"), 400, "bad_option"),
    ("repeated option", lambda d, t: post(d, GOOD, "?embedding=1&embedding=0"), 400, "bad_option"),
    ("warmup hold=-5", lambda d, t: d.request("POST", "/v1/warmup?hold=-5")[::2], 400, "bad_option"),
    ("warmup hold=9h", lambda d, t: d.request("POST", "/v1/warmup?hold=9h")[::2], 400, "bad_option"),
    ("warmup hold=1_0 (float() would read 10)", lambda d, t: d.request("POST", "/v1/warmup?hold=1_0")[::2],
     400, "bad_option"),
    ("warmup hold in Arabic-Indic digits", lambda d, t: d.request("POST", "/v1/warmup?hold=%D9%A1%D9%A0")[::2],
     400, "bad_option"),
    ("warmup hold=infinity", lambda d, t: d.request("POST", "/v1/warmup?hold=infinity")[::2], 400, "bad_option"),
    ("60 KB malformed query", lambda d, t: short(post(d, GOOD, "?" + LONG)), 400, "bad_option"),
    ("60 KB option value", lambda d, t: short(post(d, GOOD, "?granularity=" + LONG)), 400, "bad_option"),
    ("60 KB option name", lambda d, t: short(post(d, GOOD, f"?{LONG}=1")), 400, "bad_option"),
    ("60 KB path", lambda d, t: short(raw(d, head("GET", "/" + LONG))), 404, "not_found"),
    ("60 KB method", lambda d, t: short(raw(d, head(LONG.upper(), "/v1/status"))), 501, "not_implemented"),
    ("unknown route", lambda d, t: d.request("GET", "/v1/recognise")[::2], 404, "not_found"),
    ("GET /v1/recognize", lambda d, t: d.request("GET", "/v1/recognize")[::2], 405, "method_not_allowed"),
    ("DELETE /v1/status", lambda d, t: d.request("DELETE", "/v1/status")[::2], 405, "method_not_allowed"),
    ("HEAD /v1/health (GET's answer, no body)", lambda d, t: raw(d, head("HEAD", "/v1/health", "Connection: close")),
     200, None),
    ("unknown method", lambda d, t: raw(d, head("BREW", "/v1/status")), 501, "not_implemented"),
    ("lower-case method", lambda d, t: raw(d, head("post", "/v1/recognize")), 501, "not_implemented"),
    # --- framing ---
    # --- chunked bodies ---
    ("chunked upload (ok)", lambda d, t: post_chunked(d, chunked(GOOD)), 200, None),
    ("chunked with extensions and trailers (ok)", lambda d, t: post_chunked(
        d, b"10;a=b\r\n" + GOOD[:16] + b"\r\n" + chunked(GOOD[16:], 999, b"X-Sum: 1\r\n")), 200, None),
    ("chunk size not hex", lambda d, t: post_chunked(d, b"1g\r\n" + GOOD[:16] + b"\r\n0\r\n\r\n"), 400, "bad_request"),
    ("chunk size over 16 hex digits", lambda d, t: post_chunked(d, b"1" * 17 + b"\r\n"), 400, "bad_request"),
    ("chunk longer than its size", lambda d, t: post_chunked(d, b"10\r\n" + GOOD[:20] + b"\r\n0\r\n\r\n"),
     400, "bad_request"),
    ("chunk extension over 4 KiB", lambda d, t: post_chunked(d, b"10;" + b"x" * 5000 + b"\r\n"), 400, "bad_request"),
    ("chunked body without its last chunk", lambda d, t: hold_open(
        d, head("POST", "/v1/recognize", "Transfer-Encoding: chunked") + chunked(GOOD)[:-5],
        lambda s: s.shutdown(socket.SHUT_WR)), 400, "bad_request"),
    ("chunked trickle", lambda d, t: hold_open(d, head("POST", "/v1/recognize", "Transfer-Encoding: chunked"),
                                               chunked_trickle), 408, "timeout"),
    ("chunk declared over max_body_bytes", lambda d, t: post_chunked(d, b"%x\r\n" % (MAX_BODY + 1)), 413, "too_large"),
    ("chunks crossing max_body_bytes", lambda d, t: crossing_max_body_chunked(d), 413, "too_large"),
    ("Transfer-Encoding gzip", lambda d, t: post_chunked(d, b"0\r\n\r\n", "Transfer-Encoding: gzip"), 400, "bad_request"),
    ("chunked and Content-Length", lambda d, t: post_chunked(d, chunked(GOOD), f"Content-Length: {len(GOOD)}"),
     400, "bad_request"),
    # --- multipart/form-data ---
    ("multipart upload (ok)", lambda d, t: post_form(d, FILE), 200, None),
    ("multipart chunked, options as fields (ok)", lambda d, t: post_form(
        d, ("granularity", b"frame", None), FILE, ("embedding", b"1", None), chunk=1000), 200, None),
    ("form with two file parts", lambda d, t: post_form(d, FILE, ("audio", GOOD, "b.wav")), 400, "bad_form"),
    ("form with a stray text field", lambda d, t: post_form(d, FILE, ("submit", b"Upload", None)), 400, "bad_form"),
    ("form without a file part", lambda d, t: post_form(d, ("granularity", b"frame", None)), 400, "bad_form"),
    ("form without its closing boundary", lambda d, t: post_form(d, FILE, end=b"\r\n"), 400, "bad_form"),
    ("form boundary over 70 bytes", lambda d, t: post_form(d, FILE, boundary="b" * 71), 400, "bad_form"),
    ("form part header over 4 KiB", lambda d, t: post_form(d, ("file", GOOD, "a" * 5000)), 400, "bad_form"),
    ("nested multipart", lambda d, t: post_form(d, FILE, part_headers={"Content-Type": "multipart/mixed; boundary=x"}),
     400, "bad_form"),
    ("multipart/mixed body", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Type: multipart/mixed; boundary=b",
                                                      "Content-Length: 7") + b"--b--\r\n"), 400, "bad_form"),
    ("form field named only by name*= (RFC 2231)", lambda d, t: raw(d, star_form(b"name*=UTF-8''audio")), 400, "bad_form"),
    ("form option field named by name*=", lambda d, t: raw(d, star_form(
        b'name="file"', b"--b\r\nContent-Disposition: form-data; name*=UTF-8''granularity\r\n\r\nframe\r\n")),
     400, "bad_form"),
    ("form file with filename*= (ok)", lambda d, t: raw(d, star_form(b"name=\"file\"; filename*=UTF-8''%E2%82%AC.wav")),
     200, None),
    ("option in the query and the form", lambda d, t: post_form(d, FILE, ("embedding", b"1", None), query="?embedding=1"),
     400, "bad_option"),
    ("form field granularity=word", lambda d, t: post_form(d, FILE, ("granularity", b"word", None)), 400, "bad_option"),
    ("form over max_body_bytes (Expect: 100-continue)", lambda d, t: raw(d, head(
        "POST", "/v1/recognize", f"Content-Type: {form()[1]}", f"Content-Length: {MAX_BODY + 1}",
        "Expect: 100-continue")), 413, "too_large"),
    ("POST without Content-Length", lambda d, t: raw(d, head("POST", "/v1/recognize")), 411, "length_required"),
    ("Content-Length not a number", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: abc")), 400, "bad_request"),
    ("negative Content-Length", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: -5")), 400, "bad_request"),
    ("two Content-Lengths", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: 10",
                                                    "Content-Length: 20") + b"x" * 10), 400, "bad_request"),
    ("Content-Length smaller than body", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: 300")
                                                           + GOOD), 400, "bad_audio"),
    ("body shorter than Content-Length", lambda d, t: hold_open(
        d, head("POST", "/v1/recognize", f"Content-Length: {len(GOOD) + 100}") + GOOD,
        lambda s: s.shutdown(socket.SHUT_WR)), 400, "bad_request"),
    ("huge Content-Length declared", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: 1000000000000")),
     413, "too_large"),
    ("huge body sent without Expect", lambda d, t: oversized_body_without_expect(d), 413, "too_large"),
    ("huge body via curl (Expect: 100-continue)", lambda d, t: curl_upload(d, b"\0" * (MAX_BODY + 1), t), 413, "too_large"),
    ("Expect: 100-continue too large", lambda d, t: raw(d, head("POST", "/v1/recognize", f"Content-Length: {MAX_BODY + 1}",
                                                               "Expect: 100-continue")), 413, "too_large"),
    ("malformed request line", lambda d, t: raw(d, b"GARBAGE\r\n\r\n"), 400, "bad_request"),
    ("HTTP/2.0 request line", lambda d, t: raw(d, b"GET /v1/health HTTP/2.0\r\n\r\n"), 400, "bad_request"),
    ("request line too long", lambda d, t: raw(d, head("GET", "/v1/health?x=" + "a" * 70000)), 414, "uri_too_long"),
    ("header line too long", lambda d, t: raw(d, head("GET", "/v1/health", "X-A: " + "a" * 70000)), 431,
     "header_too_large"),
    ("too many headers", lambda d, t: raw(d, head("GET", "/v1/health", *[f"X-{i}: 1" for i in range(120)])), 431,
     "header_too_large"),
    ("header lines of 90 KB together", lambda d, t: raw(d, head("GET", "/v1/health", *[f"X-{i}: " + "a" * 30000
                                                                                        for i in range(3)])), 431,
     "header_too_large"),
    # --- request targets, Host, Expect (RFC 9112 §3.2, RFC 9110 §10.1.1) ---
    ("target with a #fragment", lambda d, t: raw(d, head("GET", "/v1/health#x")), 400, "bad_request"),
    ("absolute-form target (ok)", lambda d, t: raw(d, head("GET", "http://e2vd/v1/health")), 200, None),
    ("OPTIONS *", lambda d, t: raw(d, head("OPTIONS", "*")), 404, "not_found"),
    ("GET *", lambda d, t: raw(d, head("GET", "*")), 400, "bad_request"),
    ("CONNECT", lambda d, t: raw(d, head("CONNECT", "e2vd:443")), 400, "bad_request"),
    ("target not a path", lambda d, t: raw(d, head("GET", "v1/health")), 400, "bad_request"),
    ("two Host headers", lambda d, t: raw(d, head("GET", "/v1/health", "Host: evil.example")), 400, "bad_request"),
    ("HTTP/1.1 without Host", lambda d, t: raw(d, b"GET /v1/health HTTP/1.1\r\n\r\n"), 400, "bad_request"),
    ("Host not a host", lambda d, t: raw(d, b"GET /v1/health HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400, "bad_request"),
    ("Expect other than 100-continue", lambda d, t: raw(d, head("POST", "/v1/recognize", f"Content-Length: {len(GOOD)}",
                                                               "Expect: 200-ok") + GOOD), 417, "expectation_failed"),
    ("plus-signed Content-Length", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: +5") + b"x" * 5),
     400, "bad_request"),
    ("Content-Length then Transfer-Encoding", lambda d, t: raw(d, head("POST", "/v1/recognize", "Content-Length: 5",
                                                                      "Transfer-Encoding: chunked") + b"0\r\n\r\n"),
     400, "bad_request"),
    ("small body on GET (ignored)", lambda d, t: raw(d, head("GET", "/v1/health", "Content-Length: 3") + b"abc"), 200, None),
    ("HTTP/1.0 request (ok)", lambda d, t: raw(d, b"GET /v1/health HTTP/1.0\r\n\r\n"), 200, None),
    # --- clients that stall or vanish ---
    ("never sends its body", lambda d, t: hold_open(d, head("POST", "/v1/recognize", "Content-Length: 64000")), 408, "timeout"),
    ("trickle upload", lambda d, t: hold_open(d, head("POST", "/v1/recognize", "Content-Length: 64000"), trickle),
     408, "timeout"),
    ("headers never finished", lambda d, t: hold_open(d, b"POST /v1/recognize HTTP/1.1\r\nHost: e2"), 408, "timeout"),
    ("too many connections", lambda d, t: too_many_connections(d), 503, "busy"),
    ("client hangs up mid-upload", lambda d, t: hang_up_mid_upload(d), None, None),
    ("silent connection is closed", lambda d, t: silent_connection(d), None, None),
]


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name, action, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(daemon, tmp_path, name, action, status, code):
    outcome = action(daemon, tmp_path)
    if status is not None:
        got_status, payload = outcome
        assert got_status == status, payload
        if code is not None:
            assert payload["error"]["code"] == code, payload
            message = payload["error"]["message"]
            assert len(message) > 20 and not message.startswith("<")   # a sentence, not an HTML page
            if "mp3" in name.lower() or "MPEG" in name:   # garbage that looks like MP3: named, with what to do
                assert "not decodable audio" in message and "WAV or FLAC" in message, message
            if "name*=" in name:   # the extended parameter is named, with what to send instead
                assert "name*=UTF-8''" in message and 'plain name="file"' in message, message
        elif status == 200 and isinstance(payload, dict) and "labels" in payload:
            assert len(payload["scores"]) == 9
    # ... and the daemon still answers a good request
    good_status, result = post(daemon, GOOD)
    assert good_status == 200, result
    assert result["top"]["label"] in result["labels"]
    assert daemon.proc.poll() is None
