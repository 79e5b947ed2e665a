"""Python client for the e2vd daemon: HTTP/1.1 over its Unix socket (stdlib http.client only).

    from e2vd import Client
    with Client() as c:                      # $E2VD_SOCKET, $E2VD_INSTANCE or /run/e2vd/e2vd.sock
        r = c.recognize("clip.wav")          # the file's bytes travel in the body
        print(r.top.label, r.top.score)

One keep-alive connection is reused across calls. When the daemon has closed it (idle exit,
`connection_timeout`), the next call reconnects transparently; connecting to a socket-activated
daemon that is not running starts it, and the call waits (up to `timeout` seconds per socket
operation) while the model loads.

Errors: `ClientError` carries the daemon's error (HTTP status, code, message); `DaemonUnreachable`
means no daemon could be reached, with a message that says how to fix it; `DaemonTimeout` (a kind
of DaemonUnreachable) means it did not answer in time; `DaemonDied` means the daemon took the
request and closed the connection without an answer (it died mid-request: its watchdog ended a
stuck inference, or it crashed), which is never retried; `InputError` means local audio was not
sent (larger than max_body_bytes, not a regular file, or a stream that stalled). Each carries the
`e2vd` command's exit status for it as `exit_code` (an `e2vd.vocabulary.ExitCode`).

A file is read at most max_body_bytes + 1 bytes (`body_limit()`: the daemon's configured value on
this machine), so /dev/zero or a huge file cannot exhaust memory; a FIFO or device is refused
without blocking. An answer that is not HTTP at all means something other than the daemon listens
(DaemonUnreachable); a malformed HTTP answer is a server error (ClientError 502 "internal").
"""
from __future__ import annotations

import errno
import http.client
import json
import math
import os
import select
import socket as _socket
import stat
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from e2vd import config, protocol
from e2vd.vocabulary import ExitCode, Granularity

if TYPE_CHECKING:   # Recognition is defined on first use (module __getattr__): numpy comes with it
    Recognition: type

#: The daemon's socket when neither `socket` nor $E2VD_SOCKET names one: the daemon's default.
DEFAULT_SOCKET = config.Settings.socket
#: The environment variable naming the socket: the one the daemon reads for its `socket` setting.
SOCKET_ENV = config.env_name("socket")
#: Seconds one socket operation may block. A cold start (process start + loading a ~2 GB model)
#: takes tens of seconds; the first response is only sent after it, so the default is generous.
DEFAULT_TIMEOUT = 300.0

#: The longest timeout accepted (one day): socket timeouts beyond what the kernel's timeval
#: holds fail deep inside the socket module.
MAX_TIMEOUT = 86400.0
_READ_CHUNK = 1 << 20

# Errors that mean "the peer closed the connection before we got any response byte".
_CLOSED_EARLY = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                 ConnectionAbortedError)


class E2vdError(Exception):
    """Base of the client's errors; `exit_code` is the `e2vd` command's exit status for it."""

    exit_code = ExitCode.SERVER


class DaemonUnreachable(E2vdError):
    """No daemon could be reached on the socket; the message says what happened and how to fix it."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, socket_path: str, message: str) -> None:
        super().__init__(message)
        self.socket = socket_path
        self.message = message


class DaemonTimeout(DaemonUnreachable):
    """The daemon accepted the connection but did not answer within the timeout."""


class DaemonDied(E2vdError):
    """The daemon read the request and then closed the connection without answering: its process
    ended mid-request (e2vd's watchdog ended a stuck inference, or it crashed). Not retried: the
    same request might end the next daemon the same way. Exit status SERVER."""

    exit_code = ExitCode.SERVER

    def __init__(self, socket_path: str, message: str) -> None:
        super().__init__(message)
        self.socket = socket_path
        self.message = message


class _NotSent(Exception):
    """The daemon had closed the connection before the whole request was sent (internal)."""


class InputError(E2vdError, ValueError):
    """Local audio that was not sent: `.source` (a path or "stdin"), `.code` ("too_large",
    "not_a_file" or "timeout", like the daemon's codes) and `.message` (what to do)."""

    exit_code = ExitCode.REJECTED

    def __init__(self, source: str, code: str, message: str) -> None:
        super().__init__(message)
        self.source = source
        self.code = code
        self.message = message


class ClientError(E2vdError):
    """The daemon answered with an error: `.status` (HTTP), `.code` (e.g. "bad_audio"), `.message`.

    `.retry_after` is the Retry-After header in seconds when the daemon sent one (503 busy/loading).
    `.exit_code` is REJECTED for a refused request (4xx), SERVER for the daemon's trouble (5xx).
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.exit_code = ExitCode.REJECTED if self.rejected else ExitCode.SERVER

    @property
    def rejected(self) -> bool:
        """True when the request itself was refused (4xx: bad input); False for server trouble (5xx)."""
        return 400 <= self.status < 500


def _define_recognition() -> type:
    """The Recognition class, defined on first use: it extends e2vd.result.Recognition, whose
    embedding is a numpy array, so numpy is imported only when a recognition is built or the
    name is looked up (`e2vd status`, `e2vd health` and `import e2vd.client` do without it)."""
    from e2vd import result

    @dataclass(frozen=True)
    class Recognition(result.Recognition):
        """One recognition as the daemon served it (`POST /v1/recognize`): the engine's result fields
        (labels, scores, top, model_labels, duration_s, embedding as a float32 array or None) plus
        model: the model whose result this is, and timing_ms: the daemon's own timings in
        milliseconds (e.g. {"queue": .., "infer": ..}, and "fallback" when the fallback answered).
        decided_by: "primary" (the main model's result) or "fallback" (the main model was unsure and
        the fallback model answered; `primary` then holds the main model's labels, scores, top and
        model); fallback_error: why the fallback was asked but could not answer ("" otherwise).
        A daemon from before the fallback sends none of these: "primary", None, "".
        """

        model: str = ""
        timing_ms: dict[str, float] = field(default_factory=dict)
        decided_by: str = "primary"
        primary: result.Primary | None = None
        fallback_error: str = ""

        @classmethod
        def from_json(cls, d: Mapping[str, Any]) -> "Recognition":
            """Build from the decoded JSON body (`result.Recognition.from_dict` plus model and
            timing_ms); raises ValueError naming a missing or malformed field."""
            return cls.from_dict(d)

        @classmethod
        def _fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
            """The engine's fields, then model and timing_ms (a mapping of names to numbers), and
            decided_by (one of e2vd.result.DECIDED_BY), primary and fallback_error (a string) when present."""
            decided_by = d.get("decided_by", "primary")
            if decided_by not in result.DECIDED_BY:
                raise ValueError(f"'decided_by' must be one of {', '.join(result.DECIDED_BY)}, got {decided_by!r}")
            primary = d.get("primary")
            fallback_error = d.get("fallback_error")
            if fallback_error is not None and not isinstance(fallback_error, str):
                raise ValueError(f"'fallback_error' must be a string, got {type(fallback_error).__name__}")
            return {**super()._fields(d), "model": str(d.get("model", "")),
                    "timing_ms": {str(k): float(v) for k, v in (d.get("timing_ms") or {}).items()},
                    "decided_by": decided_by,
                    "primary": None if primary is None else result.Primary.from_dict(primary),
                    "fallback_error": fallback_error or ""}

        def to_dict(self, embedding: bool = True) -> dict[str, Any]:
            """JSON-ready dict with the daemon's field names (model, decided_by, timing_ms included;
            primary and fallback_error when set)."""
            out = {**super().to_dict(embedding), "model": self.model, "decided_by": self.decided_by,
                   "timing_ms": dict(self.timing_ms)}
            if self.primary is not None:
                out["primary"] = self.primary.to_dict()
            if self.fallback_error:
                out["fallback_error"] = self.fallback_error
            return out

    Recognition.__qualname__ = "Recognition"   # e2vd.client.Recognition, as pickle and repr() name it
    return Recognition


_RECOGNITION: list[type] = []


def _recognition() -> type:
    if not _RECOGNITION:
        _RECOGNITION.append(_define_recognition())
    return _RECOGNITION[0]


def __getattr__(name: str) -> Any:
    """`e2vd.client.Recognition`, defined (and numpy imported) the first time it is asked for."""
    if name == "Recognition":
        return _recognition()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Recognition"])


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
    check_timeout(timeout)
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
    from e2vd.instances import of_socket

    inst = of_socket(path)   # e2vd.socket, or e2vd@NAME.socket for /run/e2vd/NAME.sock
    unit = inst.socket_unit
    enable = (f"start it with `sudo systemctl enable --now {unit}` (after `sudo e2vd install"
              f"{'' if inst.default else f' --instance {inst.name} --model MODEL'}`)")
    other = "or point at a running daemon with --socket PATH / $E2VD_SOCKET"
    if isinstance(err, FileNotFoundError):
        msg = f"no daemon socket at {path}: {unit} is not listening; {enable}, {other}"
    elif isinstance(err, ConnectionRefusedError) and (kind := _non_socket_kind(path)):
        msg = (f"{path} is {kind}, not a socket: point --socket / $E2VD_SOCKET at the daemon's "
               f"socket ({DEFAULT_SOCKET} when systemd runs it)")
    elif isinstance(err, ConnectionRefusedError):
        msg = (f"{path} exists but nothing listens on it ({unit} stopped, or a hand-started "
               f"daemon died); {enable}, {other}. Check `systemctl status {unit}`")
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


def _non_socket_kind(path: str) -> str | None:
    """What `path` is when it exists but is not a socket ("a regular file", "a directory"...);
    None for a socket or when it cannot be examined."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISSOCK(mode) else file_kind(mode)


def file_kind(mode: int) -> str:
    """`mode`'s file type in words, with an article: "a regular file", "a FIFO (named pipe)"..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "a special file")


def check_timeout(timeout: float) -> float:
    """`timeout` if it is a usable number of seconds (finite, > 0, at most MAX_TIMEOUT); else
    ValueError saying what is accepted."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"timeout {timeout!r} is not usable: give seconds > 0 and at most {MAX_TIMEOUT:g}")
    return float(timeout)


# -- reading audio with a bound ---------------------------------------------------------------

@dataclass(frozen=True)
class BodyLimit:
    """The largest request body the daemon is taken to accept (`max_bytes`) and where that number
    comes from (`source`, words for an error message)."""

    max_bytes: int
    source: str


def body_limit(env: Mapping[str, str] | None = None, config_path: str | None = None) -> BodyLimit:
    """max_body_bytes as the daemon on this machine reads it: the default < the config file
    ($E2VD_CONFIG or /etc/e2vd/e2vd.toml) < $E2VD_MAX_BODY_BYTES (e2vd.config, the daemon's own
    loader). Asking the daemon would wake it, so this is the configured value, and the daemon stays
    the judge (413 too_large). When the settings cannot be read: the default, with the reason.
    `config_path`: an instance's settings file (/etc/e2vd/NAME.toml) instead of the default's."""
    env = os.environ if env is None else env
    var = config.env_name("max_body_bytes")
    default = config.Settings.max_body_bytes
    path, _ = config.config_file_path(config_path, env)
    try:
        value = config.load_settings(env={k: v for k, v in env.items() if k in (config.CONFIG_ENV, var)},
                                     config_path=config_path)
        in_file = "max_body_bytes" in config.read_config_file(path)
    except (config.ConfigError, OSError) as e:
        why = " ".join(str(e).split())
        return BodyLimit(default, f"the default {default}, as the settings could not be read: {why}")
    if env.get(var, "").strip():
        return BodyLimit(value.max_body_bytes, f"from ${var}")
    if in_file:
        return BodyLimit(value.max_body_bytes, f"from {path}")
    return BodyLimit(value.max_body_bytes, f"the default; neither {path} nor ${var} sets it")


def _too_large(source: str, limit: BodyLimit) -> InputError:
    return InputError(source, "too_large", (
        f"{source}: larger than {limit.max_bytes} bytes, the daemon's max_body_bytes as configured "
        f"on this machine ({limit.source}); nothing was sent. Cut or compress the audio; if the "
        f"daemon was given a larger max_body_bytes, set $E2VD_MAX_BODY_BYTES to it here too"))


def read_audio_file(path: str | os.PathLike[str], limit: BodyLimit) -> bytes:
    """The bytes of the regular file `path`, at most `limit.max_bytes` of them.

    Raises InputError "not_a_file" for a FIFO, device, socket or directory (opened without
    blocking, so a FIFO nobody writes to cannot hang us), "too_large" for more bytes than the
    limit (at most limit + 1 bytes are read, so /proc files that report size 0 are bounded too),
    and OSError when it cannot be opened or read.
    """
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(name, "not_a_file", (
                f"{name}: {file_kind(st.st_mode)}, not a regular file; nothing was sent. Give an "
                f"audio file, or read the stream into bytes yourself and pass those"))
        if st.st_size > limit.max_bytes:
            raise _too_large(name, limit)
        os.set_blocking(fd, True)
        return _read_at_most(fd, name, limit, None)
    finally:
        os.close(fd)


def read_audio_stream(fd: int, limit: BodyLimit, timeout: float, name: str = "stdin") -> bytes:
    """Everything readable from the open descriptor `fd` up to EOF (a pipe, a FIFO, a device, a
    file), at most `limit.max_bytes` bytes and within `timeout` seconds in all.

    Raises InputError "too_large" past the limit, "timeout" when EOF has not come in time (a
    writer that stalls or never writes), and OSError when `fd` cannot be read (e.g. closed).
    """
    check_timeout(timeout)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size > limit.max_bytes:
        raise _too_large(name, limit)
    return _read_at_most(fd, name, limit, time.monotonic() + timeout, timeout)


def _read_at_most(fd: int, name: str, limit: BodyLimit, deadline: float | None,
                  timeout: float = 0.0) -> bytes:
    """Read `fd` to EOF, at most limit + 1 bytes (raising "too_large" past the limit); with a
    `deadline` (time.monotonic()), wait for data with poll() and raise "timeout" past it."""
    poller = None
    if deadline is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while True:
        if poller is not None and deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                raise InputError(name, "timeout", (
                    f"{name}: the audio did not arrive in full within {timeout:g} s ({total} bytes so "
                    f"far); nothing was sent. Check what writes to it, or raise the timeout (--timeout)"))
        try:
            chunk = os.read(fd, min(_READ_CHUNK, limit.max_bytes + 1 - total))
        except BlockingIOError:  # a non-blocking descriptor that poll() woke us for spuriously
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit.max_bytes:
            raise _too_large(name, limit)


class Client:
    """Talks to one e2vd daemon over its Unix socket, reusing one keep-alive connection.

    socket: socket path; None → instance `instance`'s socket /run/e2vd/NAME.sock, else
    $E2VD_SOCKET, else $E2VD_INSTANCE's socket, else /run/e2vd/e2vd.sock (`e2vd.instances.socket_for`).
    instance: an instance name (`e2vd install --instance NAME`); giving it with `socket`, or a name
    that is not a valid instance name (here or in $E2VD_INSTANCE), raises InstanceNameError (a ValueError).
    timeout: seconds one socket operation (connect, send, waiting for the answer) may take; the
    first answer after a cold start comes only once the model is loaded, so keep it generous
    (finite, > 0, at most MAX_TIMEOUT; ValueError otherwise).
    max_body_bytes: the most bytes read from an audio file; None → `body_limit()`, the daemon's
    configured max_body_bytes on this machine (read when the first file is).
    Not thread-safe: use one Client per thread.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_body_bytes: int | None = None, *, instance: str | None = None) -> None:
        from e2vd.instances import socket_for

        self.socket = socket_for(socket, instance)
        self.timeout = check_timeout(timeout)
        self._limit = None if max_body_bytes is None else BodyLimit(
            int(max_body_bytes), "given as Client(max_body_bytes=...)")
        self._conn: _UnixHTTPConnection | None = None
        #: Connections opened so far (1 when every call reused the first one).
        self.connections_opened = 0

    # -- public API ---------------------------------------------------------------------------

    def recognize(self, audio: str | os.PathLike[str] | bytes | bytearray | memoryview,
                  granularity: str = Granularity.UTTERANCE, embedding: bool = False) -> Recognition:
        """Recognise the emotion in `audio`: a file path (read here, its bytes are sent) or the
        bytes of an audio file (wav, flac, ogg, mp3...). granularity: a `Granularity`,
        "utterance" or "frame" (only changes the embedding's shape; the daemon refuses others).
        Raises ClientError (e.g. code "bad_audio") and DaemonUnreachable; InputError when a file
        is not a regular file or is larger than `body_limit` (nothing is sent then); OSError
        when a local file cannot be read."""
        if isinstance(audio, (bytes, bytearray, memoryview)):
            body = bytes(audio)
        else:
            body = read_audio_file(audio, self.body_limit)
        query = urllib.parse.urlencode({"granularity": str(granularity), "embedding": int(bool(embedding))})
        # Recognition is a pure function of the body: resending it after the connection was
        # closed before any answer byte arrived cannot do anything twice, so it may be retried.
        data = self._request("POST", f"/v1/recognize?{query}", body, idempotent=True)
        try:
            return _recognition().from_json(data)
        except ValueError as e:
            raise ClientError(502, "internal", f"the daemon's answer to POST /v1/recognize is "
                                               f"malformed: {e}") from None

    def health(self) -> dict[str, Any]:
        """GET /v1/health: {"status": "loading"|"ready"}; answers at once, also while loading."""
        return self._request("GET", "/v1/health", None, idempotent=True)

    def status(self) -> dict[str, Any]:
        """GET /v1/status: model, device, dtype, memory, queue depth, requests, uptime, deadlines."""
        return self._request("GET", "/v1/status", None, idempotent=True)

    def warmup(self, hold: float | None = None) -> dict[str, Any]:
        """POST /v1/warmup: wake the daemon and return once the model is ready. `hold`: seconds
        to keep it warm from now (the daemon caps it at its max_hold); None: just wake it."""
        path = "/v1/warmup" if hold is None else "/v1/warmup?" + urllib.parse.urlencode({"hold": _number(hold)})
        # Setting the keep-warm deadline to now+hold twice leaves the same state: idempotent.
        return self._request("POST", path, b"", idempotent=True)

    @property
    def body_limit(self) -> BodyLimit:
        """The most bytes of audio this client reads from a file (see `body_limit()`)."""
        if self._limit is None:
            from e2vd.instances import of_socket

            inst = of_socket(self.socket)   # an instance's socket: its own settings file
            self._limit = body_limit(config_path=None if inst.default else str(inst.config))
        return self._limit

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

        A fresh connection closed without an answer after the daemon took the whole request (a
        clean end of stream: on a Unix socket, a peer that closes with our bytes unread resets
        the connection instead) means the daemon died mid-request: DaemonDied, never retried.
        A request the daemon did not take (reset, or the send itself failed) is retried once.
        """
        for attempt in (1, 2):
            conn, fresh = self._connection()
            try:
                resp = self._exchange(conn, method, path, body)
            except _NotSent as e:
                self.close()
                if attempt == 1:
                    continue
                raise DaemonUnreachable(self.socket, (
                    f"the daemon on {self.socket} closed the connection twice before taking "
                    f"{method} {path.split('?')[0]}; it may be stopping or restarting: check "
                    f"`systemctl status e2vd` and `journalctl -u e2vd`")) from e.__cause__
            except _CLOSED_EARLY as e:
                self.close()
                if fresh and isinstance(e, http.client.RemoteDisconnected):
                    raise DaemonDied(self.socket, (
                        f"the daemon on {self.socket} took {method} {path.split('?')[0]} and closed the "
                        f"connection without answering: it died mid-request (its watchdog ended a stuck "
                        f"inference, or it crashed). Nothing was retried; `journalctl -u e2vd` (or the "
                        f"daemon's stderr) says why. The next request starts a fresh daemon")) from e
                if attempt == 1 and idempotent:
                    continue
                raise DaemonUnreachable(self.socket, (
                    f"the daemon on {self.socket} closed the connection without answering "
                    f"{method} {path.split('?')[0]} ({type(e).__name__}); it may have crashed or "
                    f"restarted: check `journalctl -u e2vd`")) from e
            except http.client.BadStatusLine as e:  # RemoteDisconnected was handled above
                self.close()
                raise DaemonUnreachable(self.socket, (
                    f"what listens on {self.socket} does not speak HTTP (it answered {str(e)[:60]!r}): "
                    f"it is not the e2vd daemon; point --socket / $E2VD_SOCKET at the daemon's "
                    f"socket ({DEFAULT_SOCKET} when systemd runs it)")) from e
            except http.client.HTTPException as e:  # over-long lines, too many headers, cut short
                self.close()
                raise ClientError(502, "internal", (
                    f"the daemon on {self.socket} sent a malformed answer to {method} "
                    f"{path.split('?')[0]} ({type(e).__name__}: {str(e)[:100]})")) from e
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
        sent = True
        try:
            conn.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have refused the request (e.g. 413 too_large) and stopped reading
            # before the whole body was sent: its answer can still be waiting in our buffer.
            sent = False
        try:
            resp = conn.getresponse()
        except _CLOSED_EARLY as e:
            if sent:
                raise
            raise _NotSent() from e
        data = resp.read()  # read fully, so the connection can carry the next request
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, data

    def _decode(self, resp: tuple[int, Mapping[str, str], bytes], method: str, path: str) -> dict[str, Any]:
        status, headers, data = resp
        try:
            doc = json.loads(data) if data else {}
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
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


def _number(value: float) -> str:
    """`value` as a query parameter without losing digits: "32400", "0.25", "1e+17"."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)


def _status_code(status: int) -> str:
    """The error code for an answer that carried no error document (the daemon always sends one,
    so something else answered): the one code `protocol.ERRORS` gives `status`, else the
    HTTP-level "bad_request" for a 4xx status and "internal" for any other."""
    codes = [code for code, (code_status, _) in protocol.ERRORS.items() if code_status == status]
    if len(codes) == 1:
        return codes[0]
    return "bad_request" if 400 <= status < 500 else "internal"
