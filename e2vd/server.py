"""HTTP/1.1 request handling on accepted Unix-socket connections.

`Server.add(conn)` takes a connection accepted by the daemon and serves it on its own thread with
`Handler` (on the stdlib's `http.server.BaseHTTPRequestHandler`, protocol HTTP/1.1, keep-alive;
it reads the request line and headers and writes the answers itself). Routes, options and errors
come from `e2vd.protocol`, every error status from its ERRORS table; recognitions go through
`e2vd.scheduler`.
This module has no lifecycle code: the daemon asks it `connections`, `active` and tells it
`drain()`; keep-warm and status details come from a `Control` the daemon implements.

Limits, so that no client can hold a thread, the worker or the GPU forever:
- a connection silent for `connection_timeout` seconds (between requests too) is closed;
- once the first byte of a request arrives, the whole request (headers and body) must arrive
  within `connection_timeout` seconds, else 408 `timeout` (a reaper thread shuts the read side);
- a request line or header line longer than 64 KiB, or more than 100 header lines, get 413
  `too_large`; a request line without an HTTP version (HTTP/0.9) or with HTTP/2+ gets 400;
- a malformed header line (whitespace before the colon, a folded continuation line, a name that is
  not a token, control characters in the value), Content-Length given twice or not a number, or
  Transfer-Encoding with Content-Length get 400 `bad_request` and the connection is closed: a
  proxy in front of the socket could frame such a request differently (request smuggling);
- bodies need Content-Length (chunked uploads get 411 `length_required`); a Content-Length above
  `max_body_bytes` gets 413 `too_large` before any of the body is read (also on Expect: 100-continue);
- a recognition whose client hangs up while it waits in the queue is not run: the request event
  says status 499 (nginx's "client closed request"; never sent) and `abandoned`, and it does not
  count in `requests_served`.
The daemon never reads a path sent by a client: audio travels in the body only.
"""
from __future__ import annotations

import email.utils
import functools
import http.client
import http.server
import json
import logging
import math
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Protocol
from urllib.parse import urlsplit

from e2vd import __version__
from e2vd.protocol import BUSY_RETRY_AFTER_S, ApiError, Route, find_route, openapi, parse_options
from e2vd.scheduler import (BadAudio, InferenceFailed, ModelUnavailable, OutOfGpuMemory, QueueFull, Scheduler,
                            SchedulerError)
from e2vd.vocabulary import State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.audio import AudioError

log = logging.getLogger("e2vd")

SMALL_BODY_BYTES = 65536   # largest body accepted (and discarded) on routes that take none
MAX_CONNECTIONS = 256      # open connections (one thread each); more are answered 503 busy
REAP_INTERVAL_S = 0.2
# Requests that use the model: finishing one renews its connection's hold on the daemon (the idle
# rule, see Server.holding). Health, status and openapi do not, so a client polling them on a
# kept-open connection cannot keep the daemon (and its GPU) awake forever.
KEEPS_AWAKE_PATHS = frozenset({"/v1/recognize", "/v1/warmup"})
ABANDONED = 499            # status logged for a request not run because its client hung up (never sent)

# The errors of the layers below HTTP and the code each is answered with; the status is
# protocol.ERRORS[code], and every "busy" answer carries Retry-After. Audio errors (the scheduler's
# BadAudio and e2vd.audio.AudioError) keep their own code: bad_audio, too_long or too_short,
# e2vd.audio's codes, are the API's.
ERROR_CODES: dict[type[SchedulerError], str] = {
    QueueFull: "busy",
    OutOfGpuMemory: "busy",
    ModelUnavailable: "model_unavailable",
    InferenceFailed: "internal",
}


def api_error(exc: "SchedulerError | AudioError") -> ApiError:
    """The HTTP error answering `exc` (see ERROR_CODES)."""
    code = exc.code if isinstance(exc, BadAudio) or not isinstance(exc, SchedulerError) else ERROR_CODES[type(exc)]
    return ApiError(code, exc.message, retry_after=BUSY_RETRY_AFTER_S if code == "busy" else None)


class Control(Protocol):
    """What the HTTP layer needs from the daemon's lifecycle."""

    def status(self) -> dict[str, Any]:
        """The JSON of GET /v1/status."""

    def hold(self, seconds: float) -> tuple[float, float | None]:
        """Keep warm `seconds` from now (capped); returns (granted seconds, deadline as Unix time)."""


@dataclass(frozen=True)
class Peer:
    """The client process at the other end (SO_PEERCRED); -1 when unknown."""

    pid: int = -1
    uid: int = -1
    gid: int = -1


def peer_credentials(conn: socket.socket) -> Peer:
    """The credentials of the process that connected (Linux SO_PEERCRED)."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return Peer(*struct.unpack("3i", raw))
    except (OSError, AttributeError):
        return Peer()


@dataclass(eq=False)
class Connection:
    """Book-keeping for one open connection (shared between its thread and the reaper)."""

    sock: socket.socket
    peer: Peer
    deadline: float | None = None   # monotonic time by which the current request must be received
    in_request: bool = False
    timed_out: bool = False
    opened: float = field(default_factory=time.monotonic)
    last_active: float = -math.inf  # Server.clock time it opened or last finished a KEEPS_AWAKE_PATHS request


@dataclass(frozen=True)
class Holding:
    """What connections hold the daemon awake, seen at one moment (`Server.holding`)."""

    count: int            # open connections holding it now
    until: float | None   # when the last hold by any connection, open or closed, ends or ended (may lie
                          # in the past; math.inf while a request is in progress); None: never held


class Server:
    """Serves accepted connections; one thread per connection, inference through `scheduler`."""

    def __init__(self, scheduler: Scheduler, control: Control, *, max_body_bytes: int,
                 max_seconds: float, connection_timeout: float, max_connections_per_uid: int = 32,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None) -> None:
        """`clock`: the monotonic clock of `last_active` and `holding` (the daemon's);
        `on_change`: called (from connection threads) whenever a request ends or a connection
        closes, i.e. whenever the daemon may have become idle."""
        self.scheduler = scheduler
        self.control = control
        self.max_body_bytes = max_body_bytes
        self.max_seconds = max_seconds
        self.connection_timeout = connection_timeout
        self.max_connections_per_uid = max_connections_per_uid
        self.clock = clock
        self._on_change = on_change
        self._released = -math.inf    # latest end of a closed connection's hold
        self.draining = False
        self.requests_served = 0      # /v1/recognize answered with 200
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._next_id = 0
        self._reaper = threading.Thread(target=self._reap_loop, name="e2vd-reaper", daemon=True)
        self._reaper.start()

    # --- observers for the daemon ---
    @property
    def connections(self) -> int:
        """Open client connections."""
        with self._lock:
            return len(self._conns)

    @property
    def active(self) -> int:
        """Requests being received or answered right now (from their first byte to the answer)."""
        with self._lock:
            return sum(1 for c in self._conns if c.in_request)

    def holding(self, now: float) -> Holding:
        """How connections hold the daemon awake at `now` (the idle rule, docs/design.md). A
        connection holds it while a request is in progress on it, and for connection_timeout after
        it opened or last finished a request that uses the model (KEEPS_AWAKE_PATHS), or until it
        closed if that came first. Open connections beyond that do not keep the daemon from idling,
        and a request that does not use the model moves nothing once it has ended."""
        count, until = 0, self._released
        with self._lock:
            for conn in self._conns:
                end = math.inf if conn.in_request else conn.last_active + self.connection_timeout
                count += end > now
                until = max(until, end)
        return Holding(count, None if until == -math.inf else until)

    def model_name(self) -> str:
        engine = self.scheduler.engine
        return getattr(engine, "model_id", "") if engine is not None else ""

    # --- connections ---
    def add(self, sock: socket.socket) -> None:
        """Serve an accepted connection on a new thread; it counts as open from this call on.
        Beyond MAX_CONNECTIONS open connections, or max_connections_per_uid from the peer's uid
        (root included: a runaway root script must not starve everyone else), answer 503 busy
        at once and close."""
        conn = Connection(sock, peer_credentials(sock), last_active=self.clock())
        with self._lock:
            mine = sum(1 for c in self._conns if c.peer.uid == conn.peer.uid)
            if len(self._conns) >= MAX_CONNECTIONS:
                refusal = f"the daemon has {MAX_CONNECTIONS} connections open; close idle ones or retry later"
            elif mine >= self.max_connections_per_uid:
                refusal = (f"uid {conn.peer.uid} already has {mine} connections open, the most one uid may "
                           f"hold (max_connections_per_uid = {self.max_connections_per_uid}); close idle "
                           "ones or reuse a keep-alive connection, or raise max_connections_per_uid")
            else:
                refusal = None
                self._conns.add(conn)
        if refusal is not None:
            _refuse(sock, refusal)
            return
        threading.Thread(target=self._serve, args=(conn,), name="e2vd-conn", daemon=True).start()

    def request_ended(self, conn: Connection, path: str) -> None:
        """Called by the connection's handler after each request (path as sent, query included).
        A request to one of KEEPS_AWAKE_PATHS renews the connection's hold (`last_active`)."""
        if urlsplit(path).path in KEEPS_AWAKE_PATHS:
            conn.last_active = self.clock()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # an observer must not break a connection
                log.exception("connection observer failed")

    def _serve(self, conn: Connection) -> None:
        try:
            Handler(conn.sock, conn, self)
        except Exception:  # the handler answers its own errors; this is a last resort
            log.exception("connection handler failed")
        finally:
            try:
                conn.sock.close()
            finally:
                with self._lock:
                    self._conns.discard(conn)
                    self._released = max(self._released, min(conn.last_active + self.connection_timeout,
                                                              self.clock()))
                self._changed()

    def drain(self) -> None:
        """Stop taking new requests: answer the current ones, close every idle connection."""
        self.draining = True
        with self._lock:
            idle = [c for c in self._conns if not c.in_request]
        for conn in idle:
            _shutdown(conn.sock, socket.SHUT_RDWR)

    def _reap_loop(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns if c.deadline is not None and now > c.deadline]
            for conn in late:
                conn.timed_out = True
                conn.deadline = None
                _shutdown(conn.sock, socket.SHUT_RD)   # wakes the blocked read; we can still answer

    def request_id(self) -> str:
        with self._lock:
            self._next_id += 1
            return f"{self._next_id:06d}"


def _refuse(sock: socket.socket, message: str) -> None:
    """Answer 503 busy without reading the request (never blocks) and close the connection."""
    err = ApiError("busy", message, retry_after=BUSY_RETRY_AFTER_S)
    body = json.dumps(err.body()).encode()
    head = response_head(err.status, len(body), {"Retry-After": str(err.retry_after)}, close=True)
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:
        pass
    finally:
        sock.close()


def peer_hung_up(sock: socket.socket) -> bool:
    """True once the client has closed its end of `sock` for good; never blocks.

    On an AF_UNIX stream socket poll() reports POLLHUP only when the peer has shut down both
    directions (closed, or exited): a client that only shut down its sending side (POLLRDHUP) or
    has already sent its next request (POLLIN) still waits for the answer."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLHUP)
    except ValueError:   # closed on our side already
        return True
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class ClientGone(Exception):
    """The client hung up before its request ran; nobody is left to answer."""


def _shutdown(sock: socket.socket, how: int) -> None:
    """shutdown() an accepted connection (never the listening socket); ignore if already gone."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


# --- HTTP/1.1 framing (RFC 9112) ----------------------------------------------------------------

MAX_LINE_BYTES = 65536     # longest request line or header line (http.client's limit)
MAX_HEADERS = 100          # most header lines in one request (http.client's limit)
SERVER_HEADER = f"e2vd/{__version__}"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")          # RFC 9110 §5.6.2
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")          # RFC 9112 §2.3
# RFC 9112 §5: field-name ":" OWS field-value OWS; no control characters in the value but HTAB
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r?\n")
_SEND_HTTP_1_1 = "send an HTTP/1.1 request as curl --unix-socket SOCKET http://e2vd/v1/... does"


@dataclass(frozen=True)
class RequestLine:
    """A request line split into method, request target and HTTP version ("" when missing), as
    sent; `parse` splits it, `check` validates it."""

    method: str
    target: str
    version: str

    @classmethod
    def parse(cls, line: bytes) -> "RequestLine":
        """Split `METHOD TARGET HTTP/1.x` (RFC 9112 §3: any run of SP, HTAB, VT, FF or CR separates);
        ApiError bad_request unless it has two or three parts and the target splits as a URL."""
        words = [word.decode("latin-1") for word in line.split()]
        if len(words) not in (2, 3):
            shown = repr(line.rstrip(b"\r\n")[:200].decode("latin-1"))
            raise ApiError("bad_request", f"the request line {shown} is not 'METHOD /path HTTP/1.1'; {_SEND_HTTP_1_1}")
        method, target, version = (*words, "")[:3]
        if target.startswith("//"):   # as the stdlib does: never read as //host/path
            target = "/" + target.lstrip("/")
        try:
            urlsplit(target)
        except ValueError as exc:
            raise ApiError("bad_request", f"the request target {target[:200]!r} is not a URL ({exc}); "
                                          "send a path such as /v1/health") from None
        return cls(method, target, version)

    def check(self) -> tuple[int, int]:
        """The HTTP version as (1, minor); ApiError bad_request for a line without an HTTP version
        (HTTP/0.9), another version than 1.x or a method that is not a token."""
        if not self.version:
            raise ApiError("bad_request", f"the request line has no HTTP version (HTTP/0.9 is not spoken here); "
                                          f"send '{self.method[:40]} {self.target[:200]} HTTP/1.1'")
        match = _HTTP_VERSION.fullmatch(self.version)
        if match is None:
            raise ApiError("bad_request", f"{self.version[:40]!r} in the request line is not an HTTP version; "
                                          f"{_SEND_HTTP_1_1}")
        if match.group(1) != "1":
            raise ApiError("bad_request", f"this daemon speaks HTTP/1.1 (and 1.0), not {self.version}; "
                                          f"{_SEND_HTTP_1_1}")
        if not _TOKEN.fullmatch(self.method):
            raise ApiError("bad_request", f"the method {self.method[:40]!r} is not an HTTP method; {_SEND_HTTP_1_1}")
        return 1, int(match.group(2))


def parse_field_line(line: bytes) -> tuple[str, str]:
    """Split one header line into name and value (RFC 9112 §5). ApiError bad_request for a line
    that starts with whitespace (obs-fold), has no colon, whitespace before the colon, a name that
    is not a token, or control characters (HTAB aside) in its value. A lenient parser would drop
    such a line, or read it differently than a proxy in front of us does (request smuggling)."""
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise ApiError("bad_request", f"{_field_line_problem(line)}; send each header as 'Name: value' "
                                      "on one line (the connection is closed)")
    return match.group(1).decode("ascii"), match.group(2).decode("latin-1")


def _field_line_problem(line: bytes) -> str:
    """What is wrong with a header line `_FIELD_LINE` does not match."""
    shown = repr(line.rstrip(b"\r\n")[:100].decode("latin-1"))
    name, colon, _ = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        return f"the header line {shown} starts with whitespace (a folded continuation line, obs-fold)"
    if not colon:
        return f"the header line {shown} has no colon"
    if name != name.rstrip(b" \t"):
        return f"the header line {shown} has whitespace before the colon"
    if not _TOKEN.fullmatch(name.decode("latin-1")):
        return f"the header name in {shown} is not a token (letters, digits and !#$%&'*+-.^_`|~)"
    return f"the value of the header line {shown} has control characters"


def parse_header_lines(lines: list[bytes]) -> http.client.HTTPMessage:
    """The headers of `lines` (each checked by `parse_field_line`), as the stdlib's message type."""
    headers = http.client.HTTPMessage()
    for line in lines:
        name, value = parse_field_line(line)
        headers[name] = value
    return headers


def content_length(headers: http.client.HTTPMessage) -> int | None:
    """The body length the headers declare; None without Content-Length. ApiError bad_request for
    framing that a proxy could read differently (RFC 9112 §6.3): Transfer-Encoding together with
    Content-Length, Content-Length more than once (even with equal values), or not a decimal
    number; too_large for a number of more than 18 digits."""
    values = headers.get_all("Content-Length") or []
    if values and "Transfer-Encoding" in headers:
        raise ApiError("bad_request", "the request has both Transfer-Encoding and Content-Length; "
                                      "send the body with Content-Length only (the connection is closed)")
    if len(values) > 1:
        raise ApiError("bad_request", f"Content-Length is given {len(values)} times ({', '.join(values)[:100]}); "
                                      "send it once, with the exact size of the body (the connection is closed)")
    if not values:
        return None
    if not values[0].isascii() or not values[0].isdigit():
        raise ApiError("bad_request", f"Content-Length {values[0][:40]!r} is not a whole number of bytes; "
                                      "send the exact size of the body (the connection is closed)")
    digits = values[0].lstrip("0") or "0"
    if len(digits) > 18:
        raise ApiError("too_large", f"Content-Length is a {len(digits)}-digit number of bytes; send a shorter clip")
    return int(digits)


def keeps_alive(version: tuple[int, int], connection: str) -> bool:
    """Whether the connection stays open after the answer (RFC 9112 §9.3): HTTP/1.1 unless the
    Connection header says close, HTTP/1.0 only when it says keep-alive."""
    options = {option.strip().lower() for option in connection.split(",")}
    if "close" in options:
        return False
    return version >= (1, 1) or "keep-alive" in options


def response_head(status: int, length: int, headers: dict[str, str] | None = None, *,
                  close: bool = False) -> bytes:
    """The head of a JSON answer of `length` bytes: status line, Server, Date, Content-Type,
    Content-Length, `headers`, "Connection: close" when `close`, and the blank line."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Server: {SERVER_HEADER}",
             f"Date: {email.utils.formatdate(usegmt=True)}", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: reads HTTP/1.1 requests, dispatches them by `e2vd.protocol.ROUTES` and
    answers JSON, every error with its status from `e2vd.protocol.ERRORS`.

    The base class runs the keep-alive loop (`handle` calls `handle_one_request` until
    `close_connection`); the request line and headers are read and checked here, not by the
    stdlib's parser (which answers HTML, lets a request line without an HTTP version through and
    drops malformed header lines), and each answer leaves in one write (head and body together,
    so the client wakes once).
    Every request, whatever becomes of it, is logged as one `request` event.
    """

    protocol_version = "HTTP/1.1"
    server: Server  # type: ignore[assignment]

    def __init__(self, sock: socket.socket, conn: Connection, server: Server) -> None:
        self.conn = conn
        self.timeout = server.connection_timeout
        super().__init__(sock, ("unix", 0), server)  # type: ignore[arg-type]

    # --- connection loop ---
    def handle_one_request(self) -> None:
        """Wait (at most connection_timeout) for a request, then give it connection_timeout to arrive."""
        self.conn.in_request = False
        if self.server.draining:
            self.close_connection = True
            return
        self.connection.settimeout(self.server.connection_timeout)   # silence between requests
        try:
            first = self.rfile.peek(1)
        except (TimeoutError, OSError):
            first = b""
        if not first:
            self.close_connection = True
            return
        # From the first byte on, the reaper enforces the request deadline (it wakes the read and
        # we answer 408); the socket timeout is only a backstop behind it.
        self.connection.settimeout(self.server.connection_timeout + 5.0)
        self.conn.in_request = True
        self.conn.deadline = time.monotonic() + self.server.connection_timeout
        self._new_request()
        try:
            self._handle_request()
        finally:
            self.conn.deadline = None
            self.conn.in_request = False
            self.server.request_ended(self.conn, self.path)

    def _new_request(self) -> None:
        """Forget the connection's previous request."""
        self._request_start = time.monotonic()
        self._body_done = False
        self._fields: dict[str, Any] = {}
        self._status = 0
        self.command, self.path, self._version = "", "", (1, 1)
        self.headers = http.client.HTTPMessage()
        self._content_length: int | None = None
        self._chunked = False
        self.close_connection = True   # until the request's head has been read

    def _handle_request(self) -> None:
        """Read one request, answer it and log it."""
        rid = self.server.request_id()
        try:
            self._read_head()
            self._dispatch()
        except ApiError as err:
            self._send_error(err)
        except ClientGone:
            self.close_connection = True
            self._status = ABANDONED
            self._fields["abandoned"] = True
        except Exception as exc:
            log.exception("request %s failed", rid)
            self._send_error(ApiError("internal", f"unexpected {type(exc).__name__}: {exc}; "
                                                  "the daemon's journal has the traceback"))
        finally:
            self._log_request(rid)

    # --- the request's head ---
    def _read_head(self) -> None:
        """Read the request line and the headers; sets command, path, the HTTP version, headers, the
        body's framing and close_connection. Blank lines before the request line are skipped (RFC
        9112 §2.2). Raises ApiError; the connection is then closed, as its framing cannot be trusted."""
        line = self._read_line("request line")
        while line in (b"\r\n", b"\n"):
            line = self._read_line("request line")
        request = RequestLine.parse(line)
        self.command, self.path = request.method, request.target   # for the log, even if the rest is bad
        self._version = request.check()
        lines: list[bytes] = []
        while (line := self._read_line("header line")) not in (b"\r\n", b"\n"):
            if len(lines) == MAX_HEADERS:
                raise ApiError("too_large", f"the request has more than {MAX_HEADERS} header lines; send fewer")
            lines.append(line)
        self.headers = parse_header_lines(lines)
        self._content_length = content_length(self.headers)
        self._chunked = "Transfer-Encoding" in self.headers
        self.close_connection = not keeps_alive(self._version, self.headers.get("Connection", ""))

    def _read_line(self, what: str) -> bytes:
        """One line of the request's head, with its LF. ApiError too_large when it is longer than
        MAX_LINE_BYTES, timeout when the request deadline cut it off, bad_request when the client
        stopped sending in the middle of it."""
        try:
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
        except TimeoutError:   # the backstop behind the reaper
            self.conn.timed_out = True
            line = b""
        except OSError:
            line = b""
        if len(line) > MAX_LINE_BYTES:
            raise ApiError("too_large", f"a {what} of the request is longer than {MAX_LINE_BYTES} bytes; "
                                        "send a shorter one")
        if not line.endswith(b"\n"):
            if self.conn.timed_out:
                raise ApiError("timeout", f"the request did not arrive within {self.server.connection_timeout:g} s "
                                          f"(it stopped in a {what}); send it at once, or raise connection_timeout")
            raise ApiError("bad_request", f"the connection ended in the middle of a {what}; "
                                          "send the whole request")
        return line

    def _expect_100_continue(self, path: str) -> None:
        """Expect: 100-continue: refuse a body we will not accept before the client sends it
        (raises the error), else invite the body."""
        if self._version < (1, 1) or self.headers.get("Expect", "").lower() != "100-continue":
            return
        try:
            takes_body = find_route(self.command, path).body
        except ApiError:
            takes_body = False   # answered with 404/405 right after
        try:
            self._check_length(required=False, limit=self.server.max_body_bytes if takes_body else SMALL_BODY_BYTES)
        except ApiError:
            self.close_connection = True
            raise
        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self._expect_100_continue(url.path)
        route = find_route(self.command, url.path)
        options = parse_options(url.query, route.options)
        status, payload = getattr(self, "_route_" + route.handler)(route, options)
        self._send_json(status, payload)

    # --- routes ---
    def _route_health(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._read_small_body()
        scheduler = self.server.scheduler
        if scheduler.state == State.UNAVAILABLE:
            err = api_error(scheduler.unavailable())
            self._fields["code"] = err.code
            return err.status, {"status": State.UNAVAILABLE.value, **err.body()}
        return 200, {"status": scheduler.state.value}

    def _route_status(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._read_small_body()
        return 200, self.server.control.status()

    def _route_openapi(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._read_small_body()
        return 200, openapi(__version__)

    def _route_warmup(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._read_small_body()
        granted, deadline = self.server.control.hold(options["hold"])
        self._fields["hold_seconds"] = granted
        scheduler = self.server.scheduler
        self.conn.deadline = None
        scheduler.settled.wait()
        if scheduler.state == State.UNAVAILABLE:
            raise api_error(scheduler.unavailable())
        engine = scheduler.engine
        return 200, {"status": "ready", "hold_s": granted, "keep_warm_deadline": deadline,
                     "load_seconds": getattr(engine, "load_seconds", None)}

    def _route_recognize(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from e2vd.audio import AudioError, decode

        t0 = time.monotonic()
        body = self._read_body()
        t1 = time.monotonic()
        self._fields.update(body_bytes=len(body), read_ms=round((t1 - t0) * 1000.0, 2))
        if not body:
            raise ApiError("bad_audio", "the body is empty; send the audio file's bytes, "
                                        "e.g. curl --data-binary @clip.wav")
        try:
            audio = decode(body, max_seconds=self.server.max_seconds)
        except AudioError as err:
            raise api_error(err) from None
        t2 = time.monotonic()
        self._fields.update(audio_seconds=round(audio.duration_s, 3), decode_ms=round((t2 - t1) * 1000.0, 2))
        try:
            job = self.server.scheduler.submit(audio, options["granularity"], options["embedding"],
                                               client_gone=functools.partial(peer_hung_up, self.connection))
        except SchedulerError as err:
            raise api_error(err) from None
        job.wait()
        self._fields["wait_ms"] = round((time.monotonic() - t2) * 1000.0, 2)
        self._fields["queue_ms"] = round(job.queue_ms, 2)
        if job.abandoned:
            raise ClientGone()
        self._fields.update(infer_ms=round(job.infer_ms, 2), batch_size=job.batch_size)
        if job.error is not None:
            raise api_error(job.error)
        assert job.result is not None
        result = job.result.to_dict()
        result["model"] = self.server.model_name()
        result["timing_ms"] = {"queue": round(job.queue_ms, 3), "infer": round(job.infer_ms, 3)}
        top = result.get("top") or {}
        self._fields.update(top_label=top.get("label"), top_score=top.get("score"))
        with self.server._lock:
            self.server.requests_served += 1
        return 200, result

    # --- bodies ---
    def _check_length(self, required: bool, limit: int | None = None) -> int | None:
        """The body's length for this route (None if it has none and none is `required`); refuses
        chunked bodies (411), a missing Content-Length where `required` (411) and bodies over
        `limit` (413; default max_body_bytes when `required`, else SMALL_BODY_BYTES)."""
        if self._chunked:
            self.close_connection = True
            raise ApiError("length_required", "chunked uploads are not supported; send the body with "
                                              "Content-Length (curl --data-binary @FILE does)")
        length = self._content_length
        if length is None:
            if required:
                raise ApiError("length_required", "this request needs a body with Content-Length; "
                                                  "send the audio file's bytes, e.g. curl --data-binary @clip.wav")
            return None
        if limit is None:
            limit = self.server.max_body_bytes if required else SMALL_BODY_BYTES
        if length > limit:
            self.close_connection = True
            raise ApiError("too_large", f"the body is {length} bytes; this daemon accepts at most {limit} "
                                        "(max_body_bytes); send a shorter clip or raise max_body_bytes")
        return length

    def _read_body(self) -> bytes:
        """The body of a route that takes one (Content-Length required, up to max_body_bytes)."""
        length = self._check_length(required=True) or 0
        body = self._read_exactly(length)
        self._body_done = True
        self.conn.deadline = None
        return body

    def _read_small_body(self) -> None:
        """Routes without a body accept (and ignore) a small one, so the connection stays in sync."""
        length = self._check_length(required=False)
        if length:
            self._read_exactly(length)
        self._body_done = True
        self.conn.deadline = None

    def _read_exactly(self, length: int) -> bytes:
        """Read `length` bytes of body within the request deadline. ApiError timeout when the
        deadline passes first, bad_request when the client stops short; the connection is then closed."""
        chunks: list[bytes] = []
        got = 0
        while got < length:
            try:
                chunk = self.rfile.read1(min(length - got, 1 << 20))
            except TimeoutError:   # the backstop behind the reaper
                self.conn.timed_out = True
                chunk = b""
            except OSError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                if self.conn.timed_out:
                    raise ApiError("timeout", f"the body did not arrive within {self.server.connection_timeout:g} s "
                                              f"(got {got} of {length} bytes); send it at once, "
                                              "or raise connection_timeout")
                raise ApiError("bad_request", f"the body ended after {got} of {length} bytes (Content-Length); "
                                              "send exactly Content-Length bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _discard_body(self) -> None:
        """After an early error (bad option, wrong route, ...) read and drop an acceptable body, so
        the client gets to read our answer and the connection stays in sync; else close it."""
        length = self._content_length or 0
        if self._chunked or length > self.server.max_body_bytes:
            self.close_connection = True
            return
        try:
            self._read_exactly(length)
        except ApiError:
            self.close_connection = True
        self._body_done = True

    # --- answers ---
    def _send_error(self, err: ApiError) -> None:
        """Answer `err` with its status from protocol.ERRORS (and Retry-After, Allow)."""
        self._fields["code"] = err.code
        headers = dict(err.headers)
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        if not self._body_done and not self.close_connection:
            self._discard_body()
        if self.command == "HEAD":
            self.close_connection = True
        self._send_json(err.status, err.body(), headers)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Answer `payload` as JSON with `status`: head and body in one write."""
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            err = ApiError("internal", f"the result is not valid JSON ({exc}); the daemon's journal has the request")
            self._fields["code"] = err.code
            status, headers, body = err.status, {}, json.dumps(err.body()).encode()
        self._status = status
        if self.server.draining:
            self.close_connection = True
        head = response_head(status, len(body), headers, close=self.close_connection)
        self._write(head if self.command == "HEAD" else head + body)

    def _write(self, data: bytes) -> None:
        """Send `data` (one write); a client that hung up gets nothing and the connection closes."""
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    # --- logging ---
    def _log_request(self, rid: str) -> None:
        """The one `request` event of this request (README "Journal fields")."""
        from e2vd.log import event

        fields, status, peer = self._fields, self._status, self.conn.peer
        path = urlsplit(self.path).path
        total_ms = round((time.monotonic() - self._request_start) * 1000.0, 2)
        level = logging.DEBUG if path == "/v1/health" and status == 200 else (
            logging.WARNING if status >= 500 else logging.INFO)
        summary = f"{self.command or '-'} {path} -> {status}"
        if "top_label" in fields:
            summary += f" {fields['top_label']} ({fields.get('audio_seconds')} s audio)"
        if "code" in fields:
            summary += f" {fields['code']}"
        if fields.get("abandoned"):
            summary += " abandoned: the client hung up before its turn, so it was not run"
        event("request", summary, level, request_id=rid, client_uid=peer.uid, client_pid=peer.pid,
              method=self.command or "-", path=path, status=status, total_ms=total_ms, **fields)
