"""The browser front's side of HTTP: one browser connection's requests, read strictly, checked,
routed and answered (docs/design.md, the browser front).

Request lines and headers are read by the daemon's own `e2vd.http_io.Wire` and parsed by
`e2vd.http_wire` (the same strict rules, the same 4xx errors), within the same kind of deadline:
a reaper thread shuts the read side of a connection whose request has not arrived whole within
`request_timeout` (time spent waiting for the daemon to take the upload does not count).

Routes: `GET /` the page (e2vd.web_page), `GET /web/status` the badge (e2vd.web_status), and
`/v1/*`, checked against the daemon's routes and options (e2vd.protocol) before anything is sent
on, then forwarded (e2vd.web_forward). Requests from other web sites are refused: the Host
header must name this front's loopback address (no DNS rebinding; any Host with --public), and
an Origin or Sec-Fetch-Site header must say same-origin, except for opening the page itself.
Every error is JSON in the daemon's shape; statuses of the daemon's codes come from
`protocol.ERRORS`, the front's own codes are 403 forbidden, 502 daemon_unreachable, 502 daemon_bad_answer
(the daemon's answer broke the front's bounds: too large, chunked, or dripped) and 504
daemon_timeout.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

from e2vd.http_io import SMALL_BODY_BYTES, Wire
from e2vd.http_wire import SERVER_HEADER, RequestHead, response_head
from e2vd.log import event
from e2vd.protocol import ApiError, check_method, error_body, find_route, parse_options
from e2vd.web_forward import CLIENT_GONE, GatewayError, Upstream, answer_cap, forward, request_head
from e2vd.web_page import Page
from e2vd.web_status import StatusSource

REAP_INTERVAL_S = 0.1
LINGER_S = 2.0            # how long a refused upload is read and dropped, so the client reads the answer
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PAGE_PATHS = ("/", "/index.html")
STATUS_PATH = "/web/status"


class FrontError(Exception):
    """An error the front answers itself: status, code, message (the daemon's error shape),
    extra headers, and whether the connection must close after it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.close = close

    @classmethod
    def of(cls, err: ApiError | GatewayError, close: bool = False) -> "FrontError":
        return cls(err.status, err.code, err.message, getattr(err, "headers", None), close)


@dataclass(eq=False)
class ClientConn:
    """One browser connection's book-keeping, shared by its thread, its `Wire` and the reaper:
    `deadline` (CLOCK_MONOTONIC seconds, None when no request is being read) and `timed_out`."""

    sock: socket.socket
    deadline: float | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class FrontConfig:
    """The front's limits. Seconds; `max_body_bytes` is the daemon's as configured on this
    machine; `allowed_hosts` the Host values accepted (None: any, for --public)."""

    request_timeout: float = 30.0
    max_body_bytes: int = 50_000_000
    max_connections: int = 64
    allowed_hosts: frozenset[str] | None = None


def loopback_hosts(port: int, bound: str) -> frozenset[str]:
    """The Host header values a loopback front answers to: its address and localhost's names."""
    return frozenset(h.lower() for h in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", bound))


class _Reaper:
    """Shuts the read side of connections past their deadline (as the daemon's server does)."""

    def __init__(self) -> None:
        self._conns: set[ClientConn] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="e2vd-web-reaper", daemon=True).start()

    def add(self, conn: ClientConn) -> None:
        with self._lock:
            self._conns.add(conn)

    def remove(self, conn: ClientConn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _loop(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns if c.deadline is not None and now > c.deadline]
            for conn in late:
                conn.timed_out, conn.deadline = True, None
                try:
                    conn.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


class BodyReader:
    """The client's body, `length` bytes, read in pieces within what is left of the request's
    time (`budget` seconds, spent only while waiting for the client)."""

    def __init__(self, wire: Wire, conn: ClientConn, length: int, budget: float) -> None:
        self.wire, self.conn, self.length, self.budget = wire, conn, length, budget
        self.got = 0

    def read(self, most: int) -> bytes:
        """Between 1 and `most` bytes; ApiError timeout when the request's time ran out first,
        bad_request when the client stopped short."""
        start = time.monotonic()
        self.conn.deadline = start + max(self.budget, 0.0)
        try:
            piece = self.wire.rfile.read1(most) if self.budget > 0 else b""
        except TimeoutError:
            self.conn.timed_out = True
            piece = b""
        except OSError:
            piece = b""
        finally:
            self.conn.deadline = None
            self.budget -= time.monotonic() - start
        if not piece:
            if self.conn.timed_out or self.budget <= 0:
                raise ApiError("timeout", f"the body did not arrive within {self.wire.connection_timeout:g} s "
                                          f"(got {self.got} of {self.length} bytes); send it at once")
            raise ApiError("bad_request", f"the body ended after {self.got} of {self.length} bytes "
                                          "(Content-Length); send exactly Content-Length bytes")
        self.got += len(piece)
        return piece

    def drop(self) -> None:
        """Read and drop the rest of the body (a small one, on a route that takes none)."""
        while self.got < self.length:
            self.read(min(65536, self.length - self.got))


@dataclass
class Exchange:
    """One request as far as it got, for its log line."""

    start: float = field(default_factory=time.monotonic)
    method: str = ""
    path: str = ""
    status: int = 0
    code: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    unread: int = 0          # body bytes the client sent (or will send) that were not read


class Front:
    """Serves browser connections, one thread each; `on_change` is called whenever one closes."""

    def __init__(self, config: FrontConfig, upstream: Upstream, status: StatusSource, page: Page,
                 on_change: Callable[[], None] = lambda: None) -> None:
        if upstream.max_answer_bytes is None and "max_seconds" in status.limits:
            # the daemon's answers are bounded by what its configured max_seconds allows
            upstream = replace(upstream, max_answer_bytes=answer_cap(float(status.limits["max_seconds"])))
        self.config, self.upstream, self.status, self.page = config, upstream, status, page
        self.on_change = on_change
        self._reaper = _Reaper()
        self._lock = threading.Lock()
        self._open = 0
        self._idle_since = time.monotonic()

    # ------------------------------------------------------------------ connections
    @property
    def connections(self) -> int:
        with self._lock:
            return self._open

    def idle_since(self) -> float | None:
        """CLOCK_MONOTONIC time since which no connection has been open; None while one is."""
        with self._lock:
            return None if self._open else self._idle_since

    def add(self, sock: socket.socket) -> None:
        """Serve an accepted connection on its own thread, or refuse it (503 busy) past max_connections."""
        with self._lock:
            refuse = self._open >= self.config.max_connections
            if not refuse:
                self._open += 1
        target = self._refuse if refuse else self._serve
        threading.Thread(target=target, args=(sock,), name="e2vd-web-conn", daemon=True).start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(LINGER_S)
            body = json.dumps(error_body("busy", f"the page's server has {self.config.max_connections} "
                                                 "connections open; retry in a moment")).encode()
            sock.sendall(response_head(503, len(body), {"Retry-After": "1"}, close=True) + body)
            linger(sock, 1 << 20)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock: socket.socket) -> None:
        conn = ClientConn(sock)
        wire = Wire(conn, self.config.request_timeout)   # type: ignore[arg-type]  (duck-typed Connection)
        try:
            self._reaper.add(conn)
            while wire.wait_for_request():
                if not self._one(wire, conn):
                    break
        except Exception:   # a bug must cost one connection, never the front
            logging.getLogger("e2vd").exception("browser connection failed")
        finally:
            self._reaper.remove(conn)
            wire.close()
            sock.close()
            with self._lock:
                self._open -= 1
                self._idle_since = time.monotonic()
            self.on_change()

    # ------------------------------------------------------------------ one request
    def _one(self, wire: Wire, conn: ClientConn) -> bool:
        """Read, check, answer one request; whether the connection may carry another."""
        ex = Exchange()
        try:
            head = wire.read_headers(wire.read_request_line())
        except ApiError as err:
            self._error(wire, ex, FrontError.of(err, close=True), unread=1 << 20)
            return False
        ex.method, target = head.method, urlsplit(head.target)
        ex.path, ex.unread = target.path, self._unread(head)
        try:
            self._check_site(head, target.path)
            check_method(head.method)                         # 501 for a method HTTP does not define
            if target.path.startswith("/v1/"):
                keep = self._forward(wire, conn, head, target.path, target.query, ex)
            elif target.path in PAGE_PATHS or target.path == STATUS_PATH:
                keep = self._local(wire, conn, head, target.path, ex)
            else:
                raise FrontError(404, "not_found", f"no page {target.path[:200]!r} here; the page is at /, "
                                                   "the daemon's API under /v1/ (GET /v1/openapi.json)")
        except ApiError as err:
            keep = self._error(wire, ex, FrontError.of(err), unread=ex.unread)
        except FrontError as err:
            keep = self._error(wire, ex, err, unread=ex.unread)
        self._log(ex)
        return keep and head.keep_alive

    def _unread(self, head: RequestHead) -> int:
        """The body bytes of a request answered before its body was read (0 when it has none)."""
        if head.chunked:
            return 1 << 20
        return head.content_length or 0

    def _check_site(self, head: RequestHead, path: str) -> None:
        """Refuse other web sites' requests (see the module docstring)."""
        for name in ("Host", "Origin", "Sec-Fetch-Site"):
            if len(head.headers.get_all(name) or []) > 1:   # which one counts is a parser's guess
                raise FrontError(400, "bad_request", f"the request has {name} more than once; send it once")
        host = head.headers.get("Host")
        authority = urlsplit(head.target).netloc
        if authority:   # absolute-form (http://HOST/path): its authority is the host, not Host (RFC 9112 §3.2.2)
            host = authority
        if host is None:
            if head.version >= (1, 1):
                raise FrontError(400, "bad_request", "an HTTP/1.1 request needs a Host header")
        elif self.config.allowed_hosts is not None and host.lower() not in self.config.allowed_hosts:
            raise FrontError(403, "forbidden", f"this page's server answers only for "
                                               f"{', '.join(sorted(self.config.allowed_hosts))}, not Host {host[:100]!r} "
                                               "(other names are refused so that no web site can reach it through "
                                               "DNS rebinding)")
        if path in PAGE_PATHS:
            return   # following a link to the page from anywhere is fine; the page itself cannot be framed
        origin = head.headers.get("Origin")
        if origin is not None and (host is None or origin.lower() != f"http://{host.lower()}"):
            raise FrontError(403, "forbidden", f"requests from another web site (Origin {origin[:100]!r}) are "
                                               "refused; use the page this server serves")
        site = head.headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise FrontError(403, "forbidden", f"requests from another web site (Sec-Fetch-Site {site[:40]!r}) are "
                                               "refused; use the page this server serves")

    def _local(self, wire: Wire, conn: ClientConn, head: RequestHead, path: str, ex: Exchange) -> bool:
        """The page and the badge: GET (or HEAD) only, and a body of at most SMALL_BODY_BYTES is dropped."""
        if head.method not in ("GET", "HEAD"):
            raise FrontError(405, "method_not_allowed", f"{path} accepts GET, not {head.method[:40]}",
                             {"Allow": "GET, HEAD"})
        self._drop_body(wire, conn, head, ex)
        if path == STATUS_PATH:
            body = json.dumps(self.status.badge().to_dict()).encode()
            data = response_head(200, len(body), {"Cache-Control": "no-store"}, close=not head.keep_alive)
        else:
            body = self.page.body
            data = plain_head(200, len(body), self.page.headers, close=not head.keep_alive)
        ex.status, ex.bytes_down = 200, len(body)
        return wire.write(data + (b"" if head.method == "HEAD" else body))

    def _drop_body(self, wire: Wire, conn: ClientConn, head: RequestHead, ex: Exchange) -> None:
        if head.chunked:
            raise FrontError(411, "length_required", "chunked bodies are not accepted here; send Content-Length",
                             close=True)
        length = head.content_length or 0
        if length > SMALL_BODY_BYTES:
            raise FrontError(413, "too_large", f"the body is {length} bytes; this request takes at most "
                                               f"{SMALL_BODY_BYTES}", close=True)
        if length:
            BodyReader(wire, conn, length, self._budget(conn)).drop()
        ex.unread = 0
        wire.received()

    def _forward(self, wire: Wire, conn: ClientConn, head: RequestHead, path: str, query: str, ex: Exchange) -> bool:
        """Check the request against the daemon's routes and options, then forward it."""
        route = find_route(head.method, path)                 # 404, 405: the daemon is not asked
        parse_options(query, route.options)                   # 400 bad_option: neither
        pairs = parse_qsl(query, keep_blank_values=True)
        if head.chunked:
            raise FrontError(411, "length_required", "chunked uploads are not forwarded; send the file with "
                                                     "Content-Length (browsers and curl --data-binary do)", close=True)
        length: int | None = None
        if route.body:
            length = head.content_length
            if length is None:
                raise ApiError("length_required", "this request needs a body with Content-Length; send the "
                                                  "audio file's bytes, e.g. curl --data-binary @clip.wav")
            if length > self.config.max_body_bytes:
                raise FrontError(413, "too_large", f"the body is {length} bytes; the daemon accepts at most "
                                                   f"{self.config.max_body_bytes} (max_body_bytes); send a shorter "
                                                   "clip or raise max_body_bytes", close=True)
            if head.expects_continue and not wire.write(_CONTINUE):
                return False
        else:
            self._drop_body(wire, conn, head, ex)
        reader = BodyReader(wire, conn, length or 0, self._budget(conn))
        conn.deadline = None   # from here on the reader keeps the time, only while it waits for the client
        content_type = head.headers.get("Content-Type") if route.body else None
        try:
            head_only = head.method == "HEAD"
            out = forward(self.upstream, request_head(route, pairs, length, content_type, head_only),
                          length or 0, reader.read, wire.write, close_after=not head.keep_alive, client=wire.sock,
                          head_only=head_only)
        except GatewayError as err:
            ex.bytes_up, ex.unread = reader.got, (length or 0) - reader.got
            raise FrontError.of(err, close=ex.unread > 0) from None
        except ApiError as err:   # the client's body stopped: the daemon's connection is closed
            ex.bytes_up, ex.unread = reader.got, 0
            raise FrontError.of(err, close=True) from None
        wire.received()
        ex.status, ex.code, ex.bytes_up, ex.bytes_down = out.status, out.code, out.bytes_up, out.bytes_down
        if out.status == CLIENT_GONE:
            return False
        ex.unread = (length or 0) - reader.got
        if out.close and ex.unread:
            linger(wire.sock, ex.unread)
        return not out.close

    def _budget(self, conn: ClientConn) -> float:
        """Seconds left of the current request's time."""
        return self.config.request_timeout if conn.deadline is None else conn.deadline - time.monotonic()

    def _error(self, wire: Wire, ex: Exchange, err: FrontError, unread: int) -> bool:
        """Answer `err`; whether the connection may carry another request."""
        close = err.close or unread > 0 or err.code in ("bad_request", "timeout")
        body = json.dumps(error_body(err.code, err.message), separators=(",", ":")).encode()
        ex.status, ex.code = err.status, err.code
        sent = wire.write(response_head(err.status, len(body), err.headers, close=close) + body)
        if close and unread and sent and err.code != "timeout":
            linger(wire.sock, unread)
        return sent and not close

    def _log(self, ex: Exchange) -> None:
        ms = round((time.monotonic() - ex.start) * 1000, 1)
        quiet = ex.path in PAGE_PATHS or ex.path == STATUS_PATH
        event("web_request", f"{ex.method} {ex.path[:200]} -> {ex.status}" + (f" {ex.code}" if ex.code else ""),
              logging.DEBUG if quiet and ex.status < 400 else logging.INFO, method=ex.method, path=ex.path[:200],
              status=ex.status, code=ex.code, body_bytes=ex.bytes_up, answer_bytes=ex.bytes_down, total_ms=ms)


def plain_head(status: int, length: int, headers: dict[str, str], close: bool = False) -> bytes:
    """The head of a non-JSON answer (the page): `headers` carry its Content-Type."""
    from email.utils import formatdate

    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Server: {SERVER_HEADER}",
             f"Date: {formatdate(usegmt=True)}", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def linger(sock: socket.socket, most: int, seconds: float = LINGER_S) -> None:
    """Close our sending side and read and drop up to `most` bytes of the client's input for at
    most `seconds`, so a client still uploading reads the answer instead of a reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + seconds
    got = 0
    while got < most:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return
        try:
            data = sock.recv(1 << 16)
        except OSError:
            return
        if not data:
            return
        got += len(data)
