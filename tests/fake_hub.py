"""A stand-in ModelScope hub on localhost: the two endpoints `e2vd pull` uses, served the way the
real hub's file API serves them.

* ``GET /api/v1/models/OWNER/NAME/repo/files?Revision=R&Recursive=True`` - the file list
  (``{"Code": 200, "Success": true, "Data": {"Files": [{"Path", "Name", "Size", "Sha256",
  "Type": "blob"}, ...]}}``), what modelscope_hub's ``list_repo_files`` reads;
* ``GET /api/v1/models/OWNER/NAME/repo?Revision=R&FilePath=P`` - a file's bytes, with
  ``Range: bytes=N-`` / ``bytes=N-M`` answered 206, what ``get_file_download_url`` builds.

Faults for tests: `cut_after` (path -> byte count: the first GET of that file sends that many
bytes of a full-length response and closes the connection), `corrupt` (paths whose served bytes
differ from the published Sha256), `requests` (every request line, for assertions).
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class FakeHub:
    """Serves `files` (repository path -> bytes) as model `model_id` at `revision`."""

    model_id: str
    revision: str
    files: dict[str, bytes]
    cut_after: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @classmethod
    def from_dir(cls, model_id: str, revision: str, directory: Path) -> "FakeHub":
        """A hub serving every regular file under `directory` (paths relative to it)."""
        files = {p.relative_to(directory).as_posix(): p.read_bytes()
                 for p in sorted(directory.rglob("*")) if p.is_file()}
        return cls(model_id, revision, files)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(self.path)
                hub._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- request handling

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        base = f"/api/v1/models/{self.model_id}/repo"
        if query.get("Revision") != self.revision and url.path.startswith(base):
            return self._json(h, 404, {"Code": 10010205001, "Success": False,
                                       "Message": f"revision {query.get('Revision')} not found"})
        if url.path == base + "/files":
            listing = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Size": len(b), "Type": "blob",
                        "Sha256": hashlib.sha256(b).hexdigest()} for p, b in self.files.items()]
            return self._json(h, 200, {"Code": 200, "Success": True, "Data": {"Files": listing}})
        if url.path == base and query.get("FilePath") in self.files:
            return self._file(h, query["FilePath"])
        return self._json(h, 404, {"Code": 404, "Success": False, "Message": "not found"})

    def _json(self, h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _file(self, h: BaseHTTPRequestHandler, path: str) -> None:
        data = self.files[path]
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end = 0, len(data) - 1
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first), int(last) if last else len(data) - 1
        body = data[start:end + 1]
        h.send_response(206 if rng else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        cut = self.cut_after.pop(path, None)
        if cut is not None:
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)
