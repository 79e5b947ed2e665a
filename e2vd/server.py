"""Accepted connections: who holds them, how many, for how long (docs/design.md, section 3).

`Server.add(sock)` takes a connection accepted by the daemon and serves it on its own thread with
`e2vd.handler.Handler`, which reads, routes and answers its requests (HTTP/1.1, keep-alive).
`Server` does the book-keeping around that: the open connections and their peers, the caps on
them (MAX_CONNECTIONS in all, max_connections_per_uid per uid: beyond them a connection is
answered 503 busy at once), the reaper that enforces each request's deadline, whether the
connections hold the daemon awake (`holding`), the requests served, and `drain()` on shutdown.
This module has no lifecycle code: the daemon asks it `connections`, `active`, `holding` and
`requests_served`, and tells it `drain()`; keep-warm and status details come from a
`Control` the daemon implements (e2vd.routes.Control).

Limits, so that no client can hold a thread, the worker or the GPU forever:
- a connection silent for `connection_timeout` seconds (between requests too) is closed;
- once the first byte of a request arrives, the whole request (headers and body) must arrive
  within `connection_timeout` seconds, else 408 `timeout` (the reaper shuts the read side);
- a request line or header line longer than 64 KiB, or more than 100 header lines, get 413
  `too_large`; a request line without an HTTP version (HTTP/0.9) or with HTTP/2+ gets 400;
- a malformed header line (whitespace before the colon, a folded continuation line, a name that is
  not a token, control characters in the value), Content-Length given twice or not a number, or
  Transfer-Encoding with Content-Length get 400 `bad_request` and the connection is closed: a
  proxy in front of the socket could frame such a request differently (request smuggling);
- bodies come with Content-Length or `Transfer-Encoding: chunked` (counted against max_body_bytes
  as the chunks arrive; neither: 411 `length_required`); a Content-Length above
  `max_body_bytes` gets 413 `too_large` before any of the body is read (also on Expect: 100-continue);
- a recognition whose client hangs up while it waits in the queue is not run: the request event
  says status 499 (nginx's "client closed request"; never sent) and `abandoned`, and it does not
  count in `requests_served`.
The daemon never reads a path sent by a client: audio travels in the body only.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from e2vd.handler import Handler, peer_hung_up
from e2vd.http_wire import response_head
from e2vd.protocol import BUSY_RETRY_AFTER_S, ApiError
from e2vd.routes import App, Control
from e2vd.scheduler import Scheduler

log = logging.getLogger("e2vd")

MAX_CONNECTIONS = 256      # open connections (one thread each); more are answered 503 busy
REAP_INTERVAL_S = 0.2
LINGER_S = 2.0             # a refused connection is read and dropped this long before it is closed
MAX_LINGERING = 64         # refused connections lingering at once; beyond, they are closed at once
LINGER_READ_BYTES = 1 << 20   # most bytes read from one lingering connection per reaper tick
# Requests that use the model: finishing one renews its connection's hold on the daemon (the idle
# rule, see Server.holding). Health, status and openapi do not, so a client polling them on a
# kept-open connection cannot keep the daemon (and its GPU) awake forever.
KEEPS_AWAKE_PATHS = frozenset({"/v1/recognize", "/v1/warmup"})


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


def open_count(conns: set[Connection], uid: int | None = None) -> int:
    """How many of `conns` (of peer `uid`, or all) their clients still hold open. One its client
    has closed is not counted, though its thread may still be finishing (the answer leaves before
    the book-keeping, and the end is read after): a client that reads an answer, closes and
    connects again at once is not refused as over a cap. What such a thread still does ends
    soon: a request whose client has gone is not run."""
    return sum(1 for c in conns if (uid is None or c.peer.uid == uid) and not peer_hung_up(c.sock))


@dataclass(frozen=True)
class Holding:
    """What connections hold the daemon awake, seen at one moment (`Server.holding`)."""

    count: int            # open connections holding it now
    until: float | None   # when the last hold by any connection, open or closed, ends or ended (may lie
                          # in the past; math.inf while a request is in progress); None: never held


class Server:
    """Serves accepted connections, one thread each with `e2vd.handler.Handler`, and keeps their books."""

    def __init__(self, scheduler: Scheduler, control: Control, *, max_body_bytes: int,
                 max_seconds: float, connection_timeout: float, max_connections_per_uid: int = 32,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None) -> None:
        """`clock`: the monotonic clock of `last_active` and `holding` (the daemon's);
        `on_change`: called (from connection threads) whenever a request ends or a connection
        closes, i.e. whenever the daemon may have become idle."""
        self.scheduler = scheduler
        self.control = control
        self.app = App(scheduler, control, max_seconds, self.count_served)   # what the routes serve from
        self.max_body_bytes = max_body_bytes
        self.connection_timeout = connection_timeout
        self.max_connections_per_uid = max_connections_per_uid
        self.clock = clock
        self._on_change = on_change
        self._released = -math.inf    # latest end of a closed connection's hold
        self.draining = False
        self._served = 0              # /v1/recognize answered with 200
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._next_id = 0
        self._refused = Refusals()
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

    @property
    def requests_served(self) -> int:
        """POST /v1/recognize answered with 200 since start."""
        with self._lock:
            return self._served

    def count_served(self) -> None:
        """Count one more POST /v1/recognize answered with 200 (called by its route)."""
        with self._lock:
            self._served += 1

    # --- connections ---
    def add(self, sock: socket.socket) -> None:
        """Serve an accepted connection on a new thread; it counts as open from this call on.
        Beyond MAX_CONNECTIONS open connections, or max_connections_per_uid from the peer's uid
        (root included: a runaway root script must not starve everyone else), answer 503 busy
        at once and close."""
        conn = Connection(sock, peer_credentials(sock), last_active=self.clock())
        with self._lock:
            total, mine = len(self._conns), sum(1 for c in self._conns if c.peer.uid == conn.peer.uid)
            if total >= MAX_CONNECTIONS or mine >= self.max_connections_per_uid:   # at a cap: count again
                total, mine = open_count(self._conns), open_count(self._conns, conn.peer.uid)
            if total >= MAX_CONNECTIONS:
                refusal = f"the daemon has {MAX_CONNECTIONS} connections open; close idle ones or retry later"
            elif mine >= self.max_connections_per_uid:
                refusal = (f"uid {conn.peer.uid} already has {mine} connections open, the most one uid may "
                           f"hold (max_connections_per_uid = {self.max_connections_per_uid}); close idle "
                           "ones or reuse a keep-alive connection, or raise max_connections_per_uid")
            else:
                refusal = None
                self._conns.add(conn)
        if refusal is not None:
            self._refused.refuse(sock, refusal, time.monotonic())
            return
        threading.Thread(target=self._serve, args=(conn,), name="e2vd-conn", daemon=True).start()

    def request_ended(self, conn: Connection, path: str) -> None:
        """Called by the connection's handler when a request has been answered (path as sent,
        query included): a request to one of KEEPS_AWAKE_PATHS renews the connection's hold
        (`last_active`), then the connection is no longer in a request."""
        if urlsplit(path).path in KEEPS_AWAKE_PATHS:
            conn.last_active = self.clock()
        conn.in_request = False
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # an observer must not break a connection
                log.exception("connection observer failed")

    def _serve(self, conn: Connection) -> None:
        try:
            Handler(conn, self).serve()
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
            self._refused.reap(now)
            with self._lock:
                late = [c for c in self._conns if c.deadline is not None and now > c.deadline]
            for conn in late:
                conn.timed_out = True
                conn.deadline = None
                _shutdown(conn.sock, socket.SHUT_RD)   # wakes the blocked read; we can still answer

    def request_id(self) -> str:
        """A new request's id for the log: 000001, 000002, ..."""
        with self._lock:
            self._next_id += 1
            return f"{self._next_id:06d}"


class Refusals:
    """Connections answered 503 busy at once (over a cap), closed gracefully.

    The answer is sent without reading the request, then the write side is shut and the
    connection lingers for LINGER_S while whatever the client sends is read and dropped
    (RFC 9112 section 9.6). Closing at once would make a client that writes its request before it
    reads (curl, http.client) fail with EPIPE, "Broken pipe", instead of showing the 503's message.
    At most MAX_LINGERING linger at once, so refusals cannot pile up file descriptors.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lingering: list[tuple[socket.socket, float]] = []

    def refuse(self, sock: socket.socket, message: str, now: float) -> None:
        """Answer 503 busy with `message` (never blocks), then let the connection linger."""
        err = ApiError("busy", message, retry_after=BUSY_RETRY_AFTER_S)
        body = json.dumps(err.body()).encode()
        head = response_head(err.status, len(body), {"Retry-After": str(err.retry_after)}, close=True)
        try:
            sock.setblocking(False)
            sock.send(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self._lock:
            if len(self._lingering) < MAX_LINGERING:
                self._lingering.append((sock, now + LINGER_S))
                return
        sock.close()

    def reap(self, now: float) -> None:
        """Read and drop what lingering connections sent; close those at EOF or past LINGER_S."""
        with self._lock:
            lingering, self._lingering = self._lingering, []
        keep = [(sock, until) for sock, until in lingering if not _drained_or_late(sock, until, now)]
        with self._lock:
            self._lingering.extend(keep)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lingering)


def _drained_or_late(sock: socket.socket, until: float, now: float) -> bool:
    """Read and drop up to LINGER_READ_BYTES of what `sock` has, without blocking; close it and
    return True at EOF, on an error, or once `now` is past `until`."""
    if now < until:
        try:
            for _ in range(LINGER_READ_BYTES >> 16):
                if not sock.recv(1 << 16):
                    break
            else:
                return False          # still sending: read more at the next tick
        except BlockingIOError:
            return False
        except OSError:
            pass
    sock.close()
    return True


def _shutdown(sock: socket.socket, how: int) -> None:
    """shutdown() an accepted connection (never the listening socket); ignore if already gone."""
    try:
        sock.shutdown(how)
    except OSError:
        pass
