"""Python client for the e2vd daemon: HTTP/1.1 over its Unix socket (stdlib http.client only).

    from e2vd import Client
    with Client() as c:                      # $E2VD_SOCKET or /run/e2vd/e2vd.sock
        r = c.recognize("clip.wav")          # the file's bytes travel in the body
        print(r.top.label, r.top.score)

One keep-alive connection is reused across calls. When the daemon has closed it (idle exit,
`connection_timeout`), the next call reconnects transparently; connecting to a socket-activated
daemon that is not running starts it, and the call waits (up to `timeout` seconds per socket
operation) while the model loads.

Errors: `ClientError` carries the daemon's error (HTTP status, code, message); `DaemonUnreachable`
means no daemon could be reached, with a message that says how to fix it; `DaemonTimeout` (a kind
of DaemonUnreachable) means it did not answer in time.
"""
from __future__ import annotations

import errno
import http.client
import json
import os
import socket as _socket
import struct
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from e2vd import result

DEFAULT_SOCKET = "/run/e2vd/e2vd.sock"
#: Seconds one socket operation may block. A cold start (process start + loading a ~2 GB model)
#: takes tens of seconds; the first response is only sent after it, so the default is generous.
DEFAULT_TIMEOUT = 300.0

# Errors that mean "the peer closed the connection before we got any response byte".
_CLOSED_EARLY = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                 ConnectionAbortedError)


class E2vdError(Exception):
    """Base of the client's errors."""


class DaemonUnreachable(E2vdError):
    """No daemon could be reached on the socket; the message says what happened and how to fix it."""

    def __init__(self, socket_path: str, message: str) -> None:
        super().__init__(message)
        self.socket = socket_path
        self.message = message


class DaemonTimeout(DaemonUnreachable):
    """The daemon accepted the connection but did not answer within the timeout."""


class ClientError(E2vdError):
    """The daemon answered with an error: `.status` (HTTP), `.code` (e.g. "bad_audio"), `.message`.

    `.retry_after` is the Retry-After header in seconds when the daemon sent one (503 busy/loading).
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def rejected(self) -> bool:
        """True when the request itself was refused (4xx: bad input); False for server trouble (5xx)."""
        return 400 <= self.status < 500


@dataclass(frozen=True)
class Recognition(result.Recognition):
    """One recognition as the daemon served it (`POST /v1/recognize`): the engine's result fields
    (labels, scores, top, model_labels, duration_s, embedding as a float32 array or None) plus
    model: the model the daemon serves, and timing_ms: its own timings in milliseconds
    (e.g. {"queue": .., "infer": ..}).
    """

    model: str = ""
    timing_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Recognition":
        """Build from the decoded JSON body; raises ValueError naming a missing field."""
        try:
            emb = d.get("embedding")
            return cls(
                labels=list(d["labels"]),
                scores=[float(x) for x in d["scores"]],
                model_labels=list(d.get("model_labels") or []),
                duration_s=float(d["duration_s"]),
                embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
                model=str(d.get("model", "")),
                timing_ms={str(k): float(v) for k, v in (d.get("timing_ms") or {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"the daemon's answer lacks or mangles field {e}: {str(d)[:200]}") from e

    def to_dict(self, embedding: bool = True) -> dict[str, Any]:
        """JSON-ready dict with the daemon's field names (model and timing_ms included)."""
        return {**super().to_dict(embedding), "model": self.model, "timing_ms": dict(self.timing_ms)}


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX; connect failures become DaemonUnreachable with a fix."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("e2vd", timeout=timeout)  # the host name only fills the Host: header
        self.unix_path = path

    def connect(self) -> None:
        try:
            self.sock = connect_unix(self.unix_path, self.timeout)
        except OSError as e:
            raise _unreachable(self.unix_path, e) from e


def connect_unix(path: str, timeout: float) -> _socket.socket:
    """Connect a stream socket to `path`, waiting up to `timeout` seconds for room in the
    listener's backlog; the returned socket has `timeout` set for later operations.

    A full backlog is normal while a socket-activated daemon starts (systemd queues every
    connection until the model is loaded). A socket with a Python timeout is non-blocking, and a
    non-blocking AF_UNIX connect() fails at once with EAGAIN on a full backlog, so the connect
    is made blocking with SO_SNDTIMEO bounding the wait; past it, the kernel's EAGAIN is raised
    as TimeoutError. Other OSErrors (missing socket, refused, permission) pass through.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        seconds = max(timeout, 0.001)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)))
        try:
            sock.connect(path)
        except BlockingIOError as e:
            raise TimeoutError(errno.ETIMEDOUT, f"the backlog of {path} stayed full for {timeout:g} s") from e
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        sock.settimeout(timeout)
        return sock
    except BaseException:
        sock.close()
        raise


def _unreachable(path: str, err: OSError) -> DaemonUnreachable:
    """A DaemonUnreachable whose message explains `err` for this socket path and how to fix it."""
    enable = "start it with `sudo systemctl enable --now e2vd.socket` (after `sudo e2vd install`)"
    other = "or point at a running daemon with --socket PATH / $E2VD_SOCKET"
    if isinstance(err, FileNotFoundError):
        msg = f"no daemon socket at {path}: e2vd.socket is not listening; {enable}, {other}"
    elif isinstance(err, ConnectionRefusedError):
        msg = (f"{path} exists but nothing listens on it (e2vd.socket stopped, or a hand-started "
               f"daemon died); {enable}, {other}. Check `systemctl status e2vd.socket`")
    elif isinstance(err, PermissionError):
        msg = (f"permission denied on {path}: your user may not talk to the daemon. Add it to the "
               f"socket's group: `sudo usermod -aG e2vd $USER`, then log in again (check with `id`)")
    elif isinstance(err, TimeoutError):
        return DaemonTimeout(path, f"connecting to {path} timed out: the socket's backlog is full "
                                   f"or the daemon hangs; check `systemctl status e2vd` and `journalctl -u e2vd`")
    elif "too long" in str(err):
        msg = f"socket path is too long for AF_UNIX (max 107 bytes): {path}"
    else:
        msg = f"cannot connect to {path}: {err.strerror or err}; {enable}, {other}"
    return DaemonUnreachable(path, msg)


class Client:
    """Talks to one e2vd daemon over its Unix socket, reusing one keep-alive connection.

    socket: socket path; None → $E2VD_SOCKET, else /run/e2vd/e2vd.sock.
    timeout: seconds one socket operation (connect, send, waiting for the answer) may take; the
    first answer after a cold start comes only once the model is loaded, so keep it generous.
    Not thread-safe: use one Client per thread.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = os.fspath(socket) if socket is not None else os.environ.get("E2VD_SOCKET") or DEFAULT_SOCKET
        self.timeout = float(timeout)
        self._conn: _UnixHTTPConnection | None = None
        #: Connections opened so far (1 when every call reused the first one).
        self.connections_opened = 0

    # -- public API ---------------------------------------------------------------------------

    def recognize(self, audio: str | os.PathLike[str] | bytes | bytearray | memoryview,
                  granularity: str = "utterance", embedding: bool = False) -> Recognition:
        """Recognise the emotion in `audio`: a file path (read here, its bytes are sent) or the
        bytes of an audio file (wav, flac, ogg, mp3...). granularity: "utterance" or "frame"
        (only changes the embedding's shape). Raises ClientError (e.g. code "bad_audio") and
        DaemonUnreachable; OSError when a local file cannot be read."""
        if isinstance(audio, (bytes, bytearray, memoryview)):
            body = bytes(audio)
        else:
            body = Path(audio).read_bytes()
        query = urllib.parse.urlencode({"granularity": granularity, "embedding": int(bool(embedding))})
        # Recognition is a pure function of the body: resending it after the connection was
        # closed before any answer byte arrived cannot do anything twice, so it may be retried.
        data = self._request("POST", f"/v1/recognize?{query}", body, idempotent=True)
        try:
            return Recognition.from_json(data)
        except ValueError as e:
            raise ClientError(502, "internal", str(e)) from None

    def health(self) -> dict[str, Any]:
        """GET /v1/health: {"status": "loading"|"ready"}; answers at once, also while loading."""
        return self._request("GET", "/v1/health", None, idempotent=True)

    def status(self) -> dict[str, Any]:
        """GET /v1/status: model, device, dtype, memory, queue depth, requests, uptime, deadlines."""
        return self._request("GET", "/v1/status", None, idempotent=True)

    def warmup(self, hold: float | None = None) -> dict[str, Any]:
        """POST /v1/warmup: wake the daemon and return once the model is ready. `hold`: seconds
        to keep it warm from now (the daemon caps it at its max_hold); None: just wake it."""
        path = "/v1/warmup" if hold is None else f"/v1/warmup?hold={float(hold):g}"
        # Setting the keep-warm deadline to now+hold twice leaves the same state: idempotent.
        return self._request("POST", path, b"", idempotent=True)

    def openapi(self) -> dict[str, Any]:
        """GET /v1/openapi.json: the daemon's OpenAPI document."""
        return self._request("GET", "/v1/openapi.json", None, idempotent=True)

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(socket={self.socket!r}, timeout={self.timeout:g})"

    # -- transport ----------------------------------------------------------------------------

    def _connection(self) -> tuple[_UnixHTTPConnection, bool]:
        """The open connection and whether it was just opened."""
        if self._conn is not None and self._conn.sock is not None:
            return self._conn, False
        if self._conn is None:
            self._conn = _UnixHTTPConnection(self.socket, self.timeout)
        self._conn.connect()
        self.connections_opened += 1
        return self._conn, True

    def _request(self, method: str, path: str, body: bytes | None, idempotent: bool) -> dict[str, Any]:
        """Send one request and decode its JSON answer; raise ClientError for error statuses.

        A reused keep-alive connection may have been closed by the daemon while we were not
        looking (idle exit, connection_timeout). If it turns out closed before any byte of the
        answer arrived, an idempotent request is sent once more on a fresh connection; a
        non-idempotent one is not (it may have been processed) and raises DaemonUnreachable.
        """
        for attempt in (1, 2):
            conn, fresh = self._connection()
            try:
                resp = self._exchange(conn, method, path, body)
            except _CLOSED_EARLY as e:
                self.close()
                if attempt == 1 and idempotent:
                    continue
                raise DaemonUnreachable(self.socket, (
                    f"the daemon on {self.socket} closed the connection without answering "
                    f"{method} {path.split('?')[0]} ({type(e).__name__}); it may have crashed or "
                    f"restarted: check `journalctl -u e2vd`")) from e
            except TimeoutError as e:
                self.close()
                raise DaemonTimeout(self.socket, (
                    f"no answer from the daemon on {self.socket} within {self.timeout:g} s for "
                    f"{method} {path.split('?')[0]}; a cold start may take longer on this machine "
                    f"(raise the timeout), or the daemon hangs: check `journalctl -u e2vd`")) from e
            except OSError as e:
                self.close()
                raise _unreachable(self.socket, e) from e
            return self._decode(resp, method, path)
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(self, conn: _UnixHTTPConnection, method: str, path: str,
                  body: bytes | None) -> tuple[int, Mapping[str, str], bytes]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        try:
            conn.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have refused the request (e.g. 413 too_large) and stopped reading
            # before the whole body was sent: its answer can still be waiting in our buffer.
            pass
        resp = conn.getresponse()
        data = resp.read()  # read fully, so the connection can carry the next request
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, data

    def _decode(self, resp: tuple[int, Mapping[str, str], bytes], method: str, path: str) -> dict[str, Any]:
        status, headers, data = resp
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = None
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise ClientError(502, "internal", f"the daemon answered {method} {path.split('?')[0]} "
                                                   f"with non-JSON: {data[:200]!r}")
            return doc
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code, message = str(err.get("code", "internal")), str(err.get("message", ""))
        else:
            code, message = _status_code(status), (data[:300].decode("utf-8", "replace") or f"HTTP {status}")
        retry = headers.get("Retry-After")
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        raise ClientError(status, code, message, retry_after)


def _status_code(status: int) -> str:
    """An error code for an answer that carried no error document."""
    return {400: "bad_option", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
            503: "busy"}.get(status, "internal")
