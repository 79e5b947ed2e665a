"""Reading a request body sent with Transfer-Encoding: chunked (RFC 9112 §7.1), within the
daemon's limits (docs/design.md, section 3).

`ChunkedReader(wire, limit)` yields the body's data as it arrives, in pieces of at most
`e2vd.http_io.PIECE_BYTES`, and ends after the last chunk and the trailer section. Every byte is
hostile, so:
- the data may total at most `limit` bytes (max_body_bytes): a chunk whose size would cross it is
  refused with 413 too_large the moment its size line arrives, before any of its data is read;
- a size is hex digits only, at most 16 significant ones (`http_wire.parse_chunk_size`), and no
  size is ever used to allocate anything: data is read in pieces as it comes;
- chunk extensions are read and ignored, but a size line is at most MAX_CHUNK_LINE_BYTES long and
  lines end in CRLF, never a bare LF (a smuggling vector between parsers);
- framing may not swamp the data (as Go's net/http rules it): each chunk's size line, its CRLF
  and trailer lines are allowed 16 bytes plus twice the chunk's data; what goes beyond that may
  total FRAMING_ALLOWANCE_BYTES, so long extensions on tiny chunks are refused;
- chunks may not be tiny on average: at most FREE_CHUNKS plus one per MIN_AVERAGE_CHUNK_BYTES of
  data so far (parsing costs ~2 µs a chunk: a 50 MB body of 1-byte chunks would hold a core for
  the whole connection_timeout; now at most ~2 s);
- trailer lines are checked as header lines and dropped, at most MAX_HEADERS of them;
- the whole body must arrive within the request's deadline (connection_timeout from the request's
  first byte, enforced by the server's reaper): a slow trickle gets 408 timeout.
Every error but too_large is 400 bad_request; all of them close the connection.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from e2vd.http_wire import MAX_HEADERS, MAX_LINE_BYTES, parse_chunk_size, parse_field_line
from e2vd.protocol import ApiError

MAX_CHUNK_LINE_BYTES = 4096        # longest chunk size line, extensions included
FRAMING_ALLOWANCE_BYTES = 16384    # framing beyond 16 bytes + twice the data per chunk, in all
FREE_CHUNKS = 32768                # chunks of any size allowed; beyond them, one per
MIN_AVERAGE_CHUNK_BYTES = 64       # ... this many data bytes so far
_PIECE_BYTES = 1 << 20             # e2vd.http_io.PIECE_BYTES (not imported: http_io imports this module)
_FIX = "send each chunk as its size in hex, CRLF, the bytes, CRLF, and end with 0 CRLF CRLF (the connection is closed)"


class ChunkWire(Protocol):
    """What reading a chunked body needs of the connection (e2vd.http_io.Wire)."""

    def read_raw_line(self, limit: int) -> bytes:
        """Up to `limit` + 1 bytes up to and with the next LF (shorter, without LF, at the end)."""

    def read_some(self, most: int) -> bytes:
        """1 to `most` bytes as soon as any arrive; b"" at the end or the deadline."""

    def stopped(self, got: str, ended: str) -> ApiError:
        """The error (timeout or bad_request) for a body that stopped arriving after `got`."""


class ChunkedReader:
    """The data of one chunked body, as an iterator of pieces (module docstring)."""

    def __init__(self, wire: ChunkWire, limit: int) -> None:
        self.wire = wire
        self.limit = limit          # most data bytes (max_body_bytes)
        self.got = 0                # data bytes so far
        self.excess = 0             # framing bytes beyond each chunk's allowance, so far
        self.chunks = 0             # data chunks so far

    def __iter__(self) -> Iterator[bytes]:
        while (size := self._size()) > 0:
            yield from self._data(size)
        self._trailers()

    def _size(self) -> int:
        """Read the next size line; the chunk's size (0: the last chunk)."""
        line = self._line("chunk size line", MAX_CHUNK_LINE_BYTES, "it has no last chunk; end a chunked body "
                                                                    "with 0 CRLF CRLF (the connection is closed)")
        size = parse_chunk_size(line)
        self._framing(len(line) + 2, size)            # + the CRLF after the chunk's data
        if size:
            self.chunks += 1
            if self.chunks > FREE_CHUNKS + self.got // MIN_AVERAGE_CHUNK_BYTES:
                raise ApiError("bad_request", f"the chunked body has {self.chunks} chunks for {self.got} bytes of data: "
                                              f"more than {FREE_CHUNKS} chunks must average at least "
                                              f"{MIN_AVERAGE_CHUNK_BYTES} bytes; send larger chunks (e.g. 64 KiB); {_FIX}")
        if self.got + size > self.limit:
            raise ApiError("too_large", f"the chunked body is over max_body_bytes: after {self.got} bytes, a chunk "
                                        f"of {size} more; this daemon accepts at most {self.limit}; send a "
                                        "shorter clip or raise max_body_bytes")
        return size

    def _data(self, size: int) -> Iterator[bytes]:
        """The `size` bytes of one chunk, then its CRLF."""
        left = size
        while left:
            piece = self.wire.read_some(min(left, _PIECE_BYTES))
            if not piece:
                raise self.wire.stopped(f"{self.got} bytes of a chunked body, {left} short of a chunk's {size}",
                                        f"send every chunk whole; {_FIX}")
            left -= len(piece)
            self.got += len(piece)
            yield piece
        end = self.wire.read_some(2)
        if end == b"\r":
            end += self.wire.read_some(1)
        if end != b"\r\n":
            if not end:
                raise self.wire.stopped(f"{self.got} bytes of a chunked body, before the CRLF after a chunk",
                                        f"send every chunk whole; {_FIX}")
            raise ApiError("bad_request", f"a chunk of {size} bytes is followed by {end!r}, not CRLF: its size "
                                          f"line says fewer bytes than were sent; {_FIX}")

    def _trailers(self) -> None:
        """Read and drop the trailer section, up to its blank line (CRLF)."""
        for _ in range(MAX_HEADERS + 1):
            line = self._line("trailer line", MAX_LINE_BYTES, "end a chunked body with 0 CRLF, then CRLF "
                                                              "(the connection is closed)")
            if line == b"\r\n":
                return
            if not line.strip():
                raise ApiError("bad_request", f"the chunked body ends with {line!r}, not CRLF; {_FIX}")
            self._framing(len(line), 0)
            parse_field_line(line)
        raise ApiError("too_large", f"the chunked body has more than {MAX_HEADERS} trailer lines; send fewer")

    def _line(self, what: str, limit: int, ended: str) -> bytes:
        """One framing line, with its LF; the errors say what was wrong in a chunked body."""
        line = self.wire.read_raw_line(limit)
        if len(line) > limit:
            raise ApiError("bad_request", f"a {what} of the chunked body is longer than {limit} bytes (chunk "
                                          f"extensions are ignored, but not unbounded); {_FIX}")
        if not line.endswith(b"\n"):
            raise self.wire.stopped(f"{self.got} bytes of a chunked body, in a {what}" if line else
                                    f"{self.got} bytes of a chunked body", ended)
        return line

    def _framing(self, overhead: int, data: int) -> None:
        """Count `overhead` framing bytes against the allowance of `data` data bytes."""
        self.excess = max(0, self.excess + overhead - 16 - 2 * data)
        if self.excess > FRAMING_ALLOWANCE_BYTES:
            raise ApiError("bad_request", f"the chunked body has more than {FRAMING_ALLOWANCE_BYTES} bytes of "
                                          "framing (chunk extensions, trailers) beyond what its data allows; "
                                          f"send larger chunks without extensions; {_FIX}")
