"""What a client uploaded to POST /v1/recognize: the audio file, and form fields with options
(docs/design.md, section 3).

Two kinds of body are accepted, each framed by Content-Length or Transfer-Encoding: chunked
(`e2vd.http_io.Body`):
- **raw**: the body is the audio file's bytes, whatever its Content-Type says (curl
  --data-binary sends application/x-www-form-urlencoded, -T sends none): the fastest path, and
  what e2vd's Client and CLI send;
- **multipart/form-data** (curl -F file=@clip.wav, requests/httpx `files=`, aiohttp FormData, a
  browser's FormData): parts named like the route's options (`granularity`, `embedding`) are
  option fields; every other part is the audio, and there must be exactly one such part, under
  any name (`file` is preferred, `audio` the other usual name). An option may be given in the
  query or as a form field, not both (e2vd.protocol.parse_options refuses that).

The form is parsed while it streams in, with the `multipart` package's push parser: nothing but the
file part's bytes is kept (at most max_body_bytes, as the body is), and everything a client sends
is bounded: the boundary (1 to 70 characters of RFC 2046's set), part header lines
(MAX_PART_HEADER_BYTES), header lines per part (MAX_PART_HEADERS), option values
(MAX_FIELD_BYTES); parts are bounded by the rules themselves (one file, each option once). A part that is itself multipart (nested), or encoded with a
Content-Transfer-Encoding other than binary, 8bit or 7bit, a second file part, no file part, or a
form without its closing boundary is refused with 400 `bad_form`; bad option fields with 400
`bad_option`. RFC 2231/5987 extended parameters in a part's Content-Disposition: `filename*=`
(which RFC 7578 §4.2 tells senders not to use, but older urllib3 sent for non-ASCII filenames) is
read, decoded from UTF-8 or ISO-8859-1 and preferred over `filename` (it only names the file in
messages); a part naming its field only with `name*=` is refused with 400 `bad_form` naming the
parameter and asking for a plain `name="..."` (RFC 7578 §4.2: the field name is the `name`
parameter; the multipart package ignores `name*` and would take the part for a nameless file part);
`name*` beside a plain `name` is ignored. This module does no I/O of its own: it reads the body's pieces.
"""
from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import multipart

from e2vd.protocol import ApiError

PREFERRED_FIELDS = ("file", "audio")  # names of the file part the docs suggest; any name is accepted
MAX_BOUNDARY_BYTES = 70               # RFC 2046 §5.1.1
MAX_PART_HEADER_BYTES = 4096          # longest header line of a part
MAX_PART_HEADERS = 8                  # most header lines of one part (RFC 7578 needs 3 at most)
MAX_FIELD_BYTES = 64                  # longest option field value
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")   # RFC 2046 bchars
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})")
_PARAMETER = re.compile(rf'[ \t]*;[ \t]*({_TOKEN})=({_TOKEN}|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t -~\x80-\xff])*")')
_PLAIN_ENCODINGS = frozenset({"binary", "8bit", "7bit"})
# One `; name=value` parameter of a part's Content-Disposition, leniently (what the multipart package
# reads too): a quoted value may hold ';' and '=', so the parameters are walked one after another.
_DISPOSITION_PARAMETER = re.compile(r'[ \t]*;[ \t]*([^\s=;"]+)[ \t]*=[ \t]*("(?:\\.|[^"\\])*"|[^;]*)')
_EXT_VALUE = re.compile(r"([A-Za-z0-9!#$&+\-^_`{}~]+)'[A-Za-z0-9\-]*'(.*)", re.DOTALL)   # RFC 5987 ext-value
_HOW = "send the audio as one file part, e.g. curl -F file=@clip.wav, or the raw file: curl --data-binary @clip.wav"


@dataclass(frozen=True)
class Upload:
    """The audio of one request and, for a form, its option fields (raw text, by option name)."""

    audio: bytes
    form: bool = False
    fields: dict[str, str] = field(default_factory=dict)
    part: str = ""                     # the file part's field name (a form only)
    filename: str | None = None        # the file part's filename, if it gave one

    @property
    def what(self) -> str:
        """How an error message names the audio: "the body" or "the form's file part 'file'"."""
        return f"the form's file part {self.part!r}" if self.form else "the body"


class UploadBody(Protocol):
    """A request's body as an upload reads it (e2vd.http_io.Body)."""

    @property
    def content_type(self) -> str:
        """The Content-Type header ("" without one)."""

    def pieces(self) -> Iterator[bytes]:
        """The body's bytes as they arrive (at most max_body_bytes in all)."""

    def read(self) -> bytes:
        """The whole body."""


def receive(body: UploadBody, option_names: Collection[str]) -> Upload:
    """Read the upload of `body`: a multipart/form-data form (parts named in `option_names` are
    option fields) or the raw audio file. Raises ApiError bad_form for a malformed form, bad_option
    for a bad option field, and whatever reading the body raises."""
    boundary = form_boundary(body.content_type)
    if boundary is None:
        return Upload(body.read())
    reader = FormReader(boundary, option_names)
    for piece in body.pieces():
        reader.feed(piece)
    return reader.finish()


def upload_kind(content_type: str) -> str:
    """How a body of `content_type` is read: "multipart" (a form, or refused as one) or "raw"."""
    return "multipart" if content_type.partition(";")[0].strip().lower().startswith("multipart/") else "raw"


def form_boundary(content_type: str) -> str | None:
    """The boundary of a multipart/form-data Content-Type; None for any other type (a raw body).
    ApiError bad_form for another multipart type, parameters that are not RFC 9110's
    `;name=value` (token or quoted string), or a boundary that is missing, longer than
    MAX_BOUNDARY_BYTES or not of RFC 2046's characters."""
    if upload_kind(content_type) == "raw":
        return None
    media_type, params = _media_type(content_type)
    if media_type != "multipart/form-data":
        raise ApiError("bad_form", f"Content-Type {media_type} is not accepted; send multipart/form-data or "
                                   f"the raw audio file; {_HOW}")
    boundary = params.get("boundary")
    if not boundary:
        raise ApiError("bad_form", f"Content-Type {content_type[:100]!r} has no boundary parameter; {_HOW}")
    if len(boundary) > MAX_BOUNDARY_BYTES or not _BOUNDARY.fullmatch(boundary):
        raise ApiError("bad_form", f"the multipart boundary {boundary[:100]!r} is not 1 to {MAX_BOUNDARY_BYTES} "
                                   f"characters of RFC 2046 (letters, digits, '()+_,-./:=? and inner spaces); {_HOW}")
    return boundary


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """`type/subtype` (lower case) and the parameters (names in lower case, quoted strings
    unquoted) of a Content-Type, parsed strictly (RFC 9110 §8.3.1): ApiError bad_form for
    anything else, a parameter given twice included."""
    malformed = ApiError("bad_form", f"Content-Type {content_type[:100]!r} is not 'type/subtype; name=value' with "
                                     f"each name once and a token or quoted value; {_HOW}")
    head = _MEDIA_TYPE.match(content_type)
    if head is None:
        raise malformed
    params: dict[str, str] = {}
    pos, end = head.end(), len(content_type.rstrip(" \t"))
    while pos < end:
        param = _PARAMETER.match(content_type, pos)
        if param is None or param.group(1).lower() in params:
            raise malformed
        value = param.group(2)
        params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
        pos = param.end()
    return f"{head.group(1)}/{head.group(2)}".lower(), params


class FormReader:
    """A multipart/form-data body parsed as it streams in: `feed` each piece, then `finish`."""

    def __init__(self, boundary: str, option_names: Collection[str]) -> None:
        self.option_names = frozenset(option_names)
        self.parser = multipart.PushMultipartParser(boundary, max_header_size=MAX_PART_HEADER_BYTES,
                                                    max_header_count=MAX_PART_HEADERS)
        self.file: multipart.MultipartSegment | None = None
        self.audio: list[bytes] = []
        self.fields: dict[str, bytearray] = {}
        self.sink: list[bytes] | bytearray | None = None    # where the current part's bytes go

    def feed(self, piece: bytes) -> None:
        """Parse the next piece of the body."""
        try:
            for event in self.parser.parse(piece):
                if isinstance(event, multipart.MultipartSegment):
                    self.sink = self._start(event)
                elif event is None:
                    self.sink = None
                elif isinstance(self.sink, bytearray):
                    self.sink += event
                    if len(self.sink) > MAX_FIELD_BYTES:
                        raise ApiError("bad_option", f"the form field {self._field_name()!r} is over "
                                                     f"{MAX_FIELD_BYTES} bytes; give a value such as "
                                                     "granularity=frame or embedding=1")
                else:
                    assert self.sink is not None
                    self.sink.append(event)
        except multipart.ParserLimitReached as exc:
            raise ApiError("bad_form", f"the multipart form is over a limit ({exc}): at most {MAX_PART_HEADERS} "
                                       f"header lines per part, each at most {MAX_PART_HEADER_BYTES} bytes; "
                                       f"{_HOW}") from None
        except multipart.MultipartError as exc:
            raise ApiError("bad_form", f"the multipart form is malformed ({_parser_reason(exc)}); {_HOW}") from None

    def finish(self) -> Upload:
        """The upload, once the body has ended. ApiError bad_form when the form lacks its closing
        boundary or a file part; bad_option for an option field that is not UTF-8."""
        try:
            self.parser.close()
        except multipart.MultipartError:
            raise ApiError("bad_form", "the multipart form ended without its closing boundary "
                                       f"('--{self.parser.boundary.decode('latin-1')}--'): the body was cut short "
                                       f"or is not the form its Content-Type says; {_HOW}") from None
        if self.file is None:
            raise ApiError("bad_form", "the multipart form has no file part (only "
                                       f"{', '.join(sorted(self.fields)) or 'no parts'}); {_HOW}")
        fields = {}
        for name, raw in self.fields.items():
            try:
                fields[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError("bad_option", f"the form field {name!r} is not UTF-8 text; "
                                             "give a value such as granularity=frame or embedding=1") from None
        return Upload(b"".join(self.audio), True, fields, self.file.name or "", self.file.filename)

    def _start(self, part: multipart.MultipartSegment) -> list[bytes] | bytearray:
        """Check a part's headers as it begins; where its bytes go."""
        params = _disposition_parameters(part.header("Content-Disposition") or "")
        if "name" not in params and (star := next((key for key in params if key.startswith("name*")), None)):
            given = f"{params[star][0]}={params[star][1]}"
            raise ApiError("bad_form", f"the form part's Content-Disposition gives its field name only as {given[:80]!r}, "
                                       "an RFC 2231/5987 extended parameter, which form fields do not use (RFC 7578 "
                                       "§4.2: a part names its field with the name parameter; a non-ASCII name goes "
                                       'in it as UTF-8); send a plain name="file" (or an option\'s name, e.g. '
                                       f'name="granularity"); {_HOW}')
        if "filename*" in params and (filename := _ext_value(params["filename*"][1])) is not None:
            part.filename = filename   # RFC 6266 §4.3: filename* is preferred; it only names the file
        name = part.name or ""
        if (part.content_type or "").startswith("multipart/"):
            raise ApiError("bad_form", f"the form part {name!r} is itself {part.content_type} (nested multipart is "
                                       f"not accepted); {_HOW}")
        encoding = part.header("Content-Transfer-Encoding")
        if encoding is not None and encoding.strip().lower() not in _PLAIN_ENCODINGS:
            raise ApiError("bad_form", f"the form part {name!r} is sent with Content-Transfer-Encoding "
                                       f"{encoding[:40]!r}; send the file's bytes as they are (binary); {_HOW}")
        if name in self.option_names:
            if name in self.fields:
                raise ApiError("bad_option", f"the form field {name!r} is given twice; give it once")
            self.fields[name] = bytearray()
            return self.fields[name]
        if self.file is not None:
            raise ApiError("bad_form", f"the form has two file parts, {_describe(self.file)} and {_describe(part)}; "
                                       f"send exactly one (any name; {' or '.join(map(repr, PREFERRED_FIELDS))} "
                                       f"preferred), and only "
                                       f"{' and '.join(sorted(self.option_names))} as other fields")
        self.file = part
        return self.audio

    def _field_name(self) -> str:
        return next(name for name, value in self.fields.items() if value is self.sink)


def _disposition_parameters(value: str) -> dict[str, tuple[str, str]]:
    """The parameters of a Content-Disposition value, by lower-case name: (name as sent, raw
    value). Walked from the first ';' until a parameter does not parse; the first of a name wins."""
    params: dict[str, tuple[str, str]] = {}
    pos = value.find(";")
    while pos >= 0 and (param := _DISPOSITION_PARAMETER.match(value, pos)):
        params.setdefault(param.group(1).lower(), (param.group(1), param.group(2).strip(" \t")))
        pos = param.end()
    return params


def _ext_value(raw: str) -> str | None:
    """An RFC 5987 ext-value (charset'language'percent-encoded) decoded, or None when it is not
    one, its charset is not UTF-8 or ISO-8859-1 (the two RFC 5987 requires), or its bytes are not
    text in that charset."""
    match = _EXT_VALUE.fullmatch(raw.strip('"'))
    if match is None or match.group(1).lower() not in ("utf-8", "iso-8859-1"):
        return None
    try:
        return urllib.parse.unquote(match.group(2), encoding=match.group(1).lower(), errors="strict")
    except UnicodeDecodeError:
        return None


def _parser_reason(exc: multipart.MultipartError) -> str:
    """What the parser found wrong, in its own words but bounded (its exceptions may carry a whole
    part header line, e.g. inside a UnicodeDecodeError)."""
    if any(isinstance(arg, UnicodeDecodeError) for arg in exc.args) or isinstance(exc.__cause__, UnicodeDecodeError):
        return "a part header is not UTF-8 text: send field names and filenames as UTF-8"
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return reason[:100]


def _describe(part: multipart.MultipartSegment) -> str:
    """A part as an error message names it: its field name and filename."""
    shown = repr((part.name or "")[:60])
    return f"{shown} (file {part.filename[:60]!r})" if part.filename else shown

