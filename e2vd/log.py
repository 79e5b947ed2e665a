"""Logging: structured journald events under systemd, readable lines on stderr elsewhere.

Call `setup_logging()` first thing in a process, before anything imports funasr or modelscope:
it puts exactly one handler on the root logger, so funasr's `logging.basicConfig()` (called when
an AutoModel is built) is a no-op and nothing is printed twice. Python warnings are routed
through logging too. modelscope gives its "modelscope" logger a stderr handler of its own when
it is first imported; call `adopt_library_loggers()` after importing it to route that through
the same handler.

Where the lines go (`journald=None` decides automatically): if stderr is the journal stream
systemd gave the process (`$JOURNAL_STREAM` equals stderr's "st_dev:st_ino"), records go to
journald through systemd-python's `journal.send`, one entry per record with fields
MESSAGE (the message; a traceback is appended for exceptions), PRIORITY (syslog level),
SYSLOG_IDENTIFIER=e2vd, LOGGER, THREAD_NAME, CODE_FILE, CODE_LINE, CODE_FUNC,
EXCEPTION_TEXT (only with an exception), E2VD_INSTANCE=<name> on every entry of an
instance's daemon (e2vd@NAME.service sets $E2VD_INSTANCE; absent for the default instance),
and for `event()` calls E2VD_EVENT=<name> plus E2VD_<FIELD>=<value> for each field (field name
upper-cased; None fields are left out; floats rounded to 6 decimals; booleans as true/false),
values as they are (a request path keeps its control bytes there). Otherwise each record is
one line on stderr:

    2026-11-25 09:00:00 INFO e2vd: Recognized 3.2 s of audio: happy (0.81) (event=request request_id=... infer_ms=41.2)

On stderr, control characters (C0, DEL, C1) are written as backslash escapes (`\x1b`, `\t`), so
bytes a client put in a path can neither drive the terminal nor forge a line: everywhere in a
field value, and everywhere but line breaks in the message and traceback.

Query examples: `journalctl -u e2vd E2VD_EVENT=request E2VD_STATUS=500`,
`journalctl E2VD_INSTANCE=small E2VD_EVENT=idle_exit`,
`journalctl -u e2vd -o json | jq 'select(.E2VD_EVENT=="model_loaded") | .E2VD_LOAD_SECONDS'`.

Event names and their fields (journald name = E2VD_ + upper case; durations in seconds carry
"_seconds", milliseconds "_ms", sizes "_bytes"/"_mb"):

    start               pid, socket, socket_activated (true: socket from systemd), model,
                        device (as requested), idle_timeout_seconds
    device_chosen       device ("cpu" | "cuda:N"), reason, gpu_name, free_mb, min_free_mb
    model_loaded        model, device, dtype, load_seconds, memory_bytes (and memory_<key> for
                        each key of Engine.memory(), e.g. memory_param_bytes)
    model_unavailable   model, error, grace_seconds (503 model_unavailable until exit_unavailable)
    exit_unavailable    model, error, grace_seconds (exits non-zero)
    request             request_id, client_uid, client_pid, method, path, status (HTTP status;
                        499 when abandoned), code (error code, only on errors), abandoned (true:
                        the client hung up before its recognition ran; it was not run and
                        nothing was answered), upload ("raw" | "multipart"), chunked (true
                        for a chunked body), body_bytes, audio_seconds, read_ms, decode_ms,
                        wait_ms, queue_ms, infer_ms, total_ms, batch_size, top_label, top_score, hold_seconds (warmup),
                        decided_by (with a fallback_model: "primary" | "fallback", whose result was answered), and when
                        the fallback was asked: fallback_ms, primary_top_label, primary_top_score
                        (the main model's, when the fallback decided), fallback_error (it could not answer)
    fallback_loaded     model, device, load_seconds (the fallback model, loaded on first need)
    fallback_unavailable model, error (the fallback could not be loaded; unsure answers keep the
                        main model's result until the daemon exits)
    keep_warm           hold_seconds, capped (true when cut to max_hold)
    idle_exit           alive_seconds, requests_served, idle_timeout_seconds
    stopping            signal, in_flight, queued (SIGTERM/SIGINT received, draining)
    stopped             signal, alive_seconds, requests_served
    drain_abandoned     in_flight, queued (drain_timeout passed with work unfinished)
    socket_error        socket (the socket could not be bound)
    inference_stuck     jobs, clips, audio_seconds, granularity, device, running_seconds,
                        inference_timeout_seconds, in_flight, queued, alive_seconds,
                        requests_served (a model call past inference_timeout; the process ends)
    config_invalid      error, grace_seconds (settings unusable under socket activation: 503)
    exit_config_invalid error, grace_seconds, refused (exit 2 after the grace period)
    config_fixed        alive_seconds, refused (the settings are usable again: exit 0)
    socket_stale, socket_ignored, socket_extra, accept_failed, memory_probe_failed:
                        operational notices; the message says what happened

`EVENT_FIELDS` holds the same table for code and tests.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping

LOGGER_NAME = "e2vd"
SYSLOG_IDENTIFIER = "e2vd"
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("pid", "socket", "socket_activated", "model", "device", "idle_timeout_seconds"),
    "device_chosen": ("device", "reason", "gpu_name", "free_mb", "min_free_mb"),
    "model_loaded": ("model", "device", "dtype", "load_seconds", "memory_bytes"),
    "model_unavailable": ("model", "error", "grace_seconds"),
    "exit_unavailable": ("model", "error", "grace_seconds"),
    "request": ("request_id", "client_uid", "client_pid", "method", "path", "status", "code",
                "abandoned", "upload", "chunked", "body_bytes", "audio_seconds", "read_ms", "decode_ms", "wait_ms",
                "queue_ms", "infer_ms", "total_ms",
                "batch_size", "top_label", "top_score", "hold_seconds",
                "decided_by", "fallback_ms", "primary_top_label", "primary_top_score", "fallback_error"),
    "keep_warm": ("hold_seconds", "capped"),
    "idle_exit": ("alive_seconds", "requests_served", "idle_timeout_seconds"),
    "stopping": ("signal", "in_flight", "queued"),
    "stopped": ("signal", "alive_seconds", "requests_served"),
    "drain_abandoned": ("in_flight", "queued"),
    "socket_error": ("socket",),
    "inference_stuck": ("jobs", "clips", "audio_seconds", "granularity", "device", "running_seconds",
                        "inference_timeout_seconds", "in_flight", "queued", "alive_seconds",
                        "requests_served"),
    "config_invalid": ("error", "grace_seconds"),
    "exit_config_invalid": ("error", "grace_seconds", "refused"),
    "config_fixed": ("alive_seconds", "refused"),
    "fallback_loaded": ("model", "device", "load_seconds"),
    "fallback_unavailable": ("model", "error"),
}
"""Documented events and their fields; `event()` accepts other names and fields too."""

#: The environment variable naming the instance (e2vd.config.INSTANCE_ENV; this module imports no e2vd).
INSTANCE_ENV = "E2VD_INSTANCE"
_EVENT_ATTR = "e2vd_event"
_FIELDS_ATTR = "e2vd_fields"
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")

Sender = Callable[..., None]


def setup_logging(level: str | int = "INFO", journald: bool | None = None) -> None:
    """Configure the root logger once per process (calling again reconfigures it).

    level: a name (DEBUG, INFO, WARNING, ERROR, CRITICAL; any case) or a logging number.
    journald: True sends records to journald, False writes lines to stderr, None decides by
    `running_under_journald()`. True without systemd-python falls back to stderr and says so.
    """
    numeric = _level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_e2vd", False) or _is_basic_stderr_handler(handler):
            root.removeHandler(handler)
            handler.close()
    use_journald = running_under_journald() if journald is None else journald
    handler: logging.Handler | None = None
    fallback = None
    if use_journald:
        try:
            handler = JournaldHandler()
        except ImportError as err:
            fallback = f"journald logging unavailable ({err}); logging to stderr instead"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    handler._e2vd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    if fallback:
        logging.getLogger(LOGGER_NAME).warning(fallback)


def adopt_library_loggers(names: tuple[str, ...] = ("modelscope", "funasr")) -> None:
    """Remove the handlers libraries attached to their own loggers and let them propagate to
    the root handler set up by `setup_logging` (modelscope adds a stderr handler at import)."""
    for name in names:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True


def running_under_journald(env: Mapping[str, str] | None = None, stderr_fd: int = 2) -> bool:
    """True when stderr is the journal stream systemd connected ($JOURNAL_STREAM "dev:ino"
    equals stderr's st_dev:st_ino), as systemd.exec(5) recommends for choosing native logging."""
    env = os.environ if env is None else env
    stream = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(stderr_fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def event(name: str, message: str, level: int = logging.INFO, **fields: object) -> None:
    """Log `message` as event `name` with structured `fields` on the "e2vd" logger.

    journald gets MESSAGE=message, E2VD_EVENT=name and E2VD_<FIELD>=value; stderr shows
    "message (event=name key=value ...)". Fields whose value is None are left out.
    """
    logging.getLogger(LOGGER_NAME).log(level, message, stacklevel=2,
                                       extra={_EVENT_ATTR: name, _FIELDS_ATTR: fields})


def field_value(value: object) -> str:
    """How a field value is written: floats rounded to 6 decimals, booleans true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 6)) if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def field_name(key: str) -> str:
    """journald field name of an event field: "queue_ms" -> "E2VD_QUEUE_MS" (invalid chars -> _)."""
    return "E2VD_" + _BAD_NAME_CHARS.sub("_", key).upper()


def journal_fields(record: logging.LogRecord, instance: str | None = None) -> dict[str, str]:
    """All journald fields for `record` (MESSAGE included), as sent by JournaldHandler;
    E2VD_INSTANCE=`instance` when an instance name is given."""
    message = record.getMessage()
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "LOGGER": record.name,
        "THREAD_NAME": record.threadName or "",
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    if instance:
        fields["E2VD_INSTANCE"] = instance
    if record.exc_info and record.exc_info[0] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        fields["EXCEPTION_TEXT"] = text
        fields["MESSAGE"] = f"{message}\n{text}"
    name = getattr(record, _EVENT_ATTR, None)
    if name is not None:
        fields["E2VD_EVENT"] = str(name)
        for key, value in (getattr(record, _FIELDS_ATTR, None) or {}).items():
            if value is not None:
                fields[field_name(key)] = field_value(value)
    return fields


class JournaldHandler(logging.Handler):
    """Sends each record to journald with `journal_fields(record, instance)` via `sender`
    (default: systemd-python's `systemd.journal.send`; raises ImportError without it).
    `instance`: the E2VD_INSTANCE field of every entry; None reads $E2VD_INSTANCE now (empty or
    unset: no field; e2vd.config refuses a value that is not an instance name, and a journald field
    holds any bytes as one value)."""

    def __init__(self, level: int = logging.NOTSET, sender: Sender | None = None,
                 instance: str | None = None) -> None:
        super().__init__(level)
        if sender is None:
            from systemd import journal

            sender = journal.send
        self.sender = sender
        self.instance = instance if instance is not None else (os.environ.get(INSTANCE_ENV, "").strip() or None)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = journal_fields(record, self.instance)
            message = fields.pop("MESSAGE")
            fields["CODE_LINE"] = int(fields["CODE_LINE"])  # type: ignore[assignment]
            self.sender(message, **fields)
        except Exception:
            self.handleError(record)


class StderrFormatter(logging.Formatter):
    """"2026-11-25 09:00:00 INFO e2vd: message (event=name key=value ...)"; values with spaces,
    quotes, '=' or control characters are double-quoted. Control characters are escaped
    (`escape_controls`): in field values all of them, in the rest of the record all but "\\n"."""

    def __init__(self) -> None:
        super().__init__(STDERR_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record), keep="\n")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        name = getattr(record, _EVENT_ATTR, None)
        if name is None:
            return line
        pairs = [f"event={_quote(str(name))}"]
        for key, value in (getattr(record, _FIELDS_ATTR, None) or {}).items():
            if value is not None:
                pairs.append(f"{key}={_quote(field_value(value))}")
        return f"{line} ({' '.join(pairs)})"


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_QUOTES = re.compile(r'[\s"=()\\\x00-\x1f\x7f-\x9f]')


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with every C0 control, DEL and C1 control not in `keep` written as a backslash
    escape: "\\n", "\\r", "\\t", else "\\xNN" (ESC -> "\\x1b", CSI U+009B -> "\\x9b")."""
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        return _NAMED_ESCAPES.get(char, f"\\x{ord(char):02x}")

    return _CONTROLS.sub(escape, text)


def _quote(text: str) -> str:
    """A field value for the stderr line: bare when plain, else double-quoted with backslash,
    quote and control characters escaped."""
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _priority(levelno: int) -> int:
    """syslog priority for a logging level: 7 debug, 6 info, 4 warning, 3 error, 2 critical."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    return 2


def _level(level: str | int) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    names = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if isinstance(level, str) and level.strip().upper() in names:
        return getattr(logging, level.strip().upper())
    raise ValueError(f"unknown log level {level!r}; use one of {', '.join(names)}")


def _is_basic_stderr_handler(handler: logging.Handler) -> bool:
    """A handler logging.basicConfig() put there before us (plain StreamHandler on stderr)."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr, sys.__stderr__)
