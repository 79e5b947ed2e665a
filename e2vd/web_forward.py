"""Forwarding one validated /v1/* request from the browser front to the daemon's Unix socket,
streaming both ways (docs/design.md, the browser front).

The front never passes on bytes of the client's head: it writes a new request from what it has
validated (the route's own method and path, the options re-encoded, Content-Length, the
Content-Type if one was sent, `Connection: close`). The body goes through in pieces of at most
PIECE_BYTES as they arrive, so a 40 MB upload is never held whole. The daemon's answer comes back
the same way: its status and JSON body unchanged, its Retry-After and Allow headers,
with the front's own Server, Date and Connection. When the daemon cannot be reached or closes
without an answer the client gets 502, when it does not answer within `answer_timeout` 504, both
in the daemon's error shape.

The daemon's bytes are bounded too, as a client's are: an answer announcing more than
`Upstream.max_answer_bytes` (by default `answer_cap(max_seconds)`: the largest recognize answer,
frame embeddings for max_seconds of audio, with room to spare), or one that is not a
Content-Length answer (chunked), is refused with 502 daemon_bad_answer before any of it goes to
the browser; so is one whose body does not arrive within `answer_timeout` seconds of waiting
(a drip). Only time spent waiting on the daemon counts, not time spent writing to a slow browser.
An answer larger than SMALL_ANSWER_BYTES is streamed, so when it stalls after its head went out
the browser's connection is closed with the body cut short (and the log says why).
"""
from __future__ import annotations

import http.client
import io
import json
import math
import re
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable
from urllib.parse import urlencode

from e2vd.http_wire import response_head
from e2vd.protocol import Route, error_body

PIECE_BYTES = 1 << 16          # most bytes moved in one read or write
CLIENT_GONE = 499              # logged status of a request whose client hung up before the answer
SMALL_ANSWER_BYTES = 1 << 16   # answers up to this size are read whole before any goes out (errors: to log their code)
FRAME_HZ = 50                  # frame-granularity embeddings: one row per 20 ms (e2vd.protocol's granularity option)
EMBEDDING_DIM_BOUND = 1024     # the widest Emotion2Vec+ encoder (large: 1024; base: 768)
FLOAT_JSON_BYTES = 32          # one float32 in the daemon's JSON: at most 24 characters and a comma, rounded up
ANSWER_SLACK_BYTES = 1 << 20   # the rest of a recognize answer (labels, scores, timings, fallback fields)
DEFAULT_MAX_SECONDS = 30.0     # e2vd.config.Settings.max_seconds
_RELAYED = {"retry-after": re.compile(r"[0-9]{1,9}"),
            "allow": re.compile(r"[A-Z]+(, ?[A-Z]+){0,15}")}
_CONTENT_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+([ \t]*;[\x20-\x7e\t]*)?")


class GatewayError(Exception):
    """The daemon could not be reached (502 daemon_unreachable), did not answer in time (504
    daemon_timeout) or answered beyond the front's bounds (502 daemon_bad_answer); `message` says
    what to do. Raised only before any of the answer went out."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict:
        return error_body(self.code, self.message)


def unreachable(message: str) -> GatewayError:
    return GatewayError(502, "daemon_unreachable", message)


def timed_out(message: str) -> GatewayError:
    return GatewayError(504, "daemon_timeout", message)


def bad_answer(message: str) -> GatewayError:
    return GatewayError(502, "daemon_bad_answer", message)


def answer_cap(max_seconds: float) -> int:
    """The most bytes the front relays from the daemon in one answer: a frame-granularity
    embedding for `max_seconds` of audio (50 rows a second, plus two) of EMBEDDING_DIM_BOUND
    floats at FLOAT_JSON_BYTES each, and ANSWER_SLACK_BYTES for the rest. 30 s: 50,266,112 bytes."""
    rows = math.ceil(max(max_seconds, 0.0) * FRAME_HZ) + 2
    return rows * EMBEDDING_DIM_BOUND * FLOAT_JSON_BYTES + ANSWER_SLACK_BYTES


@dataclass(frozen=True)
class Upstream:
    """The daemon as the front reaches it. Seconds: `connect_timeout` for room in the socket's
    backlog (full while a cold daemon starts), `answer_timeout` for its answer (a cold start
    with the model's load included, and again for its body, counting only the time spent waiting
    on the daemon). `max_answer_bytes`: the largest answer relayed (None: answer_cap of the
    default max_seconds; e2vd.web_http.Front fills it from the configured max_seconds)."""

    socket_path: str
    connect_timeout: float = 30.0
    answer_timeout: float = 300.0
    max_answer_bytes: int | None = None

    @property
    def answer_limit(self) -> int:
        return answer_cap(DEFAULT_MAX_SECONDS) if self.max_answer_bytes is None else self.max_answer_bytes


@dataclass
class Outcome:
    """What a forwarded request came to: the status sent to the client, the daemon's error code
    (None on success), bytes each way, and whether the client's connection must close (its body
    was not read to the end, or the answer was cut short)."""

    status: int = 0
    code: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    close: bool = False
    notes: list[str] = field(default_factory=list)


def request_head(route: Route, pairs: list[tuple[str, str]], length: int | None, content_type: str | None,
                 head_only: bool = False) -> bytes:
    """The head the daemon gets: the route's method (HEAD for `head_only`) and path, `pairs`
    re-encoded as the query, Content-Length when there is a body, a Content-Type that is a plain
    media type, no keep-alive."""
    query = urlencode(pairs)
    method = "HEAD" if head_only else route.method
    lines = [f"{method} {route.path}{'?' + query if query else ''} HTTP/1.1", "Host: e2vd"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if content_type and _CONTENT_TYPE.fullmatch(content_type) and len(content_type) <= 200:
        lines.append(f"Content-Type: {content_type}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def connect(upstream: Upstream) -> socket.socket:
    """A connection to the daemon's socket; GatewayError with the reason and the fix."""
    path = upstream.socket_path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    seconds = max(upstream.connect_timeout, 0.001)
    # a blocking connect waits for room in a full backlog, bounded by SO_SNDTIMEO (as e2vd.client does)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    try:
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        raise timed_out(f"the daemon's socket {path} stayed full for {seconds:g} s (many clients while it "
                        "starts); try again in a moment") from None
    except FileNotFoundError:
        sock.close()
        raise unreachable(f"no daemon socket at {path}: e2vd.socket is not listening "
                          "(sudo systemctl enable --now e2vd.socket)") from None
    except PermissionError:
        sock.close()
        raise unreachable(f"the page's server may not use {path}: its service must be in the socket's group "
                          "(SupplementaryGroups=e2vd in e2vd-web.service; `sudo e2vd install --web` writes it)") from None
    except ConnectionRefusedError:
        sock.close()
        raise unreachable(f"nothing listens on {path} (e2vd.socket stopped?): "
                          "sudo systemctl enable --now e2vd.socket") from None
    except OSError as exc:
        sock.close()
        raise unreachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
    sock.settimeout(upstream.answer_timeout)
    return sock


def forward(upstream: Upstream, head: bytes, length: int, read_body: Callable[[int], bytes],
            write: Callable[[bytes], bool], close_after: bool, client: socket.socket | None = None,
            head_only: bool = False) -> Outcome:
    """Send `head` and `length` body bytes (from `read_body(most)`, which raises for a client that
    stops short: the daemon's connection is closed and the exception goes to the caller) to the
    daemon, and relay its answer through `write` (False: the client has gone). `close_after`: the
    client asked to close after this answer. GatewayError before any of the answer was written.

    While the daemon works, `client` (the browser's socket) is watched: when it hangs up, the
    daemon's connection is closed at once, so a recognition still queued there is not run (the
    daemon skips jobs whose client has gone); the outcome is then status 499 with `close`.
    `head_only`: `head` is a HEAD request; the answer's head is relayed, no body is read or sent."""
    out = Outcome()
    sock = connect(upstream)
    try:
        early = _send(sock, head, length, read_body, out)
        out.close = close_after or early
        if client is not None and not _await_answer(sock, client, upstream):
            out.status, out.close = CLIENT_GONE, True
            out.notes.append("the client hung up before the daemon answered")
            return out
        _relay(sock, upstream, write, out, head_only)
    finally:
        sock.close()
    return out


def _send(sock: socket.socket, head: bytes, length: int, read_body: Callable[[int], bytes], out: Outcome) -> bool:
    """Send the head and stream the body; True when the daemon answered (or went away) before
    all of it was sent, so the client's body was not read to its end."""
    try:
        sock.sendall(head)
    except socket.timeout:
        raise timed_out("the daemon did not take the request in time") from None
    except OSError:
        return True
    while out.bytes_up < length:
        piece = read_body(min(PIECE_BYTES, length - out.bytes_up))
        try:
            sock.sendall(piece)
        except socket.timeout:
            raise timed_out(f"the daemon stopped reading the upload for {sock.gettimeout():g} s "
                            f"(after {out.bytes_up} of {length} bytes)") from None
        except OSError:
            return True          # it answered early and closed (e.g. 413), or died: read what it said
        out.bytes_up += len(piece)
        if select.select([sock], [], [], 0)[0]:
            return out.bytes_up < length   # an answer (or EOF) before the whole body: stop sending
    return False


def _await_answer(sock: socket.socket, client: socket.socket, upstream: Upstream) -> bool:
    """Wait until the daemon's answer starts (True), or the client hangs up (False). Bytes the
    client sends meanwhile (a pipelined request) stay unread; from then on it is not watched.
    Past `answer_timeout`, GatewayError 504."""
    deadline = time.monotonic() + upstream.answer_timeout
    watched = [sock, client]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out(f"the daemon did not answer within {upstream.answer_timeout:g} s; "
                            "see `e2vd status` and journalctl -u e2vd")
        ready = select.select(watched, [], [], left)[0]
        if sock in ready:
            return True
        if client in ready:
            try:
                gone = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                return False
            watched = [sock]


class _Budget(io.RawIOBase):
    """The daemon's socket as a raw stream that may wait at most `left` seconds in all (set
    before each phase): a daemon that drips its answer runs out of it, socket.timeout."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.left = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise socket.timeout("the daemon's time is spent")
        self.sock.settimeout(self.left)
        t0 = time.monotonic()
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.left -= time.monotonic() - t0


class _Source:
    """What http.client.HTTPResponse reads from: makefile() gives the budgeted stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.raw = _Budget(sock)

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(self.raw, PIECE_BYTES)


def _relay(sock: socket.socket, upstream: Upstream, write: Callable[[bytes], bool], out: Outcome,
           head_only: bool = False) -> None:
    """Read the daemon's answer and pass it on as it arrives, within its bounds (its head only,
    with the Content-Length a GET would get, for `head_only`)."""
    source = _Source(sock)
    source.raw.left = upstream.answer_timeout
    resp = http.client.HTTPResponse(source, method="HEAD" if head_only else None)  # type: ignore[arg-type]
    try:
        resp.begin()
    except socket.timeout:
        raise timed_out(f"the daemon did not answer within {upstream.answer_timeout:g} s; "
                        "see `e2vd status` and journalctl -u e2vd") from None
    except (http.client.HTTPException, OSError) as exc:
        raise unreachable("the daemon closed the connection without an answer (it may have crashed or "
                          f"been stopped: journalctl -u e2vd): {type(exc).__name__}") from None
    try:
        phrase_ok = bool(HTTPStatus(resp.status).phrase)
    except ValueError:
        phrase_ok = False
    length_text = resp.getheader("Content-Length", "")
    json_type = resp.getheader("Content-Type", "").split(";")[0].strip().lower() == "application/json"
    if resp.getheader("Transfer-Encoding") is not None:
        raise bad_answer(f"the daemon's answer (status {resp.status}) came with Transfer-Encoding "
                         f"{resp.getheader('Transfer-Encoding', '')[:40]!r}: the page's server relays only answers "
                         "with a Content-Length, of at most a known size; see journalctl -u e2vd")
    # the daemon answers 200 to 5xx with a JSON body; 1xx, 204 and 304 carry none (RFC 9110 §6.4.1), so
    # relaying one with the Content-Length written here would break the browser's framing
    if not phrase_ok or not 200 <= resp.status <= 599 or resp.status in (204, 304) or not length_text.isascii() \
            or not length_text.isdigit() or not json_type:
        raise unreachable(f"the daemon's answer is not one the page's server understands (status {resp.status}, "
                          f"Content-Length {length_text[:20]!r}); see journalctl -u e2vd")
    cap = upstream.answer_limit
    if len(length_text) > 20 or int(length_text) > cap:
        raise bad_answer(f"the daemon's answer announces {length_text[:24]} bytes (status {resp.status}), more than "
                         f"the {cap} the page's server relays (the largest recognize answer: frame embeddings for "
                         "max_seconds of audio); see journalctl -u e2vd")
    length = int(length_text)
    headers = {}
    for name in ("Retry-After", "Allow"):
        value = resp.getheader(name)
        if value is not None and _RELAYED[name.lower()].fullmatch(value):
            headers[name] = value
    out.status = resp.status
    if head_only:
        if not write(response_head(resp.status, length, headers, close=out.close)):
            out.close = True
        return
    source.raw.left = upstream.answer_timeout      # the body's own time, spent only while waiting on the daemon
    first = b""
    if length <= SMALL_ANSWER_BYTES:
        first = _read(resp, length, upstream)
        if resp.status >= 400:
            out.code = _error_code(first)
    if not write(response_head(resp.status, length, headers, close=out.close) + first):
        out.close = True
        return
    out.bytes_down = len(first)
    while out.bytes_down < length:
        try:
            piece = resp.read(min(PIECE_BYTES, length - out.bytes_down))
        except socket.timeout:
            out.notes.append(f"the daemon's answer dripped: {out.bytes_down} of {length} bytes in "
                             f"{upstream.answer_timeout:g} s of waiting; the browser's answer is cut short")
            out.code, out.close = "daemon_bad_answer", True
            return
        except (OSError, http.client.HTTPException):
            piece = b""
        if not piece:
            out.notes.append(f"the daemon's answer stopped after {out.bytes_down} of {length} bytes")
            out.close = True
            return
        if not write(piece):
            out.close = True
            return
        out.bytes_down += len(piece)


def _read(resp: http.client.HTTPResponse, length: int, upstream: Upstream) -> bytes:
    try:
        data = resp.read(length)
    except socket.timeout:
        raise bad_answer(f"the daemon's answer of {length} bytes did not arrive within {upstream.answer_timeout:g} s "
                         "of waiting (it dripped or stalled); see journalctl -u e2vd") from None
    except (OSError, http.client.HTTPException):
        data = b""
    if len(data) < length:
        raise unreachable(f"the daemon's answer stopped after {len(data)} of {length} bytes; see journalctl -u e2vd")
    return data


def _error_code(data: bytes) -> str | None:
    """The code of a JSON error answer, if it is one."""
    try:
        code = json.loads(data)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None
