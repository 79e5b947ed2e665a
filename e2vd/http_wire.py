"""The HTTP/1.1 wire format of requests and answers (RFC 9112): pure functions, no I/O.

The connection handler reads the bytes (e2vd.http_io) and hands them here: `RequestLine.parse`
and `.check` for the request line, `parse_field_line`/`parse_header_lines` for the header lines,
`RequestHead.build` for what they mean together (body framing, keep-alive, Expect),
`parse_chunk_size` for the size lines of a chunked body (read by e2vd.http_chunked), and
`response_head` for the head of every answer. Parsing is strict, because every byte from a client
is hostile (docs/design.md, section 5): anything a proxy in front of the socket could read
differently (request smuggling) is refused with ApiError bad_request, never guessed at.
"""
from __future__ import annotations

import email.utils
import http.client
import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from e2vd import __version__
from e2vd.protocol import ApiError

MAX_LINE_BYTES = 65536     # longest request line or header line (http.client's limit)
MAX_HEADERS = 100          # most header lines in one request (http.client's limit)
MAX_HEADER_SECTION_BYTES = 65536   # most bytes of all header lines together (the request line aside)
MAX_CHUNK_SIZE_DIGITS = 16  # most hex digits of a chunk size, leading zeros aside (2^64 - 1)
SERVER_HEADER = f"e2vd/{__version__}"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")          # RFC 9110 §5.6.2
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")          # RFC 9112 §2.3
# RFC 9112 §5: field-name ":" OWS field-value OWS; no control characters in the value but HTAB.
# Split by hand, not by one regex: "name:[ \t]*(value*?)[ \t]*\r?\n" backtracks quadratically on
# a value with a long run of blanks inside it (64 KiB of them held the GIL for about a minute).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF; the extensions are ignored, but hold no control
# characters (HTAB aside): a bare CR or LF in them is read as a line end by some parsers
# RFC 9110 §7.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal or a reg-name (or IPv4)
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)([ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")
_SEND_CHUNKED = "send each chunk as its size in hex, CRLF, the bytes, CRLF, and end with 0 CRLF CRLF (the connection is closed)"
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
        (HTTP/0.9), another version than 1.x, a method that is not a token or a request target
        that is not one a server answers (`_check_target_form`). (Checked here, not in `parse`, so
        that the refused request's method and target are logged.)"""
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
        _check_target_form(self.method, self.target)
        return 1, int(match.group(2))


def _check_target_form(method: str, target: str) -> None:
    """ApiError bad_request unless `target` is one of the request-target forms a server answers
    (RFC 9112 §3.2): origin-form (/path?query), absolute-form (http://host/path, whose host is
    not looked at), or asterisk-form (*) with OPTIONS. Refused: a #fragment (never sent by a
    conforming client: a proxy could drop it, or route on what follows it), characters other than
    printable ASCII (a client percent-encodes them), CONNECT (authority-form: this is no proxy)
    and anything else that is not a path."""
    shown = repr(target[:200])
    if not (target.isascii() and target.isprintable()):
        raise ApiError("bad_request", f"the request target {shown} has characters that are not printable ASCII; "
                                      "percent-encode them (%XX), as curl does, e.g. /v1/health")
    if "#" in target:
        raise ApiError("bad_request", f"the request target {shown} has a #fragment, which a client never sends; "
                                      "send the path and query alone, e.g. /v1/health (the connection is closed)")
    if method == "CONNECT":
        raise ApiError("bad_request", f"CONNECT {shown} asks for a tunnel; this daemon is not a proxy: "
                                      "send a request such as GET /v1/health")
    if target == "*":
        if method != "OPTIONS":
            raise ApiError("bad_request", f"the request target '*' is only for OPTIONS, not {method[:40]}; "
                                          "send a path such as /v1/health")
        return
    scheme, sep, _ = target.partition("://")
    if not target.startswith("/") and not (sep and scheme.lower() in ("http", "https")):
        raise ApiError("bad_request", f"the request target {shown} is not a path (/...) nor an http:// URL; "
                                      "send a path such as /v1/health")


def parse_field_line(line: bytes) -> tuple[str, str]:
    """Split one header line into name and value (RFC 9112 §5). ApiError bad_request for a line
    that starts with whitespace (obs-fold), has no colon, whitespace before the colon, a name that
    is not a token, or control characters (HTAB aside) in its value. A lenient parser would drop
    such a line, or read it differently than a proxy in front of us does (request smuggling)."""
    text = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else b"\n"
    name, colon, value = text.partition(b":")
    value = value.strip(b" \t")
    if not colon or not _FIELD_NAME.fullmatch(name) or _FIELD_CONTROL.search(value):
        raise ApiError("bad_request", f"{_field_line_problem(line)}; send each header as 'Name: value' "
                                      "on one line (the connection is closed)")
    return name.decode("ascii"), value.decode("latin-1")


def _field_line_problem(line: bytes) -> str:
    """What is wrong with a header line that `parse_field_line` refuses."""
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
        raise ApiError("bad_request", "the request has both Transfer-Encoding and Content-Length; send the "
                                      "body with one of them, not both (the connection is closed)")
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


def check_host(headers: http.client.HTTPMessage, version: tuple[int, int]) -> None:
    """ApiError bad_request unless the request has exactly one Host header whose value is a host
    with an optional :port (RFC 9112 §3.2: a server MUST refuse more than one, an invalid one, and
    none in an HTTP/1.1 request; HTTP/1.0 may leave it out). Its value is not looked at otherwise
    (a Unix socket has one host), but two of them are read differently by different parsers."""
    values = headers.get_all("Host") or []
    if len(values) > 1:
        raise ApiError("bad_request", f"Host is given {len(values)} times ({', '.join(values)[:100]!r}); send it "
                                      "once, e.g. 'Host: e2vd' (the connection is closed)")
    if not values:
        if version >= (1, 1):
            raise ApiError("bad_request", "the HTTP/1.1 request has no Host header (RFC 9112 §3.2); send one, "
                                          "e.g. 'Host: e2vd', as curl --unix-socket SOCKET http://e2vd/... does")
        return
    if not _HOST.fullmatch(values[0]):
        raise ApiError("bad_request", f"the Host header {values[0][:100]!r} is not a host name with an optional "
                                      ":port; send e.g. 'Host: e2vd' (the connection is closed)")


def expectations(headers: http.client.HTTPMessage) -> list[str]:
    """The members of the Expect header(s), lower-cased (empty ones dropped). ApiError
    expectation_failed (417, RFC 9110 §10.1.1) for any member but 100-continue: the only
    expectation this daemon meets; refused before any body is read."""
    values = headers.get_all("Expect") or []
    members = [member.strip().lower() for value in values for member in value.split(",")]
    members = [member for member in members if member]
    if any(member != "100-continue" for member in members):
        raise ApiError("expectation_failed", f"Expect {', '.join(values)[:100]!r} asks for what this daemon does "
                                             "not do: it meets only 100-continue; send the request without that "
                                             "Expect header, or with 'Expect: 100-continue' alone")
    return members


def is_chunked(headers: http.client.HTTPMessage, version: tuple[int, int]) -> bool:
    """Whether the body is sent with Transfer-Encoding: chunked (RFC 9112 §6.1, §7.1). ApiError
    bad_request when chunked is not the last coding, or comes twice (the length is unknown: RFC
    9112 §6.3), and for Transfer-Encoding in an HTTP/1.0 request, whose framing a proxy could read
    differently; not_implemented (501) for another coding before chunked ("gzip, chunked"), which
    this daemon does not decode."""
    values = headers.get_all("Transfer-Encoding") or []
    if not values:
        return False
    shown = ", ".join(values)[:100]
    if version < (1, 1):
        raise ApiError("bad_request", f"Transfer-Encoding ({shown!r}) in an HTTP/1.0 request; send HTTP/1.1 "
                                      "for a chunked body, or the body with Content-Length (the connection is closed)")
    codings = [coding.strip().lower() for value in values for coding in value.split(",")]
    if codings[-1:] != ["chunked"] or codings.count("chunked") > 1:   # RFC 9112 §6.3: the length is unknown
        raise ApiError("bad_request", f"Transfer-Encoding {shown!r} does not end with one chunked coding, so the body's "
                                      "length is unknown; send the body with Content-Length or with "
                                      "'Transfer-Encoding: chunked' alone (the connection is closed)")
    if codings != ["chunked"]:   # RFC 9112 §6.1: a transfer coding the daemon does not decode
        raise ApiError("not_implemented", f"Transfer-Encoding {shown!r}: this daemon decodes no transfer coding but "
                                          "chunked; send the body plain, with Content-Length or with "
                                          "'Transfer-Encoding: chunked' alone (the connection is closed)")
    return True


def parse_chunk_size(line: bytes) -> int:
    """The size of the chunk whose size line is `line` (RFC 9112 §7.1: hex digits, optional
    extensions, which are ignored, then CRLF); 0 for the last chunk. ApiError bad_request for
    anything else: no hex digits, a bare LF, control characters in an extension, or more than
    MAX_CHUNK_SIZE_DIGITS significant digits (nothing is ever allocated from a size)."""
    match = _CHUNK_LINE.fullmatch(line)
    shown = repr(line.rstrip(b"\r\n")[:60].decode("latin-1"))
    if match is None:
        raise ApiError("bad_request", f"the chunk size line {shown} is not a hex size (with optional ';extensions') "
                                      f"ending in CRLF; {_SEND_CHUNKED}")
    digits = match.group(1).lstrip(b"0") or b"0"
    if len(digits) > MAX_CHUNK_SIZE_DIGITS:
        raise ApiError("bad_request", f"the chunk size in {shown} has {len(digits)} hex digits, more than "
                                      f"{MAX_CHUNK_SIZE_DIGITS}; {_SEND_CHUNKED}")
    return int(digits, 16)


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


@dataclass(frozen=True)
class RequestHead:
    """A request's line and headers, checked: what reading its body and answering it needs.

    `content_length` is None without Content-Length; `chunked` is true for a body sent with
    Transfer-Encoding: chunked (the only transfer coding accepted); `keep_alive` says whether the
    connection may carry another request after the answer."""

    method: str
    target: str
    version: tuple[int, int]
    headers: http.client.HTTPMessage
    content_length: int | None
    chunked: bool
    keep_alive: bool

    @classmethod
    def build(cls, request: RequestLine, version: tuple[int, int], lines: list[bytes]) -> "RequestHead":
        """The head of `request` (already checked: `version` is its `check()`) with header `lines`;
        ApiError bad_request, too_large or expectation_failed as `parse_header_lines`,
        `check_host`, `content_length`, `is_chunked` and `expectations` raise them."""
        headers = parse_header_lines(lines)
        check_host(headers, version)
        expectations(headers)
        return cls(request.method, request.target, version, headers, content_length(headers),
                   is_chunked(headers, version), keeps_alive(version, headers.get("Connection", "")))

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for "100 Continue" before it sends the body (HTTP/1.1 only)."""
        return self.version >= (1, 1) and "100-continue" in expectations(self.headers)
