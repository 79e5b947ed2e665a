"""Reading one request's bytes off a connection, within the daemon's limits and the request's
deadline, and writing the answer (docs/design.md, section 3).

`Wire` is one connection's reading and writing end: it waits for the next request, reads the
request's head line by line and its body bytes, and sends each answer in one write. `Body` is
one request's body: the rules of Content-Length and the size limits, for the routes that read a
body, the routes that take none, and the answers that must drop one. The request deadline itself
is enforced by the server's reaper (it shuts the read side of a late connection, see
`e2vd.server`); the socket timeout set here is only the backstop behind it.
"""
from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from e2vd.http_wire import MAX_HEADERS, MAX_LINE_BYTES, RequestHead, RequestLine
from e2vd.protocol import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.server import Connection

SMALL_BODY_BYTES = 65536   # largest body accepted (and discarded) on routes that take none
BACKSTOP_S = 5.0           # the socket timeout during a request is connection_timeout plus this
_CHUNK_BYTES = 1 << 20     # most body bytes read in one call
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Wire:
    """The reading and writing end of one accepted connection; `conn` is its book-keeping, shared
    with the server's reaper (`deadline`, `timed_out`)."""

    def __init__(self, conn: "Connection", connection_timeout: float) -> None:
        self.conn = conn
        self.sock: socket.socket = conn.sock
        self.connection_timeout = connection_timeout
        self.rfile = self.sock.makefile("rb")

    def close(self) -> None:
        """Close the reading end (the server closes the socket itself)."""
        self.rfile.close()

    def wait_for_request(self) -> bool:
        """Wait up to connection_timeout for the first byte of a request; False when the client
        closed the connection or stayed silent. From True on, the request must arrive whole by
        `conn.deadline` (connection_timeout from now)."""
        self.sock.settimeout(self.connection_timeout)   # silence between requests
        try:
            first = self.rfile.peek(1)
        except (TimeoutError, OSError):
            first = b""
        if not first:
            return False
        self.sock.settimeout(self.connection_timeout + BACKSTOP_S)
        self.conn.deadline = time.monotonic() + self.connection_timeout
        return True

    def received(self) -> None:
        """The whole request has arrived: its deadline no longer applies."""
        self.conn.deadline = None

    def read_request_line(self) -> RequestLine:
        """Read and split the request line; blank lines before it are skipped (RFC 9112 §2.2)."""
        line = self.read_line("request line")
        while line in (b"\r\n", b"\n"):
            line = self.read_line("request line")
        return RequestLine.parse(line)

    def read_headers(self, request: RequestLine) -> RequestHead:
        """Check `request`'s version (before waiting for more: an HTTP/0.9 client sends no headers),
        then read the header lines up to the blank line."""
        version = request.check()
        lines: list[bytes] = []
        while (line := self.read_line("header line")) not in (b"\r\n", b"\n"):
            if len(lines) == MAX_HEADERS:
                raise ApiError("too_large", f"the request has more than {MAX_HEADERS} header lines; send fewer")
            lines.append(line)
        return RequestHead.build(request, version, lines)

    def read_line(self, what: str) -> bytes:
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
                raise ApiError("timeout", f"the request did not arrive within {self.connection_timeout:g} s "
                                          f"(it stopped in a {what}); send it at once, or raise connection_timeout")
            raise ApiError("bad_request", f"the connection ended in the middle of a {what}; "
                                          "send the whole request")
        return line

    def read_exactly(self, length: int) -> bytes:
        """`length` bytes of body within the request deadline. ApiError timeout when the deadline
        passes first, bad_request when the client stops short."""
        chunks: list[bytes] = []
        got = 0
        while got < length:
            try:
                chunk = self.rfile.read1(min(length - got, _CHUNK_BYTES))
            except TimeoutError:   # the backstop behind the reaper
                self.conn.timed_out = True
                chunk = b""
            except OSError:
                chunk = b""
            if not chunk:
                if self.conn.timed_out:
                    raise ApiError("timeout", f"the body did not arrive within {self.connection_timeout:g} s "
                                              f"(got {got} of {length} bytes); send it at once, "
                                              "or raise connection_timeout")
                raise ApiError("bad_request", f"the body ended after {got} of {length} bytes (Content-Length); "
                                              "send exactly Content-Length bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def write(self, data: bytes) -> bool:
        """Send `data` in one write; False when the client hung up (it gets nothing more)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True


class Body:
    """The body of one request, read as its head frames it.

    A route that takes a body `read`s it (Content-Length required, at most max_body_bytes); a
    route that takes none `skip`s a small one (at most SMALL_BODY_BYTES), so the connection stays
    in sync; an error answered before the body was read `discard`s it. `close` becomes true when
    the connection cannot carry another request: the body was refused unread, or it was cut off.
    """

    def __init__(self, wire: Wire, head: RequestHead, max_body_bytes: int) -> None:
        self.wire = wire
        self.head = head
        self.max_body_bytes = max_body_bytes
        self.done = False    # read, skipped or discarded
        self.close = False

    def invite(self, takes_body: bool) -> None:
        """Expect: 100-continue: refuse a body that will not be accepted before the client sends it
        (raises the error), else invite it. Nothing without that header."""
        if not self.head.expects_continue:
            return
        self.check_length(required=False, limit=self.max_body_bytes if takes_body else SMALL_BODY_BYTES)
        if not self.wire.write(_CONTINUE):
            self.close = True

    def check_length(self, required: bool, limit: int | None = None) -> int | None:
        """The body's length (None if it has none and none is `required`). Refuses chunked bodies
        (411), a missing Content-Length where `required` (411) and bodies over `limit` (413;
        default max_body_bytes when `required`, else SMALL_BODY_BYTES)."""
        if self.head.chunked:
            self.close = True
            raise ApiError("length_required", "chunked uploads are not supported; send the body with "
                                              "Content-Length (curl --data-binary @FILE does)")
        length = self.head.content_length
        if length is None:
            if required:
                raise ApiError("length_required", "this request needs a body with Content-Length; "
                                                  "send the audio file's bytes, e.g. curl --data-binary @clip.wav")
            return None
        if limit is None:
            limit = self.max_body_bytes if required else SMALL_BODY_BYTES
        if length > limit:
            self.close = True
            raise ApiError("too_large", f"the body is {length} bytes; this daemon accepts at most {limit} "
                                        "(max_body_bytes); send a shorter clip or raise max_body_bytes")
        return length

    def read(self) -> bytes:
        """The body of a route that takes one (Content-Length required, up to max_body_bytes)."""
        body = self._exactly(self.check_length(required=True) or 0)
        self.done = True
        self.wire.received()
        return body

    def skip(self) -> None:
        """The body of a route that takes none: a small one is read and ignored."""
        length = self.check_length(required=False)
        if length:
            self._exactly(length)
        self.done = True
        self.wire.received()

    def discard(self) -> None:
        """After an early error (bad option, wrong route, ...) read and drop an acceptable body, so
        the client gets to read the answer and the connection stays in sync; else close it."""
        length = self.head.content_length or 0
        if self.head.chunked or length > self.max_body_bytes:
            self.close = True
            return
        try:
            self._exactly(length)
        except ApiError:
            self.close = True
        self.done = True

    def _exactly(self, length: int) -> bytes:
        try:
            return self.wire.read_exactly(length)
        except ApiError:
            self.close = True
            raise
