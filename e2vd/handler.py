"""One connection's requests, each read, routed, answered and logged in turn (docs/design.md,
section 3: the request path).

`Handler(conn, server).serve()` runs on the connection's own thread (started by `Server.add`).
For each request: wait for its first byte; read the request line and headers (`e2vd.http_io`,
parsed strictly by `e2vd.http_wire`); find its route (`protocol.find_route`) and parse its
options; run the route's function (`e2vd.routes.ROUTE_FUNCTIONS`), which reads the body; send the
answer, head and body in one write (the client wakes once); log one `request` event. Every
error is answered as JSON with its status from `protocol.ERRORS`. The connection closes when the
client asks, when the framing can no longer be trusted, or when the server drains.
"""
from __future__ import annotations

import functools
import json
import logging
import select
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from e2vd.http_io import Body, Wire
from e2vd.http_wire import response_head
from e2vd.protocol import ApiError, find_route, parse_options
from e2vd.routes import ROUTE_FUNCTIONS, ClientGone, Request

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.server import Connection, Server

log = logging.getLogger("e2vd")

ABANDONED = 499   # status logged for a request not run because its client hung up (never sent)


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


def _takes_body(method: str, path: str) -> bool:
    """Whether the route of `method` and `path` takes a body (False when there is no such route:
    it is answered 404/405 right after)."""
    try:
        return find_route(method, path).body
    except ApiError:
        return False


@dataclass
class Exchange:
    """One request and its answer, as far as they got: what its `request` event logs."""

    rid: str
    start: float = field(default_factory=time.monotonic)
    method: str = ""
    target: str = ""
    body: Body | None = None      # once the head has been read
    close: bool = True            # whether the connection closes after the answer
    status: int = 0
    fields: dict[str, Any] = field(default_factory=dict)

    def closes(self) -> bool:
        """Whether the connection must close after this answer."""
        return self.close or (self.body is not None and self.body.close)


def request_summary(method: str, path: str, status: int, fields: dict[str, Any]) -> tuple[int, str]:
    """The level and the first words of a `request` event, the daemon's (Handler) and a Ray Serve
    replica's (e2vd.ray_serve): a healthy GET /v1/health is DEBUG, a 5xx WARNING, the rest INFO;
    "METHOD PATH -> STATUS", then the top label and audio length, then the error code, if any."""
    level = logging.DEBUG if path == "/v1/health" and status == 200 else (
        logging.WARNING if status >= 500 else logging.INFO)
    summary = f"{method} {path} -> {status}"
    if "top_label" in fields:
        summary += f" {fields['top_label']} ({fields.get('audio_seconds')} s audio)"
    if "code" in fields:
        summary += f" {fields['code']}"
    return level, summary


class Handler:
    """Serves the requests of one connection in order, until it closes (module docstring)."""

    def __init__(self, conn: "Connection", server: "Server") -> None:
        self.conn = conn
        self.server = server
        self.wire = Wire(conn, server.connection_timeout)
        self.client_gone = functools.partial(peer_hung_up, conn.sock)

    def serve(self) -> None:
        """Answer requests until the connection closes (the caller closes the socket)."""
        try:
            while self._serve_one():
                pass
        finally:
            self.wire.close()

    def _serve_one(self) -> bool:
        """Wait for one request (at most connection_timeout), answer it; whether to go on."""
        self.conn.in_request = False
        if self.server.draining or not self.wire.wait_for_request():
            return False
        self.conn.in_request = True
        ex = Exchange(self.server.request_id())
        try:
            self._handle(ex)
        finally:
            self.conn.deadline = None
            self.server.request_ended(self.conn, ex.target)   # still in the request: no idle gap
            self.conn.in_request = False
        return not ex.closes()

    def _handle(self, ex: Exchange) -> None:
        """Read one request, answer it, log it; every failure becomes an answer."""
        try:
            self._answer(ex)
        except ApiError as err:
            self._send_error(ex, err)
        except ClientGone:
            ex.close, ex.status = True, ABANDONED
            ex.fields["abandoned"] = True
        except Exception as exc:
            log.exception("request %s failed", ex.rid)
            self._send_error(ex, ApiError("internal", f"unexpected {type(exc).__name__}: {exc}; "
                                                      "the daemon's journal has the traceback"))
        finally:
            self._log_request(ex)

    def _answer(self, ex: Exchange) -> None:
        """The request path: head, route, options, the route's function, the answer. Raises
        ApiError; an error in the head closes the connection, as its framing cannot be trusted."""
        request = self.wire.read_request_line()
        ex.method, ex.target = request.method, request.target   # for the log, even if the rest is bad
        head = self.wire.read_headers(request)
        ex.close = not head.keep_alive
        ex.body = body = Body(self.wire, head, self.server.max_body_bytes)
        url = urlsplit(head.target)
        body.invite(_takes_body(head.method, url.path))     # Expect: 100-continue
        route = find_route(head.method, url.path)
        options = parse_options(url.query, route.options)
        status, payload = ROUTE_FUNCTIONS[route](
            Request(self.server.app, options, body, ex.fields, self.client_gone, url.query))
        self._send_json(ex, status, payload)

    def _send_error(self, ex: Exchange, err: ApiError) -> None:
        """Answer `err` with its status from protocol.ERRORS (and Retry-After, Allow); an unread
        body is read and dropped first when the connection stays open."""
        ex.fields["code"] = err.code
        headers = dict(err.headers)
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        if ex.body is not None and not ex.body.done and not ex.closes():
            ex.body.discard()
        if ex.method == "HEAD":
            ex.close = True
        self._send_json(ex, err.status, err.body(), headers)

    def _send_json(self, ex: Exchange, status: int, payload: dict[str, Any],
                   headers: dict[str, str] | None = None) -> None:
        """Answer `payload` as JSON with `status`: head and body in one write."""
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            err = ApiError("internal", f"the result is not valid JSON ({exc}); the daemon's journal has the request")
            ex.fields["code"] = err.code
            status, headers, body = err.status, {}, json.dumps(err.body()).encode()
        ex.status = status
        if self.server.draining:
            ex.close = True
        head = response_head(status, len(body), headers, close=ex.closes())
        if not self.wire.write(head if ex.method == "HEAD" else head + body):
            ex.close = True

    def _log_request(self, ex: Exchange) -> None:
        """The one `request` event of this request (README "Journal fields")."""
        from e2vd.log import event

        fields, status, peer = ex.fields, ex.status, self.conn.peer
        path = urlsplit(ex.target).path
        total_ms = round((time.monotonic() - ex.start) * 1000.0, 2)
        level, summary = request_summary(ex.method or "-", path, status, fields)
        if fields.get("abandoned"):
            summary += " abandoned: the client hung up before its turn, so it was not run"
        event("request", summary, level, request_id=ex.rid, client_uid=peer.uid, client_pid=peer.pid,
              method=ex.method or "-", path=path, status=status, total_ms=total_ms, **fields)
