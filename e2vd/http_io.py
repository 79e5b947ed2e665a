"""Reading one request's bytes off a connection, within the daemon's limits and the request's
deadline, and writing the answer (docs/design.md, section 3).

`Wire` is one connection's reading and writing end: it waits for the next request, reads the
request's head line by line and its body bytes, and sends each answer in one write. `Body` is
one request's body, framed by Content-Length or Transfer-Encoding: chunked (decoded by
`e2vd.http_chunked`), piece by piece as it arrives: the size limits, for the routes that read a
body, the routes that take none, and the answers that must drop one. What the body holds (raw
audio or a multipart form) is `e2vd.upload`'s business. The request deadline itself is enforced
by the server's reaper (it shuts the read side of a late connection, see `e2vd.server`): head
and body, every chunk of a chunked one included, must arrive within connection_timeout of the
request's first byte. The socket timeout set here is only the backstop behind the reaper.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from e2vd.http_chunked import ChunkedReader
from e2vd.http_wire import MAX_HEADER_SECTION_BYTES, MAX_HEADERS, MAX_LINE_BYTES, RequestHead, RequestLine
from e2vd.protocol import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.server import Connection

SMALL_BODY_BYTES = 65536   # largest body accepted (and discarded) on routes that take none
BACKSTOP_S = 5.0           # the socket timeout during a request is connection_timeout plus this
PIECE_BYTES = 1 << 20      # most body bytes read in one call (and handed on as one piece)
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
        then read the header lines up to the blank line: at most MAX_HEADERS of them, of at most
        MAX_HEADER_SECTION_BYTES together (else 431 header_too_large: 256 connections must not hold
        100 lines of 64 KiB each)."""
        version = request.check()
        lines: list[bytes] = []
        total = 0
        while (line := self.read_line("header line")) not in (b"\r\n", b"\n"):
            if len(lines) == MAX_HEADERS:
                raise ApiError("header_too_large", f"the request has more than {MAX_HEADERS} header lines; send "
                                                   "fewer (the connection is closed)")
            total += len(line)
            if total > MAX_HEADER_SECTION_BYTES:
                raise ApiError("header_too_large", f"the request's header lines come to more than "
                                                   f"{MAX_HEADER_SECTION_BYTES} bytes; send fewer or shorter ones "
                                                   "(the connection is closed)")
            lines.append(line)
        return RequestHead.build(request, version, lines)

    def read_line(self, what: str) -> bytes:
        """One line of the request's head, with its LF. ApiError uri_too_long (414) for a request
        line longer than MAX_LINE_BYTES, header_too_large (431) for a header line, timeout when the
        request deadline cut it off, bad_request when the client stopped sending in the middle of it."""
        line = self.read_raw_line(MAX_LINE_BYTES)
        if len(line) > MAX_LINE_BYTES:
            if what == "request line":
                raise ApiError("uri_too_long", f"the request line is longer than {MAX_LINE_BYTES} bytes; send a "
                                               "shorter path and query, e.g. /v1/health (the connection is closed)")
            raise ApiError("header_too_large", f"a {what} of the request is longer than {MAX_LINE_BYTES} bytes; "
                                               "send a shorter one (the connection is closed)")
        if not line.endswith(b"\n"):
            if self.conn.timed_out:
                raise ApiError("timeout", f"the request did not arrive within {self.connection_timeout:g} s "
                                          f"(it stopped in a {what}); send it at once, or raise connection_timeout")
            raise ApiError("bad_request", f"the connection ended in the middle of a {what}; "
                                          "send the whole request")
        return line

    def read_raw_line(self, limit: int) -> bytes:
        """Up to `limit` + 1 bytes, up to and with the next LF: a line without its LF when the
        connection ended or the request deadline passed first (`conn.timed_out` says which), one
        longer than `limit` when it is too long (nothing more of it is read)."""
        try:
            return self.rfile.readline(limit + 1)
        except TimeoutError:   # the backstop behind the reaper
            self.conn.timed_out = True
        except OSError:
            pass
        return b""

    def read_some(self, most: int) -> bytes:
        """Between 1 and `most` body bytes, as soon as any have arrived; b"" when the connection
        ended or the request deadline passed first (`conn.timed_out` says which)."""
        try:
            return self.rfile.read1(most)
        except TimeoutError:   # the backstop behind the reaper
            self.conn.timed_out = True
        except OSError:
            pass
        return b""

    def stopped(self, got: str, ended: str) -> ApiError:
        """The error for a body that stopped arriving after `got` (e.g. "4 of 10 bytes"): timeout
        when the request deadline cut it off, else bad_request, saying `ended` (what to send)."""
        if self.conn.timed_out:
            return ApiError("timeout", f"the body did not arrive within {self.connection_timeout:g} s (got {got}); "
                                       "send it at once, or raise connection_timeout")
        return ApiError("bad_request", f"the body ended after {got}; {ended}")

    def write(self, data: bytes) -> bool:
        """Send `data` in one write; False when the client hung up (it gets nothing more)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True


def declared_length(length: int | None, chunked: bool, required: bool, limit: int, server: str = "daemon") -> int | None:
    """The declared body length (Content-Length) a request may send, checked before any of the
    body is read: None for a chunked body (counted as it arrives) or for none where none is
    `required`; ApiError 411 length_required for a missing required body, 413 too_large for a
    Content-Length over `limit` bytes. `server` names what refuses ("daemon", or e2vd.ray_serve's
    "service"). The daemon's http_io.Body and the Ray replica's body share these rules."""
    if chunked:
        return None
    if length is None:
        if required:
            raise ApiError("length_required", "this request needs a body, sent with Content-Length or "
                                              "Transfer-Encoding: chunked; send the audio file's bytes, "
                                              "e.g. curl --data-binary @clip.wav")
        return None
    if length > limit:
        raise ApiError("too_large", f"the body is {length} bytes; this {server} accepts at most {limit} "
                                    "(max_body_bytes); send a shorter clip or raise max_body_bytes")
    return length


class Body:
    """The body of one request, read as its head frames it (Content-Length or chunked), piece by
    piece as it arrives.

    A route that takes a body reads its `pieces` (or all of it with `read`): at most
    max_body_bytes; a route that takes none `skip`s a small one (at most SMALL_BODY_BYTES), so the
    connection stays in sync; an error answered before the body was read whole `discard`s the rest.
    `received` counts the body bytes read so far (chunk data only, for a chunked body). `close`
    becomes true when the connection cannot carry another request: the body was refused unread,
    or its framing broke, or it was cut off.
    """

    def __init__(self, wire: Wire, head: RequestHead, max_body_bytes: int) -> None:
        self.wire = wire
        self.head = head
        self.max_body_bytes = max_body_bytes
        self.received = 0
        self.done = False    # read, skipped or discarded to its end
        self.close = False
        self._reader: Iterator[bytes] | None = None

    @property
    def content_type(self) -> str:
        """The Content-Type header as sent ("" without one)."""
        return self.head.headers.get("Content-Type", "")

    @property
    def chunked(self) -> bool:
        """Whether the body is sent with Transfer-Encoding: chunked."""
        return self.head.chunked

    def invite(self, takes_body: bool) -> None:
        """Expect: 100-continue: refuse a body that will not be accepted before the client sends it
        (raises the error), else invite it. Nothing without that header."""
        if not self.head.expects_continue:
            return
        self.check_length(required=False, limit=self.max_body_bytes if takes_body else SMALL_BODY_BYTES)
        if not self.wire.write(_CONTINUE):
            self.close = True

    def check_length(self, required: bool, limit: int | None = None) -> int | None:
        """The body's declared length: None for a chunked body (its size is counted as it arrives)
        or when it has none and none is `required`. Refuses a missing body where `required` (411)
        and a Content-Length over `limit` (413; default max_body_bytes when `required`, else
        SMALL_BODY_BYTES), before any of it is read."""
        if limit is None:
            limit = self.max_body_bytes if required else SMALL_BODY_BYTES
        try:
            return declared_length(self.head.content_length, self.head.chunked, required, limit)
        except ApiError as err:
            if err.code == "too_large":
                self.close = True
            raise

    def pieces(self) -> Iterator[bytes]:
        """The body of a route that takes one (at most max_body_bytes), in pieces of at most
        PIECE_BYTES as they arrive; the request's deadline ends with the last one. Raises at once
        what `check_length(required=True)` raises, then, while iterating, timeout, bad_request
        (cut short, broken chunk framing) or too_large (a chunked body the moment it would cross
        max_body_bytes)."""
        self.check_length(required=True)
        self._reader = self._frames(self.max_body_bytes)
        return self._reader

    def read(self) -> bytes:
        """The whole body of a route that takes one (see `pieces`)."""
        return b"".join(self.pieces())

    def skip(self) -> None:
        """The body of a route that takes none: a small one is read and ignored."""
        self.check_length(required=False)
        for _ in self._frames(SMALL_BODY_BYTES):
            pass

    def discard(self) -> None:
        """After an early error (bad option, wrong route, a bad form, ...) read and drop the rest of
        an acceptable body, so the client gets to read the answer and the connection stays in
        sync; close it instead when the body is too large or its framing fails."""
        if self.done or self.close:
            return
        if self._reader is None:
            if (self.head.content_length or 0) > self.max_body_bytes:
                self.close = True
                return
            self._reader = self._frames(self.max_body_bytes)
        try:
            for _ in self._reader:
                pass
        except ApiError:
            self.close = True

    def _frames(self, limit: int) -> Iterator[bytes]:
        """The body's bytes as its head frames them, at most `limit` (a Content-Length was checked
        against it already); marks the connection for closing when they fail."""
        source = ChunkedReader(self.wire, limit) if self.head.chunked else self._sized(self.head.content_length or 0)
        try:
            for piece in source:
                self.received += len(piece)
                yield piece
        except ApiError:
            self.close = True
            raise
        self.done = True
        self.wire.received()

    def _sized(self, length: int) -> Iterator[bytes]:
        """Exactly `length` bytes (Content-Length)."""
        got = 0
        while got < length:
            piece = self.wire.read_some(min(length - got, PIECE_BYTES))
            if not piece:
                raise self.wire.stopped(f"{got} of {length} bytes", "send exactly Content-Length bytes "
                                        "(the connection is closed)")
            got += len(piece)
            yield piece
