"""A small real HTTP/1.1 server on a Unix socket, for testing the client's transport on its own.

It is not the daemon: it speaks the daemon's wire format (docs/design.md, section 3) with answers computed from
the request (the body length becomes duration_s, so a test can tell the body arrived whole), and
it can misbehave on purpose (close kept-alive connections, hang up without answering, never
answer) to exercise reconnects and timeouts. Everything runs over a real AF_UNIX socket.
"""
from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

from e2vd import vocabulary

LABELS = list(vocabulary.LABELS)   # the daemon's labels, as a JSON answer lists them


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, behaviour: "TinyDaemon") -> None:
        self.behaviour = behaviour
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        b = self.server.behaviour
        with b.lock:
            b.connections += 1

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, doc: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"code": code, "message": message}}, headers)

    def _handle(self) -> None:
        b = self.server.behaviour
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with b.lock:
            b.requests.append((self.command, url.path, query, len(body)))
            mode = b.mode
        if mode == "hangup":          # close without a byte of answer
            self.close_connection = True
            return
        if mode == "silent":          # never answer (until the test ends)
            time.sleep(b.silence_s)
            self.close_connection = True
            return
        if url.path == "/v1/health" and self.command == "GET":
            self._send(200, {"status": "ready"})
        elif url.path == "/v1/status" and self.command == "GET":
            self._send(200, {"model": "tiny-test", "device": "cpu", "requests_served": len(b.requests),
                             "memory": {"param_bytes": 2**20}})
        elif url.path == "/v1/warmup" and self.command == "POST":
            self._send(200, {"status": "ready", "hold_s": float(query.get("hold", 0))})
        elif url.path == "/v1/recognize" and self.command == "POST":
            if body.startswith(b"not audio"):
                self._error(400, "bad_audio", "cannot decode the audio: format not recognised")
            elif body.startswith(b"busy"):
                self._error(503, "busy", "queue full", {"Retry-After": "1"})
            elif body.startswith(b"boom"):
                self._error(500, "internal", "something broke")
            else:
                scores = [0.02] * 9
                scores[3] = 0.84
                doc = {"labels": LABELS, "scores": scores, "top": {"label": "happy", "score": 0.84},
                       "model_labels": [f"x/{lab}" for lab in LABELS], "duration_s": float(len(body)),
                       "model": "tiny-test", "timing_ms": {"queue": 0.1, "infer": 1.0}}
                if query.get("embedding") == "1":
                    dim = 4
                    doc["embedding"] = ([[float(t)] * dim for t in range(3)]
                                        if query.get("granularity") == "frame" else [0.5] * dim)
                self._send(200, doc)
        else:
            self._error(404, "not_found", f"no route {self.command} {url.path}")
        if mode == "close_after":     # drop the kept-alive connection, as an idle daemon would
            self.close_connection = True

    do_GET = _handle
    do_POST = _handle


class TinyDaemon:
    """Context manager: serves on `<tmpdir>/d.sock` in a thread. Attributes a test can read or set:
    mode ("normal", "close_after", "hangup", "silent"), connections (accepted so far),
    requests [(method, path, query, body length)]."""

    def __init__(self, mode: str = "normal", silence_s: float = 3.0) -> None:
        self.mode = mode
        self.silence_s = silence_s
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, dict, int]] = []
        self._dir = tempfile.mkdtemp(prefix="e2vd-t-")  # short: AF_UNIX paths are limited to 107 bytes
        self.socket = os.path.join(self._dir, "d.sock")
        self._server: _Server | None = None

    def __enter__(self) -> "TinyDaemon":
        self._server = _Server(self.socket, self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)
