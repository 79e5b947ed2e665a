"""Uploads from the HTTP clients people use, each against one real daemon on the tiny stand-in:
curl, httpx (its Unix-socket transport), requests (requests-unixsocket), aiohttp (UnixConnector)
and e2vd's own Client, sending the same clip raw, chunked and as a multipart form. Every one must
get the same scores as `curl --data-binary`, and the daemon's request event must show that the
body came the way the test says (upload=raw|multipart, chunked) so that each path is really taken.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wav_clip
from daemon_proc import DaemonProcess

from e2vd import Client

CLIP = wav_clip(2.0, seed=3)
URL = "http://e2vd/v1/recognize"
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory) -> Iterator[DaemonProcess]:
    sock = tmp_path_factory.mktemp("uploads") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600, connection_timeout=60) as d:
        yield d


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    path.write_bytes(CLIP)
    return path


def request_events(d: DaemonProcess) -> list[dict[str, str]]:
    """The fields of the daemon's POST /v1/recognize request events so far, in order."""
    events = []
    for line in d.log_text().splitlines():
        if "event=request" in line and "path=/v1/recognize" in line:
            fields = line[line.rindex("(event=") + 1:].rstrip(")")
            events.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', fields)))
    return events


def sent(d: DaemonProcess, send: Callable[[], tuple[int, Any]]) -> tuple[int, Any, dict[str, str]]:
    """Run `send` (one request); (status, JSON answer, the request event the daemon logged for it)."""
    before = len(request_events(d))
    status, answer = send()
    deadline = time.monotonic() + 60
    while len(events := request_events(d)) <= before:   # logged just after the answer leaves
        assert time.monotonic() < deadline, d.log_text()[-2000:]
        time.sleep(0.02)
    return status, answer, events[before]


# --- the clients ----------------------------------------------------------------------------------

def curl(d: DaemonProcess, *args: str, stdin: bytes | None = None, query: str = "") -> tuple[int, Any]:
    out = subprocess.run([CURL, "-sS", "--unix-socket", str(d.socket), "-w", "\n%{http_code}", *args, URL + query],
                         input=stdin, capture_output=True, timeout=120, check=True)
    body, code = out.stdout.rsplit(b"\n", 1)
    return int(code), json.loads(body)


def httpx_post(d: DaemonProcess, query: str = "", **kwargs: Any) -> tuple[int, Any]:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), timeout=120) as client:
        response = client.post(URL + query, **kwargs)
        return response.status_code, response.json()


def requests_post(d: DaemonProcess, **kwargs: Any) -> tuple[int, Any]:
    import requests_unixsocket

    with requests_unixsocket.Session() as session:
        response = session.post(f"http+unix://{urllib.parse.quote(str(d.socket), safe='')}/v1/recognize",
                                timeout=120, **kwargs)
        return response.status_code, response.json()


def aiohttp_post(d: DaemonProcess, make_data: Callable[[], Any]) -> tuple[int, Any]:
    import aiohttp

    async def post() -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.socket)),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.post(URL, data=make_data()) as response:
                return response.status, await response.json()

    return asyncio.run(post())


def pieces(data: bytes, size: int = 4000) -> Iterator[bytes]:
    """`data` as a generator: what a streaming producer hands a client (length unknown)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def aiohttp_form(path: Path) -> Any:
    import aiohttp

    data = aiohttp.FormData()
    data.add_field("file", path.open("rb"), filename="clip.wav", content_type="audio/wav")
    return data


# (id, send(daemon, clip file) -> (status, JSON), the request event's upload, chunked)
CLIENTS: list[tuple[str, Callable[[DaemonProcess, Path], tuple[int, Any]], str, bool]] = [
    ("curl --data-binary", lambda d, p: curl(d, "--data-binary", f"@{p}"), "raw", False),
    ("curl -T file", lambda d, p: curl(d, "-X", "POST", "-T", str(p)), "raw", False),
    ("curl -T - from a pipe", lambda d, p: curl(d, "-X", "POST", "-T", "-", stdin=CLIP), "raw", True),
    ("curl -F file=@", lambda d, p: curl(d, "-F", f"file=@{p}"), "multipart", False),
    ("curl -F chunked", lambda d, p: curl(d, "-H", "Transfer-Encoding: chunked", "-F", f"audio=@{p};type=audio/wav"),
     "multipart", True),
    ("httpx bytes", lambda d, p: httpx_post(d, content=CLIP), "raw", False),
    ("httpx file object", lambda d, p: httpx_post(d, content=p.open("rb")), "raw", False),
    ("httpx generator", lambda d, p: httpx_post(d, content=pieces(CLIP)), "raw", True),
    ("httpx files=", lambda d, p: httpx_post(d, files={"file": ("clip.wav", p.open("rb"), "audio/wav")}),
     "multipart", False),
    ("requests file object", lambda d, p: requests_post(d, data=p.open("rb")), "raw", False),
    ("requests generator", lambda d, p: requests_post(d, data=pieces(CLIP)), "raw", True),
    ("requests files=", lambda d, p: requests_post(d, files={"file": ("clip.wav", p.open("rb"), "audio/wav")}),
     "multipart", False),
    ("aiohttp bytes", lambda d, p: aiohttp_post(d, lambda: CLIP), "raw", False),
    ("aiohttp file", lambda d, p: aiohttp_post(d, lambda: p.open("rb")), "raw", False),
    ("aiohttp FormData", lambda d, p: aiohttp_post(d, lambda: aiohttp_form(p)), "multipart", False),
    ("e2vd Client (path)", lambda d, p: (200, Client(d.socket).recognize(p).to_dict()), "raw", False),
    ("e2vd Client (bytes)", lambda d, p: (200, Client(d.socket).recognize(CLIP).to_dict()), "raw", False),
]


@pytest.fixture(scope="module")
def reference(daemon, clip_file) -> dict[str, Any]:
    """What `curl --data-binary @clip.wav` gets: the scores every other way of sending must get."""
    status, result = curl(daemon, "--data-binary", f"@{clip_file}")
    assert status == 200, result
    return result


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test.sh installs it)")
@pytest.mark.parametrize("name, send, upload, chunked", CLIENTS, ids=[c[0] for c in CLIENTS])
def test_every_client_gets_the_scores_of_a_raw_body(daemon, clip_file, reference, name, send, upload, chunked):
    status, result, event = sent(daemon, lambda: send(daemon, clip_file))
    assert status == 200, result
    assert result["labels"] == reference["labels"] and result["top"]["label"] == reference["top"]["label"]
    assert result["scores"] == pytest.approx(reference["scores"], rel=0, abs=1e-7)
    assert (event["upload"], event.get("chunked") == "true") == (upload, chunked), event
    if upload == "raw":
        assert event["body_bytes"] == str(len(CLIP))


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test.sh installs it)")
def test_options_come_as_form_fields_or_in_the_query_but_not_both(daemon, clip_file):
    status, raw = curl(daemon, "--data-binary", f"@{clip_file}", query="?granularity=frame&embedding=1")
    assert status == 200 and len(raw["embedding"]) > 1
    status, form = curl(daemon, "-F", "granularity=frame", "-F", f"file=@{clip_file}", "-F", "embedding=1")
    assert status == 200 and np.allclose(form["embedding"], raw["embedding"], rtol=0, atol=1e-6)
    status, mixed = curl(daemon, "-F", f"file=@{clip_file}", "-F", "embedding=1", query="?granularity=frame")
    assert status == 200 and np.allclose(mixed["embedding"], raw["embedding"], rtol=0, atol=1e-6)
    status, refused = curl(daemon, "-F", f"file=@{clip_file}", "-F", "embedding=1", query="?embedding=1")
    assert status == 400 and refused["error"]["code"] == "bad_option"
    assert "given both in the query and as a form field" in refused["error"]["message"]


def test_real_clients_get_clear_errors_for_bad_forms(daemon, clip_file):
    """What a user of requests or httpx sees for the two mistakes a form invites."""
    status, answer = requests_post(daemon, files={"file": ("a.wav", CLIP), "other": ("b.wav", CLIP)})
    assert status == 400 and answer["error"]["code"] == "bad_form"
    assert "two file parts, 'file' (file 'a.wav') and 'other' (file 'b.wav')" in answer["error"]["message"]
    status, answer = requests_post(daemon, files={"granularity": (None, "frame")})
    assert status == 400 and answer["error"]["code"] == "bad_form"
    assert "no file part (only granularity)" in answer["error"]["message"]
    status, answer = httpx_post(daemon, data={"granularity": "word"}, files={"file": ("a.wav", CLIP)})
    assert status == 400 and answer["error"]["code"] == "bad_option" and "granularity='word'" in answer["error"]["message"]


def rfc2231_form(name: str, filename: str) -> tuple[bytes, str]:
    """A form of CLIP as urllib3 1.x (under requests) wrote one for non-ASCII names: RFC 2231
    parameters, `name*=utf-8''...` / `filename*=utf-8''...` (urllib3 2 still offers the formatter,
    deprecated)."""
    import warnings

    from urllib3 import encode_multipart_formdata
    from urllib3.fields import RequestField, format_header_param_rfc2231

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        field = RequestField(name, CLIP, filename=filename, header_formatter=format_header_param_rfc2231)
        field.make_multipart(content_type="audio/wav")
        return encode_multipart_formdata([field])


def test_rfc2231_parameters_from_a_real_client(daemon):
    """filename*= (a non-ASCII filename) is read; name*= (a non-ASCII field name) is refused with
    the parameter named and what to send instead; the daemon answers a good form afterwards."""
    status, reference = requests_post(daemon, data=CLIP)
    assert status == 200, reference
    body, content_type = rfc2231_form("file", "\u20ac clip.wav")
    assert b"filename*=utf-8''%E2%82%AC%20clip.wav" in body
    for post in (lambda: requests_post(daemon, data=body, headers={"Content-Type": content_type}),
                 lambda: httpx_post(daemon, content=body, headers={"Content-Type": content_type})):
        status, result = post()
        assert status == 200 and result["scores"] == pytest.approx(reference["scores"], rel=0, abs=1e-7), result
    body, content_type = rfc2231_form("\u00e4udio", "a.wav")
    assert b"name*=utf-8''%C3%A4udio" in body
    status, answer = requests_post(daemon, data=body, headers={"Content-Type": content_type})
    assert status == 400 and answer["error"]["code"] == "bad_form", answer
    assert "name*=utf-8''%C3%A4udio" in answer["error"]["message"] and 'plain name="file"' in answer["error"]["message"]
    status, result = requests_post(daemon, files={"file": ("clip.wav", CLIP)})
    assert status == 200 and result["scores"] == pytest.approx(reference["scores"], rel=0, abs=1e-7), result
