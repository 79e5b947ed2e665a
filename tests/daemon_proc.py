"""DaemonProcess: run `python -m e2vd serve` in a subprocess on a Unix socket, for tests.

    with DaemonProcess(tmp_path / "e2vd.sock", tiny_model, idle_timeout=60) as d:
        status, headers, body = d.request("GET", "/v1/status")

The constructor takes the socket path, the model directory and any settings: keyword arguments
become E2VD_<KEY> environment variables (so every Settings key works, not only the CLI flags);
`E2VD_CONFIG=/dev/null` (an empty file) so /etc/e2vd/e2vd.toml never leaks in. `start()` waits
until GET /v1/health answers (any status) — pass `wait_ready=True` to wait for "ready" instead.
The daemon's stderr goes to `<socket>.log` (read it with `.log_text()`).
`stop()` sends SIGTERM and returns the exit code; `__exit__` stops it (and kills it if it hangs).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2vd.client import connect_unix

ROOT = Path(__file__).resolve().parent.parent


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket (Host header "e2vd")."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        super().__init__("e2vd", timeout=timeout)
        self.unix_path = os.fspath(path)

    def connect(self) -> None:
        self.sock = connect_unix(self.unix_path, self.timeout)


def http_request(path: str | os.PathLike[str], method: str, url: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, headers, JSON body or raw bytes)."""
    return http_exchange(UnixHTTPConnection(path, timeout), method, url, body, headers)


def http_exchange(conn: http.client.HTTPConnection, method: str, url: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request on `conn`, closed after it (any http.client connection: the daemon's socket,
    or TCP as tests/test_ray_serve.py): (status, lower-cased headers, JSON body or raw bytes)."""
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = data
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def raw_request(path: str | os.PathLike[str], data: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes on a fresh connection and read one response: (status, headers, JSON or {})."""
    with connect_unix(os.fspath(path), timeout) as s:
        s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Read one HTTP response from a raw socket: (status, lower-cased headers, JSON or {})."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response: {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, json.loads(body[:length]) if body[:length] else {}


class DaemonProcess:
    """A daemon subprocess bound to `socket` serving `model`; see the module docstring."""

    def __init__(self, socket: str | os.PathLike[str], model: str | os.PathLike[str], *,
                 wait_ready: bool = False, start_timeout: float = 120.0, python: str | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 **settings: object) -> None:
        self.socket = Path(socket)
        self.model = str(model)
        self.wait_ready = wait_ready
        self.start_timeout = start_timeout
        self.python = python or sys.executable
        self.extra_args = list(extra_args or [])
        self.settings = settings
        self.extra_env = dict(env or {})
        self.log_path = self.socket.with_name(self.socket.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        return [self.python, "-m", "e2vd", "serve", "--socket", str(self.socket), "--model", self.model,
                *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("E2VD_", "LISTEN_", "NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID"))}
        env["E2VD_CONFIG"] = os.devnull   # an empty config file: /etc/e2vd/e2vd.toml never leaks in
        env.setdefault("E2VD_DEVICE", "cpu")
        for key, value in self.settings.items():
            env[f"E2VD_{key.upper()}"] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        return env

    def start(self) -> "DaemonProcess":
        """Start the daemon and wait until it answers GET /v1/health (or "ready" with wait_ready)."""
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.environment(),
                                     stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"e2vd serve exited with {self.proc.returncode} before answering:\n"
                                   + self.log_text()[-4000:])
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"e2vd serve did not answer within {self.start_timeout} s:\n"
                                   + self.log_text()[-4000:])
            try:
                status, _, body = self.request("GET", "/v1/health", timeout=5)
            except OSError:
                time.sleep(0.05)
                continue
            if not self.wait_ready or (status == 200 and body.get("status") == "ready"):
                return self
            if status == 503 and body.get("error", {}).get("code") == "busy":
                time.sleep(0.1)   # the previous probe's connection still counted (max_connections_per_uid = 1)
                continue
            if status != 200:
                self.kill()   # no daemon left behind (on a GPU it would hold memory through later tests)
                raise RuntimeError(f"e2vd serve is unhealthy ({status}): {body}")
            time.sleep(0.1)

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
        """One request on a fresh connection: (status, lower-cased headers, JSON or bytes)."""
        return http_request(self.socket, method, url, body, headers, timeout)

    def connection(self, timeout: float = 60.0) -> UnixHTTPConnection:
        """A keep-alive http.client connection to the daemon (the caller closes it)."""
        return UnixHTTPConnection(self.socket, timeout)

    def wait_ready_state(self, timeout: float = 120.0) -> None:
        """Wait until GET /v1/health says "ready"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, body = self.request("GET", "/v1/health", timeout=5)
            if status == 200 and body.get("status") == "ready":
                return
            time.sleep(0.1)
        raise TimeoutError("the model did not become ready:\n" + self.log_text()[-4000:])

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (kill after `timeout`); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.returncode = self.proc.returncode
        return self.returncode

    def settled_health(self, timeout: float = 120.0) -> tuple[int, dict]:
        """GET /v1/health until it says something other than 200 "loading" (or `timeout` s have
        passed): (status, body) of that answer."""
        deadline = time.monotonic() + timeout
        while True:
            status, _, body = self.request("GET", "/v1/health")
            if status != 200 or body.get("status") == "ready" or time.monotonic() > deadline:
                return status, body
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        """What the daemon wrote to stderr/stdout so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if getattr(self, "log_file", None) is not None:
                self.log_file.close()
