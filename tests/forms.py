"""Builders of upload bodies for tests and benchmarks: multipart/form-data forms and chunked
framing, written byte by byte as a client would (so that hostile variants are easy to make)."""
from __future__ import annotations

Part = tuple[str, bytes, "str | None"]   # (field name, value, filename or None)


def form(*parts: Part, boundary: str = "e2vd-test-boundary", part_headers: dict[str, str] | None = None,
         end: bytes = b"--\r\n") -> tuple[bytes, str]:
    """A multipart/form-data body of `parts` and its Content-Type. `part_headers` are added to every
    part; `end` follows the last boundary ("--" CRLF closes the form; b"" leaves it open)."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        lines = [f"Content-Disposition: {disposition}", *(f"{k}: {v}" for k, v in (part_headers or {}).items())]
        if filename is not None and "Content-Type" not in (part_headers or {}):
            lines.append("Content-Type: application/octet-stream")
        out += f"--{boundary}\r\n".encode() + "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + value + b"\r\n"
    return out + f"--{boundary}".encode() + end, f"multipart/form-data; boundary={boundary}"


def chunked(data: bytes, size: int = 4096, trailer: bytes = b"") -> bytes:
    """`data` framed as a chunked body in chunks of `size` bytes, the last chunk, `trailer` lines
    and the final CRLF."""
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"
