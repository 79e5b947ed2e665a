"""RawPeer: a real Unix-socket server (one thread) that reads each request and answers it with
fixed bytes, whatever was asked: a peer that does not speak HTTP, breaks it, or sends hostile JSON.

    with RawPeer(b"SSH-2.0-OpenSSH_9.2\r\n") as peer:
        Client(peer.socket).health()          # -> DaemonUnreachable: does not speak HTTP
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading


def http_answer(body: bytes | str, status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response carrying `body` (JSON text), closing the connection."""
    data = body.encode() if isinstance(body, str) else body
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(data)}",
            "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def json_answer(doc: object) -> bytes:
    """http_answer of `doc` as JSON (Python's json writes Infinity/NaN, as a broken peer could)."""
    return http_answer(json.dumps(doc))


class RawPeer:
    """Context manager serving on `<tmpdir>/p.sock`; `.connections` counts accepted connections,
    `.requests` holds each request's head (bytes)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self._dir = tempfile.mkdtemp(prefix="e2vd-t-")  # short: AF_UNIX paths hold 107 bytes
        self.socket = os.path.join(self._dir, "p.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="raw-peer", daemon=True)

    def __enter__(self) -> "RawPeer":
        self._listener.bind(self.socket)
        self._listener.listen(8)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below on Linux
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                conn.settimeout(10)
                try:
                    self.requests.append(_read_request(conn))
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass


def _read_request(conn: socket.socket) -> bytes:
    """Read one request's head and its Content-Length body (so closing leaves nothing unread)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head
