"""e2vd.upload: what a recognize request uploaded, raw or as a multipart/form-data form, read from
the body's pieces as they arrive. Hostile forms first: each is refused with bad_form (or
bad_option for an option field) and a message saying what to send. (tests/test_uploads.py sends
forms with real HTTP clients to a real daemon; tests/test_bad_input.py has the hostile ones.)"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from forms import form

from e2vd.protocol import ApiError
from e2vd.upload import (MAX_BOUNDARY_BYTES, MAX_FIELD_BYTES, MAX_PART_HEADER_BYTES, Upload, form_boundary, receive,
                         upload_kind)

OPTIONS = ("granularity", "embedding")
AUDIO = bytes(range(256)) * 40 + b"\r\n--e2vd-test-boundar\r\n--"   # binary, with near-boundaries in it


class Pieces:
    """A body handed on in pieces of `size` bytes; `taken` counts the bytes handed on."""

    def __init__(self, data: bytes, content_type: str, size: int = 1000) -> None:
        self.data, self.content_type, self.size, self.taken = data, content_type, size, 0

    def pieces(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.size):
            self.taken += len(self.data[i:i + self.size])
            yield self.data[i:i + self.size]

    def read(self) -> bytes:
        return b"".join(self.pieces())


def upload(data: bytes, content_type: str, size: int = 1000) -> Upload:
    return receive(Pieces(data, content_type, size), OPTIONS)


def refused(code: str, data: bytes, content_type: str) -> str:
    with pytest.raises(ApiError) as info:
        upload(data, content_type)
    assert info.value.code == code, info.value.message
    return info.value.message


# --- which bodies are forms -----------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["", "application/octet-stream", "audio/wav", "audio/flac; rate=16000",
                                          "application/x-www-form-urlencoded", "text/plain", "not a type"])
def test_any_other_content_type_is_the_raw_audio(content_type):
    assert form_boundary(content_type) is None and upload_kind(content_type) == "raw"
    assert upload(AUDIO, content_type) == Upload(AUDIO)


@pytest.mark.parametrize("content_type, boundary", [
    ("multipart/form-data; boundary=abc", "abc"),
    ("Multipart/Form-Data;boundary=\"a b:c?\"", "a b:c?"),
    ("multipart/form-data; BOUNDARY=\"a\\bc\" ; x=y ", "abc"),
    ("multipart/form-data; charset=utf-8; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", "----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    ("multipart/form-data; boundary=" + "x" * MAX_BOUNDARY_BYTES, "x" * MAX_BOUNDARY_BYTES),
])
def test_form_boundaries(content_type, boundary):
    assert form_boundary(content_type) == boundary and upload_kind(content_type) == "multipart"


@pytest.mark.parametrize("content_type, needle", [
    ("multipart/form-data", "has no boundary parameter"),
    ("multipart/form-data; boundary=", "is not 'type/subtype; name=value'"),
    ("multipart/form-data; charset=utf-8", "has no boundary parameter"),
    ("multipart/form-data; boundary=" + "x" * (MAX_BOUNDARY_BYTES + 1), "is not 1 to 70 characters of RFC 2046"),
    ("multipart/form-data; boundary=\"abc \"", "RFC 2046"),                         # may not end in a space
    ("multipart/form-data; boundary=\"a\\\"b\"", "RFC 2046"),
    ("multipart/form-data; boundary=caf\xe9", "is not 'type/subtype; name=value'"),
    ("multipart/form-data; boundary=a; boundary=b", "each name once"),
    ("multipart/form-data; boundary=\"abc", "is not 'type/subtype; name=value'"),
    ("multipart/form-data; boundary=abc;", "is not 'type/subtype; name=value'"),
    ("multipart/form-data boundary=abc", "is not 'type/subtype; name=value'"),
    ("multipart/", "is not 'type/subtype; name=value'"),
    ("multipart/mixed; boundary=abc", "multipart/mixed is not accepted"),
    ("multipart/byteranges; boundary=abc", "is not accepted"),
])
def test_bad_form_content_types_are_refused_before_the_body_is_read(content_type, needle):
    body = Pieces(b"x", content_type)
    with pytest.raises(ApiError) as info:
        receive(body, OPTIONS)
    assert info.value.code == "bad_form" and needle in info.value.message and body.taken == 0
    assert "curl -F file=@clip.wav" in info.value.message


# --- good forms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 7, 1000, 10 ** 6])
def test_the_file_part_is_the_audio_however_the_body_is_cut(size):
    data, content_type = form(("granularity", b"frame", None), ("file", AUDIO, "a.wav"), ("embedding", b"1", None))
    got = upload(data, content_type, size)
    assert got == Upload(AUDIO, True, {"granularity": "frame", "embedding": "1"}, "file", "a.wav")
    assert got.what == "the form's file part 'file'"


@pytest.mark.parametrize("name, filename", [("file", "a.wav"), ("audio", None), ("upload", "x.flac"), ("", None)])
def test_any_name_with_or_without_a_filename_is_the_file_part(name, filename):
    data, content_type = form((name, AUDIO, filename))
    got = upload(data, content_type)
    assert (got.audio, got.part, got.filename, got.fields) == (AUDIO, name, filename, {})


def test_preamble_epilogue_and_an_empty_file_part_are_read_as_sent():
    data, content_type = form(("file", b"", "empty.wav"))
    assert upload(b"a preamble\r\n" + data + b"an epilogue\r\n", content_type).audio == b""


# --- hostile forms --------------------------------------------------------------------------------

def test_a_second_file_part_is_refused_as_it_begins():
    data, content_type = form(("file", AUDIO, "a.wav"), ("audio", AUDIO * 100, "b.wav"))
    body = Pieces(data, content_type)
    with pytest.raises(ApiError) as info:
        receive(body, OPTIONS)
    message = info.value.message
    assert info.value.code == "bad_form" and "two file parts, 'file' (file 'a.wav') and 'audio' (file 'b.wav')" in message
    assert "send exactly one (any name; 'file' or 'audio' preferred)" in message and body.taken < len(AUDIO) * 3


HOSTILE_FORMS: list[tuple[str, tuple[bytes, str], str, str]] = [
    ("an unknown text field beside the file", form(("file", AUDIO, "a.wav"), ("submit", b"Upload", None)),
     "bad_form", "two file parts, 'file' (file 'a.wav') and 'submit'"),
    ("no file part", form(("granularity", b"frame", None)), "bad_form", "no file part (only granularity)"),
    ("no parts at all", (b"--b--\r\n", "multipart/form-data; boundary=b"), "bad_form", "no file part (only no parts)"),
    ("no closing boundary", form(("file", AUDIO, "a.wav"), end=b"\r\n"), "bad_form",
     "ended without its closing boundary ('--e2vd-test-boundary--')"),
    ("cut in the middle of the file", (form(("file", AUDIO, "a.wav"))[0][:500], form()[1]), "bad_form",
     "ended without its closing boundary"),
    ("not the form its type says", (AUDIO, "multipart/form-data; boundary=zzz"), "bad_form", "closing boundary"),
    ("a part header line over the limit", form(("file", AUDIO, "a" * MAX_PART_HEADER_BYTES)), "bad_form",
     f"each at most {MAX_PART_HEADER_BYTES} bytes"),
    ("too many part header lines", form(("file", AUDIO, "a.wav"), part_headers={f"X-{i}": "1" for i in range(8)}),
     "bad_form", "at most 8 header lines per part"),
    ("nested multipart", form(("file", AUDIO, "a.wav"), part_headers={"Content-Type": "multipart/mixed; boundary=in"}),
     "bad_form", "is itself multipart/mixed (nested multipart is not accepted)"),
    ("base64 part", form(("file", AUDIO, "a.wav"), part_headers={"Content-Transfer-Encoding": "base64"}), "bad_form",
     "Content-Transfer-Encoding 'base64'"),
    ("no Content-Disposition", (b"--b\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--b--\r\n",
                                "multipart/form-data; boundary=b"), "bad_form", "malformed"),
    ("bare LF line ends", (b"--b\nContent-Disposition: form-data; name=\"file\"\n\nRIFF\n--b--\n",
                           "multipart/form-data; boundary=b"), "bad_form", ""),
    ("a header line that is not one", (b"--b\r\nContent-Disposition: form-data; name=file\r\nnot a header\r\n\r\n"
                                       b"RIFF\r\n--b--\r\n", "multipart/form-data; boundary=b"), "bad_form", "malformed"),
    ("a part header not UTF-8", (b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + b"\xff" * 4000
                                 + b'"\r\n\r\nRIFF\r\n--b--\r\n', "multipart/form-data; boundary=b"), "bad_form",
     "a part header is not UTF-8 text"),
    ("an option field twice", form(("embedding", b"1", None), ("file", AUDIO, "a.wav"), ("embedding", b"0", None)),
     "bad_option", "the form field 'embedding' is given twice"),
    ("an option field too long", form(("granularity", b"f" * (MAX_FIELD_BYTES + 1), None), ("file", AUDIO, "a.wav")),
     "bad_option", f"is over {MAX_FIELD_BYTES} bytes"),
    ("an option field not UTF-8", form(("granularity", b"\xff", None), ("file", AUDIO, "a.wav")),
     "bad_option", "is not UTF-8 text"),
]


@pytest.mark.parametrize("what, body, code, needle", HOSTILE_FORMS, ids=[h[0] for h in HOSTILE_FORMS])
def test_hostile_forms_are_refused_with_what_to_send(what, body, code, needle):
    data, content_type = body
    message = refused(code, data, content_type)
    assert needle in message and len(message) < 600


# --- RFC 2231/5987 extended parameters (name*=, filename*=) ---------------------------------------

def one_part(disposition: bytes, value: bytes = AUDIO, *more: bytes) -> tuple[bytes, str]:
    """A form of one part with the Content-Disposition `disposition` (raw bytes), then `more` parts."""
    part = b"--b\r\nContent-Disposition: " + disposition + b"\r\nContent-Type: audio/wav\r\n\r\n" + value + b"\r\n"
    return part + b"".join(more) + b"--b--\r\n", "multipart/form-data; boundary=b"


@pytest.mark.parametrize("disposition, filename", [
    (b"form-data; name=\"file\"; filename*=UTF-8''%E2%82%AC%20clip.wav", "\u20ac clip.wav"),
    (b"form-data; name=\"file\"; filename=\"EUR clip.wav\"; filename*=utf-8''%E2%82%AC%20clip.wav", "\u20ac clip.wav"),
    (b"form-data; name=\"file\"; filename*=iso-8859-1'de'Gr%FC%DFe.wav", "Gr\u00fc\u00dfe.wav"),
    (b"form-data; name=\"file\"; filename=\"plain.wav\"; filename*=UTF-8''%FF%FE.wav", "plain.wav"),   # not UTF-8
    (b"form-data; name=\"file\"; filename=\"plain.wav\"; filename*=koi8-r''%C1.wav", "plain.wav"),     # other charset
    (b"form-data; name=\"file\"; filename=\"a; filename*=UTF-8''b.wav\"", "a; filename*=UTF-8''b.wav"),  # quoted
])
def test_filename_star_is_accepted_and_decoded(disposition, filename):
    """RFC 7578 §4.2 tells senders not to use filename* (RFC 5987), but some do; it only names the
    file, so it is read (preferred over filename, as RFC 6266 §4.3 does) and never refused."""
    got = upload(*one_part(disposition))
    assert (got.audio, got.part, got.filename) == (AUDIO, "file", filename)


@pytest.mark.parametrize("disposition, shown", [
    (b"form-data; name*=UTF-8''audio; filename=\"a.wav\"", "name*=UTF-8''audio"),
    (b"form-data; NAME*=utf-8'en'%C3%A4udio", "NAME*=utf-8'en'%C3%A4udio"),
    (b"form-data; name*0=au; name*1=dio", "name*0=au"),   # RFC 2231 continuations
])
def test_name_star_is_refused_naming_the_parameter(disposition, shown):
    message = refused("bad_form", *one_part(disposition))
    assert shown in message and "RFC 7578" in message and 'plain name="file"' in message, message


def test_name_star_for_an_option_field_is_refused_not_taken_for_a_second_file():
    option = b"--b\r\nContent-Disposition: form-data; name*=UTF-8''granularity\r\n\r\nframe\r\n"
    message = refused("bad_form", *one_part(b'form-data; name="file"; filename="a.wav"', AUDIO, option))
    assert "name*=UTF-8''granularity" in message and "two file parts" not in message, message


def test_name_star_beside_a_plain_name_is_ignored():
    """RFC 7578 §4.2: the field name is the `name` parameter; an extra name* changes nothing."""
    got = upload(*one_part(b"form-data; name=\"file\"; name*=UTF-8''other; filename=\"a.wav\""))
    assert (got.audio, got.part, got.filename) == (AUDIO, "file", "a.wav")
