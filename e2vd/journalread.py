"""Reading e2vd's records from a journal (systemd-python's `journal.Reader`) into `usage.Records`.

Only e2vd's records are read, through journal matches, never a scan of every record:
- the e2vd units: the `_SYSTEMD_UNIT` values named `e2vd.service` or `e2vd@NAME.service`;
- lifecycle events (`E2VD_EVENT` = start, device_chosen, model_loaded, keep_warm, idle_exit,
  stopped, exit_unavailable) of those units, over the whole journal (a few per run);
- `request` events of those units, from the period's start to its end only;
- systemd's records about those units (`MESSAGE_ID` of unit starting / started / process exited /
  deactivated / failed / stopped, `UNIT=`, `_PID=1`), over the whole journal;
- the last record of each boot that had an e2vd start (one seek per boot).
`_SYSTEMD_UNIT` and `_PID` are trusted fields journald sets itself: a user who sends records
with E2VD_ fields or a forged "process exited" message cannot change the report.

`open_journal` raises `JournalError` (a one-line message for the operator) when the journal
cannot be opened or read, e.g. without permission to read the system journal.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from e2vd.timestamps import US
from e2vd.usage import LIFECYCLE_EVENTS, Event, Records, Requests, UnitRecord, instance_of
from e2vd.vocabulary import ExitCode

if TYPE_CHECKING:  # pragma: no cover
    from systemd import journal

UNIT_RE = re.compile(r"e2vd(@[^/\s]+)?\.service")
"""Unit names that are e2vd daemons."""

MESSAGE_IDS = {
    "7d4958e842da4a758f6c1cdc7b36dcc5": "starting",
    "39f53479d3a045ac8e11786248231fbf": "started",
    "98e322203f7a4ed290d09fe03c09fe15": "exited",
    "7ad2d189f7e94e70a38c781354912448": "deactivated",
    "d9b373ed55a64feb8242e02dbe79a49c": "failed",
    "9d1aaa27d60140bd96365438aad20286": "stopped",
}
"""systemd's catalog message ids for unit records -> kind (see systemd's sd-messages.h)."""

SYSTEM_JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")
MAX_FIELD_SECONDS = 1e9    # ~32 years: an E2VD_*_SECONDS value of a lifecycle event beyond it is absurd
MAX_FIELD_VALUE = 1e12     # any numeric field of a request record (ms, s, uid, status) beyond it is absurd
PARALLEL_FROM_S = 3 * 86400
"""Periods longer than this have their requests read by several processes (one per CPU, <= 4)."""


class JournalError(Exception):
    """The journal cannot be opened or read; the message says why and what to do."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class JournalSource:
    """Which journal to read: `files`, else the journal files in `directory`, else the system
    journal. `open()` checks it can be read (JournalError otherwise) and returns a Reader."""

    directory: str | None = None
    files: tuple[str, ...] = ()

    def __str__(self) -> str:
        return ", ".join(self.files) if self.files else self.directory or "system journal"

    def open(self) -> "journal.Reader":
        return open_journal(self.directory, self.files)


def open_journal(directory: str | None = None, files: Sequence[str] = ()) -> "journal.Reader":
    """A Reader on `files`, or the journal files in `directory`, or the system journal."""
    try:
        from systemd import journal
    except ImportError as exc:
        raise JournalError(f"cannot read the journal: systemd-python is missing ({exc}); "
                           "pip install systemd-python") from None
    try:
        if files:
            for f in files:
                _check_readable(Path(f), "journal file")
            try:
                return journal.Reader(files=list(files))
            except OSError as exc:
                raise JournalError(f"cannot read the journal file {', '.join(files)[:300]}: {exc.strerror or exc} "
                                   "(not a journal file, or a truncated or damaged one; `journalctl --verify "
                                   "--file FILE` says which)") from None
        if directory:
            d = Path(directory)
            if not d.is_dir():
                raise JournalError(f"cannot read the journal: {directory} is not a directory")
            found = list(d.rglob("*.journal")) + list(d.rglob("*.journal~"))
            if not found:
                raise JournalError(f"cannot read the journal: no journal files in {directory}")
            if not any(_readable(p) for p in found):
                raise JournalError(f"cannot read the journal in {directory}: permission denied "
                                   "(run as root or as a member of group systemd-journal or adm)")
            return journal.Reader(path=directory)
        _check_system_journal()
        return journal.Reader(flags=journal.SYSTEM_ONLY)
    except OSError as exc:
        raise JournalError(f"cannot read the journal: {exc.strerror or exc}") from None


def _check_readable(path: Path, what: str) -> None:
    try:
        path.stat()
    except FileNotFoundError:
        raise JournalError(f"cannot read the journal: {what} {path} does not exist") from None
    except PermissionError:
        raise JournalError(f"cannot read the journal: {path}: permission denied (a directory above it "
                           "may not be searchable for you)") from None
    if not _readable(path):
        raise JournalError(f"cannot read the journal: {path}: permission denied "
                           "(run as root or as a member of group systemd-journal or adm)")


def _readable(path: Path) -> bool:
    return os.access(path, os.R_OK)


def _check_system_journal() -> None:
    """The system journal's files exist and some are readable, else JournalError (sd-journal
    itself silently skips files it may not read, which would look like a quiet month)."""
    files = [p for d in SYSTEM_JOURNAL_DIRS if Path(d).is_dir()
             for p in Path(d).glob("*/system*.journal*")]
    if not files:
        raise JournalError("cannot read the journal: no system journal in /var/log/journal or "
                           "/run/log/journal (is systemd-journald running here?); use --directory or --file")
    if not any(_readable(p) for p in files):
        raise JournalError(f"cannot read the system journal ({files[0]}: permission denied): run as root "
                           "or as a member of group systemd-journal or adm (usermod -aG systemd-journal USER)")


def e2vd_units(reader: "journal.Reader") -> list[str]:
    """The e2vd unit names this journal has records of (processes or PID 1's unit records)."""
    names: set[str] = set()
    for field in ("_SYSTEMD_UNIT", "UNIT"):
        try:
            values = reader.query_unique(field)
        except OSError:
            continue
        names.update(v for v in values if isinstance(v, str) and UNIT_RE.fullmatch(v))
    return sorted(names)


def read_records(source: JournalSource, since: int, until: int, units: Sequence[str] | None = None,
                 now: int | None = None, workers: int | None = None) -> Records:
    """e2vd's records (module docstring); requests logged in [since, until) µs. `units`: the
    e2vd units to read (default: all found). `workers`: processes that read the requests, each
    a slice of the period (default: one per CPU, at most 4, for periods over PARALLEL_FROM_S)."""
    reader = source.open()
    try:
        return _read(source, reader, since, until, units, now, workers)
    except OSError as exc:
        raise JournalError(f"cannot read the journal: {exc.strerror or exc}") from None
    finally:
        reader.close()


def _read(source: JournalSource, reader: Any, since: int, until: int, units: Sequence[str] | None,
          now: int | None, workers: int | None) -> Records:
    records = Records(now=now if now is not None else round(time.time() * US), current_boot=_boot_id())
    reader.flush_matches()
    reader.seek_head()
    if reader._next():
        records.first = reader._get_realtime()
    units = list(units) if units is not None else e2vd_units(reader)
    if not units:
        return records
    get, realtime, nxt = reader._get, reader._get_realtime, reader._next

    def opt(name: str) -> str | None:
        try:
            return get(name).decode("utf-8", "replace")
        except KeyError:
            return None

    def optfloat(name: str) -> float | None:
        try:
            value = float(get(name))
        except (KeyError, ValueError):
            return None
        if not 0 <= value <= MAX_FIELD_SECONDS:   # NaN, inf, negative, absurd: as if missing
            records.ignored[name] = records.ignored.get(name, 0) + 1
            return None
        return value

    # requests of the period: slices read by worker processes meanwhile
    with_instance = _has_field(reader, "E2VD_INSTANCE")
    n = workers if workers is not None else (min(4, len(os.sched_getaffinity(0)))
                                             if until - since > PARALLEL_FROM_S * US else 1)
    cuts = [since + (until - since) * i // max(1, n) for i in range(max(1, n))] + [until]
    pending, pool = [], None
    if n > 1:
        try:
            pool = concurrent.futures.ProcessPoolExecutor(n - 1, mp_context=multiprocessing.get_context("fork"))
            pending = [pool.submit(_requests_slice, source, cuts[i], cuts[i + 1], units, with_instance)
                       for i in range(1, n)]
        except (OSError, ValueError):
            pool, pending, cuts = None, [], [since, until]

    # lifecycle events, whole journal
    _match(reader, "E2VD_EVENT", LIFECYCLE_EVENTS, "_SYSTEMD_UNIT", units)
    reader.seek_head()
    while nxt():
        try:
            name = get("E2VD_EVENT").decode()
            boot = get("_BOOT_ID").decode()
            pid = int(get("_PID"))
        except (KeyError, ValueError):
            continue
        unit = opt("_SYSTEMD_UNIT")
        e = Event(realtime(), boot, pid, unit, instance_of(unit, opt("E2VD_INSTANCE")),
                  opt("_SYSTEMD_INVOCATION_ID"), name)
        if name in ("start", "device_chosen", "model_loaded"):
            e.device = opt("E2VD_DEVICE")
            if name == "start":
                e.idle_timeout_s = optfloat("E2VD_IDLE_TIMEOUT_SECONDS")
        elif name == "keep_warm":
            e.hold_s = optfloat("E2VD_HOLD_SECONDS")
        elif name in ("idle_exit", "stopped"):
            e.alive_s = optfloat("E2VD_ALIVE_SECONDS")
        records.events.append(e)

    # systemd's records about the units, whole journal
    _match(reader, "MESSAGE_ID", tuple(MESSAGE_IDS), "UNIT", units)
    reader.add_match("_PID=1")
    reader.seek_head()
    while nxt():
        try:
            kind = MESSAGE_IDS[get("MESSAGE_ID").decode()]
            records.unit_records.append(UnitRecord(realtime(), get("_BOOT_ID").decode(), get("UNIT").decode(),
                                                   opt("INVOCATION_ID"), kind))
        except (KeyError, ValueError):
            continue

    # requests: the first slice here, then the workers' slices
    _match(reader, "E2VD_EVENT", ("request",), "_SYSTEMD_UNIT", units)
    reader.seek_realtime(cuts[0])
    parts = [_read_requests(reader, cuts[0], cuts[1], units, with_instance)]
    try:
        for job in pending:
            parts.append(job.result())
    except (OSError, concurrent.futures.process.BrokenProcessPool) as exc:   # read them here instead
        parts = [parts[0]]
        for i in range(1, len(cuts) - 1):
            _match(reader, "E2VD_EVENT", ("request",), "_SYSTEMD_UNIT", units)
            reader.seek_realtime(cuts[i])
            parts.append(_read_requests(reader, cuts[i], cuts[i + 1], units, with_instance))
        del exc
    finally:
        if pool is not None:
            pool.shutdown()
    records.requests = Requests.concat(parts)

    # the last record of each boot that had an e2vd start
    for boot in sorted({e.boot for e in records.events if e.name == "start"}):
        reader.flush_matches()
        reader.add_match(f"_BOOT_ID={boot}")
        reader.seek_tail()
        if reader._previous():
            records.boot_ends[boot] = realtime()
    reader.flush_matches()
    return records


def _match(reader: Any, field: str, values: Sequence[str], unit_field: str, units: Sequence[str]) -> None:
    """Matches: field is one of `values` AND unit_field is one of `units`."""
    reader.flush_matches()
    for v in values:
        reader.add_match(f"{field}={v}")
    for u in units:
        reader.add_match(f"{unit_field}={u}")


def _has_field(reader: Any, name: str) -> bool:
    try:
        return bool(reader.query_unique(name))
    except OSError:
        return True


def _requests_slice(source: JournalSource, since: int, until: int, units: Sequence[str],
                    with_instance: bool) -> Requests:
    """In a worker process: the requests logged in [since, until)."""
    reader = source.open()
    try:
        _match(reader, "E2VD_EVENT", ("request",), "_SYSTEMD_UNIT", units)
        reader.seek_realtime(since)
        return _read_requests(reader, since, until, units, with_instance)
    finally:
        reader.close()


CHUNK = 8192
_FLOAT_FIELDS = {"total_ms": "E2VD_TOTAL_MS", "queue_ms": "E2VD_QUEUE_MS", "audio_s": "E2VD_AUDIO_SECONDS",
                 "infer_ms": "E2VD_INFER_MS"}


def _is_warmup(paths: dict[bytes, int], code: int) -> bool:
    return next(p for p, c in paths.items() if c == code) == b"/v1/warmup"


def _read_requests(reader: Any, since: int, until: int, units: Sequence[str], has_instance_field: bool) -> Requests:
    """The matched `request` entries logged in [since, until), as columns."""
    nxt, get_all, realtime = reader._next, reader._get_all, reader._get_realtime
    paths: dict[bytes, int] = {}
    instances: dict[tuple[bytes, bytes], int] = {}
    names: list[str] = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", "instance", "status", "path", "uid", "batch",
                                                          "hold_s", *_FLOAT_FIELDS)}
    warmup_codes: dict[int, bool] = {}
    done = False
    while not done:
        ts: list[int] = []
        entries: list[dict[str, Any]] = []
        while len(ts) < CHUNK:
            if not nxt():
                done = True
                break
            t = realtime()
            if t >= until:
                done = True
                break
            if t >= since:
                ts.append(t)
                entries.append(get_all())
        if not ts:
            break
        cols["ts"].append(np.array(ts, dtype=np.int64))
        cols["status"].append(_ints([e.get("E2VD_STATUS") for e in entries], 0))
        cols["uid"].append(_ints([e.get("E2VD_CLIENT_UID") for e in entries], -1))
        cols["batch"].append(_ints([e.get("E2VD_BATCH_SIZE") for e in entries], 1))
        for key, name in _FLOAT_FIELDS.items():
            cols[key].append(_floats([e.get(name) for e in entries]))
        try:
            codes = [paths.setdefault(e.get("E2VD_PATH", b""), len(paths)) for e in entries]
        except TypeError:           # a field repeated in an entry: its first value
            codes = [paths.setdefault(_one(e.get("E2VD_PATH", b"")), len(paths)) for e in entries]
        cols["path"].append(np.array(codes, dtype=np.int32))
        hold = np.zeros(len(entries))
        for i in (i for i, c in enumerate(codes) if warmup_codes.setdefault(c, _is_warmup(paths, c))):
            hold[i] = _float(entries[i].get("E2VD_HOLD_SECONDS"))
        cols["hold_s"].append(hold)
        if len(units) > 1 or has_instance_field:
            idx = []
            for k in ((_one(e.get("_SYSTEMD_UNIT", b"")), _one(e.get("E2VD_INSTANCE", b""))) for e in entries):
                i = instances.get(k)
                if i is None:
                    name = instance_of(k[0].decode("utf-8", "replace") or None, k[1].decode("utf-8", "replace") or None)
                    if name not in names:
                        names.append(name)
                    i = instances[k] = names.index(name)
                idx.append(i)
            cols["instance"].append(np.array(idx, dtype=np.int32))
        else:
            if not names:
                names.append(instance_of(units[0]))
            cols["instance"].append(np.zeros(len(entries), dtype=np.int32))

    def cat(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(cols[key]).astype(dtype) if cols[key] else np.zeros(0, dtype=dtype)

    path_names = [p.decode("utf-8", "replace") for p in paths]
    recognize = np.array([p == "/v1/recognize" for p in path_names] + [False], dtype=bool)
    path = cat("path", np.int32)
    is_rec = recognize[path] if len(path) else np.zeros(0, dtype=bool)
    batch = np.maximum(cat("batch", np.int64), 1)
    infer = np.where(is_rec, np.nan_to_num(cat("infer_ms", np.float64)) / 1000.0 / batch, 0.0)
    queue_us = np.where(is_rec, np.round(np.nan_to_num(cat("queue_ms", np.float64)) * 1000), 0).astype(np.int64)
    return Requests(cat("ts", np.int64), cat("instance", np.int32), cat("status", np.int32), path,
                    cat("uid", np.int64), np.round(np.nan_to_num(cat("total_ms", np.float64)) * 1000).astype(np.int64),
                    queue_us, np.where(is_rec, np.nan_to_num(cat("audio_s", np.float64)), 0.0), infer,
                    np.nan_to_num(cat("hold_s", np.float64)), path_names, names).sorted()


def _one(value: Any) -> bytes:
    """A field's value; the first when the field is repeated in an entry."""
    if isinstance(value, list):
        return value[0] if value else b""
    return value


def _floats(values: list[Any]) -> np.ndarray:
    """Field values (bytes, None when missing) as floats; missing, malformed or out of range
    (not within 0 to MAX_FIELD_VALUE: NaN, inf, negative, absurd) -> NaN."""
    try:
        out = np.array([_NAN if v is None else float(v) for v in values], dtype=np.float64)
    except (ValueError, TypeError):       # a malformed value, or a field repeated in an entry
        out = np.array([_float(v) for v in values], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out[~((out >= 0) & (out <= MAX_FIELD_VALUE))] = _NAN
    return out


_NAN = float("nan")


def _float(v: Any) -> float:
    try:
        value = float(_one(v))
    except (TypeError, ValueError):
        return float("nan")
    return value if 0 <= value <= MAX_FIELD_VALUE else float("nan")


def _ints(values: list[Any], default: int) -> np.ndarray:
    """Field values as integers; missing or malformed -> `default`."""
    f = _floats(values)
    out = np.where(np.isfinite(f), f, default)
    return out.astype(np.int64)


def _boot_id() -> str | None:
    """This machine's current boot id (as the journal writes it), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        return None
