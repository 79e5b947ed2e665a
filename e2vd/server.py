"""HTTP/1.1 request handling on accepted Unix-socket connections.

`Server.add(conn)` takes a connection accepted by the daemon and serves it on its own thread with
`Handler` (stdlib `http.server.BaseHTTPRequestHandler`, protocol HTTP/1.1, keep-alive). Routes,
options and errors come from `e2vd.protocol`; recognitions go through `e2vd.scheduler`.
This module has no lifecycle code: the daemon asks it `connections`, `active` and tells it
`drain()`; keep-warm and status details come from a `Control` the daemon implements.

Limits, so that no client can hold a thread, the worker or the GPU forever:
- a connection silent for `connection_timeout` seconds (between requests too) is closed;
- once the first byte of a request arrives, the whole request (headers and body) must arrive
  within `connection_timeout` seconds, else 408 `timeout` (a reaper thread shuts the read side);
- bodies need Content-Length (chunked uploads get 411 `length_required`); a Content-Length above
  `max_body_bytes` gets 413 `too_large` before any of the body is read (also on Expect: 100-continue);
- a recognition whose client hangs up while it waits in the queue is not run: the request event
  says status 499 (nginx's "client closed request"; never sent) and `abandoned`, and it does not
  count in `requests_served`.
The daemon never reads a path sent by a client: audio travels in the body only.
"""
from __future__ import annotations

import functools
import http.server
import json
import logging
import math
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from e2vd import __version__
from e2vd.protocol import BUSY_RETRY_AFTER_S, ApiError, Route, error_body, find_route, openapi, parse_options
from e2vd.scheduler import UNAVAILABLE, Scheduler

log = logging.getLogger("e2vd")

SMALL_BODY_BYTES = 65536   # largest body accepted (and discarded) on routes that take none
MAX_CONNECTIONS = 256      # open connections (one thread each); more are answered 503 busy
REAP_INTERVAL_S = 0.2
# Requests that use the model: finishing one renews its connection's hold on the daemon (the idle
# rule, see Server.holding). Health, status and openapi do not, so a client polling them on a
# kept-open connection cannot keep the daemon (and its GPU) awake forever.
KEEPS_AWAKE_PATHS = frozenset({"/v1/recognize", "/v1/warmup"})
ABANDONED = 499            # status logged for a request not run because its client hung up (never sent)


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
    """The connections holding the daemon awake at one moment (`Server.holding`)."""

    count: int
    until: float | None   # when the last of these holds lapses if nothing happens (math.inf while a
                          # request is in progress); None when count is 0


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
        """The connections that hold the daemon awake at `now` (the idle rule, docs/design.md).
        A connection inside a request holds it for as long as the request lasts; otherwise it holds
        it for connection_timeout after it opened or last finished a request that uses the model
        (KEEPS_AWAKE_PATHS). Open connections beyond that do not keep the daemon from going idle."""
        count, until = 0, -math.inf
        with self._lock:
            for conn in self._conns:
                end = math.inf if conn.in_request else conn.last_active + self.connection_timeout
                if end > now:
                    count, until = count + 1, max(until, end)
        return Holding(count, until if count else None)

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
    body = json.dumps(error_body("busy", message)).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {BUSY_RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    try:
        sock.setblocking(False)
        sock.send(head.encode() + body)
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


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: parses HTTP/1.1 requests and dispatches them by `e2vd.protocol.ROUTES`."""

    protocol_version = "HTTP/1.1"
    server_version = f"e2vd/{__version__}"
    sys_version = ""
    server: Server  # type: ignore[assignment]

    def version_string(self) -> str:
        return self.server_version

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
        self._request_start = time.monotonic()
        self._body_done = False
        self._fields: dict[str, Any] = {}
        self._status = 0
        try:
            super().handle_one_request()
        finally:
            self.conn.deadline = None
            self.conn.in_request = False
            self.server.request_ended(self.conn, getattr(self, "path", ""))

    def handle_expect_100(self) -> bool:
        """Refuse a body we will not accept before the client sends it."""
        try:
            try:
                takes_body = find_route(self.command, urlsplit(self.path).path).body
            except ApiError:
                takes_body = False   # answered with 404/405 once the request is dispatched
            self._check_length(required=False, limit=self.server.max_body_bytes if takes_body else SMALL_BODY_BYTES)
        except ApiError as err:
            self.close_connection = True
            self._send_error(err)
            self._log_request("-", urlsplit(self.path).path)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        rid = self.server.request_id()
        url = urlsplit(self.path)
        try:
            try:
                if self.conn.timed_out:   # the headers were cut off by the request deadline
                    self.close_connection = True
                    raise ApiError("timeout", f"the request headers did not arrive within "
                                              f"{self.server.connection_timeout:g} s; send the request at once, "
                                              "or raise connection_timeout")
                route = find_route(self.command, url.path)
                options = parse_options(url.query, route.options)
                status, payload = getattr(self, "_route_" + route.handler)(route, options)
                self._send_json(status, payload)
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
            self._log_request(rid, url.path)

    # --- routes ---
    def _route_health(self, route: Route, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._read_small_body()
        scheduler = self.server.scheduler
        if scheduler.state == UNAVAILABLE:
            return 503, {"status": "unavailable",
                         **error_body("model_unavailable", f"the model could not be loaded: {scheduler.error}")}
        return 200, {"status": scheduler.state}

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
        if scheduler.state == UNAVAILABLE:
            raise ApiError("model_unavailable", f"the model could not be loaded: {scheduler.error}")
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
            raise ApiError(err.code, err.message) from None
        t2 = time.monotonic()
        self._fields.update(audio_seconds=round(audio.duration_s, 3), decode_ms=round((t2 - t1) * 1000.0, 2))
        job = self.server.scheduler.submit(audio, options["granularity"], options["embedding"],
                                           client_gone=functools.partial(peer_hung_up, self.connection))
        job.wait()
        self._fields["wait_ms"] = round((time.monotonic() - t2) * 1000.0, 2)
        self._fields["queue_ms"] = round(job.queue_ms, 2)
        if job.abandoned:
            raise ClientGone()
        self._fields.update(infer_ms=round(job.infer_ms, 2), batch_size=job.batch_size)
        if job.error is not None:
            raise job.error
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
        """Validate the framing headers; returns Content-Length (None if absent and allowed).
        `limit`: the largest body accepted (default max_body_bytes when `required`, else SMALL_BODY_BYTES)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise ApiError("length_required", "chunked uploads are not supported; send the body with "
                                              "Content-Length (curl --data-binary @FILE does)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if required:
                raise ApiError("length_required", "this request needs a body with Content-Length; "
                                                  "send the audio file's bytes, e.g. curl --data-binary @clip.wav")
            return None
        if len(set(v.strip() for v in values)) != 1 or not values[0].strip().isdigit():
            self.close_connection = True
            raise ApiError("bad_request", f"Content-Length {', '.join(values)!r} is not one whole number of bytes; "
                                          "send the exact size of the body")
        length = int(values[0])
        if limit is None:
            limit = self.server.max_body_bytes if required else SMALL_BODY_BYTES
        if length > limit:
            self.close_connection = True
            raise ApiError("too_large", f"the body is {length} bytes; this daemon accepts at most {limit} "
                                        "(max_body_bytes); send a shorter clip or raise max_body_bytes")
        return length

    def _read_body(self) -> bytes:
        """Read exactly Content-Length bytes within the request deadline."""
        length = self._check_length(required=True) or 0
        chunks: list[bytes] = []
        got = 0
        while got < length:
            try:
                chunk = self.rfile.read1(min(length - got, 1 << 20))
            except TimeoutError:   # silent for connection_timeout
                self.conn.timed_out = True
                chunk = b""
            except OSError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                if self.conn.timed_out:
                    raise ApiError("timeout", f"the body did not arrive within {self.server.connection_timeout:g} s "
                                              f"(got {got} of {length} bytes); send it at once, or raise connection_timeout")
                raise ApiError("bad_request", f"the body ended after {got} of {length} bytes (Content-Length); "
                                              "send exactly Content-Length bytes")
            chunks.append(chunk)
            got += len(chunk)
        self._body_done = True
        self.conn.deadline = None
        return b"".join(chunks)

    def _read_small_body(self) -> None:
        """Routes without a body accept (and ignore) a small one, so the connection stays in sync."""
        length = self._check_length(required=False)
        if length:
            self._read_body_of(length)
        self._body_done = True
        self.conn.deadline = None

    def _read_body_of(self, length: int) -> None:
        got = 0
        while got < length:
            chunk = self.rfile.read1(length - got)
            if not chunk:
                self.close_connection = True
                raise ApiError("bad_request", f"the body ended after {got} of {length} bytes")
            got += len(chunk)

    def _discard_body(self) -> None:
        """After an early error (bad option, wrong route, ...) read and drop an acceptable body, so
        the client gets to read our answer and the connection stays in sync; else close it."""
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None or len(values) > 1 or (
                values and (not values[0].strip().isdigit() or int(values[0]) > self.server.max_body_bytes)):
            self.close_connection = True
            return
        try:
            if values:
                self._read_body_of(int(values[0]))
        except (ApiError, OSError):
            self.close_connection = True
        self._body_done = True

    # --- answers ---
    def _send_error(self, err: ApiError) -> None:
        self._fields["code"] = err.code
        headers = dict(err.headers)
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        if not getattr(self, "_body_done", True) and not self.close_connection:
            self._discard_body()
        if self.command == "HEAD":
            self.close_connection = True
        self._send_json(err.status, err.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the stdlib parser (bad request line, headers too long, ...), as JSON."""
        self.close_connection = True
        if self.conn.timed_out:
            err = ApiError("timeout", f"the request did not arrive within {self.server.connection_timeout:g} s; "
                                      "send it at once, or raise connection_timeout")
        else:
            name = {404: "not_found", 405: "method_not_allowed", 408: "timeout", 411: "length_required",
                    413: "too_large", 414: "too_large", 431: "too_large", 501: "method_not_allowed"}.get(code, "bad_request")
            err = ApiError(name, f"{message or 'malformed request'} (HTTP {code}); send an HTTP/1.1 request "
                                 "as curl --unix-socket SOCKET http://e2vd/v1/... does")
        self._fields = getattr(self, "_fields", {})
        self._fields["code"] = err.code
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"   # unparsable request line: still answer with headers
        try:
            self._send_json(err.status if err.code == "timeout" else code, err.body())
        finally:
            self._log_request("-", getattr(self, "path", "") or "")

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._status = status
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            status = 500
            self._status = status
            body = json.dumps(error_body("internal", f"the result is not valid JSON ({exc})")).encode()
        if self.server.draining:
            self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            # Head and body leave in one write: the client then wakes once, not twice.
            self._headers_buffer.append(b"\r\n")
            if self.command != "HEAD":
                self._headers_buffer.append(body)
            self.flush_headers()
        except OSError:  # the client hung up; nothing to answer to
            self.close_connection = True

    # --- logging ---
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one structured event per request is written by _log_request

    def _log_request(self, rid: str, path: str) -> None:
        from e2vd.log import event

        fields = getattr(self, "_fields", {})
        start = getattr(self, "_request_start", time.monotonic())
        status = getattr(self, "_status", 0)
        peer = self.conn.peer
        total_ms = round((time.monotonic() - start) * 1000.0, 2)
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
