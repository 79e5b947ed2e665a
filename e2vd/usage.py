"""e2vd's journal records added up: daemon runs, requests, and their totals over a period.

Pure functions over plain records (the many request events as numpy columns, `Requests`):
reading them from a journal is `e2vd.journalread`, replaying them against other settings
`e2vd.whatif`, printing them `e2vd.report`.

Units: every point in time is an integer number of microseconds since the Unix epoch (the
journal's own resolution), so cuts at the period's and the days' boundaries are exact. Durations
in results are microseconds in fields named `*_us`, seconds in `*_s`, hours only where a name
says so. Days are local days (the TZ environment variable applies), from midnight to midnight,
so a day has 23 or 25 hours where daylight saving time begins or ends.

A run is one daemon process: held from its `start` event to its exit event (`idle_exit`,
`stopped`, `exit_unavailable`); that is the time the daemon reports as `alive_seconds`. Its device
is the one `model_loaded` names, else `device_chosen`'s, else the one `start` asked for when that
was `cpu` or `cuda:N`, else "unknown"; a run on `cuda:N` holds a GPU, one on `cpu` does not. The
fallback model's own `device_chosen` (after `model_loaded`) changes that only when it puts a CPU
run on a GPU (the whole run then counts as held on it).
A run without an exit event (SIGKILL, OOM kill, power loss) "ended abnormally" and is closed by
the first of these that exists:
1. systemd's own record that the unit's process exited, or the unit was deactivated, failed or
   stopped (same invocation id; for records without one, the first on the same boot after the
   run's start and before the next run's);
2. the next start of the same unit on the same boot;
3. still running: the run is on the running machine's current boot, so it is held up to now;
4. the last record of its boot in the journal (the last moment the machine is known to have run).
A run whose start event is gone from the journal (rotated away) but whose exit event carries
`alive_seconds` is rebuilt from it.
"""
from __future__ import annotations

import bisect
import datetime as _dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from e2vd.timestamps import US, Period

LIFECYCLE_EVENTS = ("start", "device_chosen", "model_loaded", "keep_warm", "idle_exit", "stopped",
                    "exit_unavailable")
"""The e2vd events a run is built from (the `request` events are read apart: there are many)."""

EXIT_EVENTS = {"idle_exit": "idle", "stopped": "stopped", "exit_unavailable": "unavailable"}
"""Exit event -> how the run ended."""

UNIT_END_KINDS = ("exited", "deactivated", "failed", "stopped")
"""Kinds of systemd unit record that mean the unit's process is gone."""

DEFAULT_INSTANCE = "e2vd"


def instance_of(unit: str | None, explicit: str | None = None) -> str:
    """The instance a record belongs to: its E2VD_INSTANCE field, else its unit without
    ".service" ("e2vd.service" -> "e2vd", "e2vd@b.service" -> "e2vd@b"), else "e2vd"."""
    if explicit:
        return explicit
    if unit:
        return unit[: -len(".service")] if unit.endswith(".service") else unit
    return DEFAULT_INSTANCE


def is_gpu(device: str) -> bool:
    """Whether a device name is a GPU ("cuda", "cuda:N")."""
    return device == "cuda" or device.startswith("cuda:")


# --- records, as the journal has them --------------------------------------------------------

@dataclass(slots=True)
class Event:
    """One e2vd lifecycle event (see LIFECYCLE_EVENTS)."""

    ts: int                           # µs since the epoch
    boot: str
    pid: int
    unit: str | None
    instance: str
    invocation: str | None
    name: str
    device: str | None = None         # start (as asked), device_chosen, model_loaded
    idle_timeout_s: float | None = None   # start
    hold_s: float | None = None       # keep_warm: seconds granted
    alive_s: float | None = None      # idle_exit, stopped


RECOGNIZE, WARMUP = "/v1/recognize", "/v1/warmup"


@dataclass
class Requests:
    """The `request` events, one numpy array per field (an event is logged when its answer has
    been sent). Strings are stored once: `path[i]` indexes `paths`, `instance[i]` `instances`.

    ts        int64    µs: when it was logged (the request's end)
    instance  int32    index into `instances`
    status    int32    HTTP status
    path      int32    index into `paths`
    uid       int64    the client's uid (peer credentials); -1 when not known
    total_us  int64    from the first byte read to the answer sent
    queue_us  int64    waiting for the model or the worker (recognitions; else 0)
    audio_s   float64  seconds of audio recognised (0 when none)
    infer_s   float64  its share of its batch's inference: infer_ms / batch_size / 1000
    hold_s    float64  warmup: keep-warm seconds granted (0 when none)
    """

    ts: np.ndarray
    instance: np.ndarray
    status: np.ndarray
    path: np.ndarray
    uid: np.ndarray
    total_us: np.ndarray
    queue_us: np.ndarray
    audio_s: np.ndarray
    infer_s: np.ndarray
    hold_s: np.ndarray
    paths: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def begin(self) -> np.ndarray:
        """µs: when the daemon began reading each request."""
        return self.ts - self.total_us

    @classmethod
    def empty(cls) -> "Requests":
        return cls.from_rows([])

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, object]]) -> "Requests":
        """From dicts with the field names above, `path` and `instance` as strings (`ts` required;
        missing fields take their "none" value; `instance` defaults to "e2vd")."""
        paths: dict[str, int] = {}
        insts: dict[str, int] = {}

        def col(name: str, default: object, dtype: object) -> np.ndarray:
            return np.array([r.get(name, default) for r in rows], dtype=dtype)

        path_idx = [paths.setdefault(str(r.get("path", "")), len(paths)) for r in rows]
        inst_idx = [insts.setdefault(str(r.get("instance", DEFAULT_INSTANCE)), len(insts)) for r in rows]
        req = cls(col("ts", 0, np.int64), np.array(inst_idx, np.int32), col("status", 0, np.int32),
                  np.array(path_idx, np.int32), col("uid", -1, np.int64), col("total_us", 0, np.int64),
                  col("queue_us", 0, np.int64), col("audio_s", 0.0, np.float64), col("infer_s", 0.0, np.float64),
                  col("hold_s", 0.0, np.float64), list(paths), list(insts))
        return req.sorted()

    def sorted(self) -> "Requests":
        """The same requests ordered by `ts` (stable)."""
        order = np.argsort(self.ts, kind="stable")
        if len(order) and (order == np.arange(len(order))).all():
            return self
        return Requests(*(getattr(self, n)[order] for n in _COLUMNS), paths=self.paths, instances=self.instances)

    @classmethod
    def concat(cls, parts: Sequence["Requests"]) -> "Requests":
        """One set of requests from several (their string tables merged), ordered by `ts`."""
        if len(parts) == 1:
            return parts[0]
        paths: list[str] = []
        insts: list[str] = []
        cols: dict[str, list[np.ndarray]] = {n: [] for n in _COLUMNS}
        for part in parts:
            path_map = np.array([_index(paths, p) for p in part.paths] + [0], dtype=np.int32)
            inst_map = np.array([_index(insts, n) for n in part.instances] + [0], dtype=np.int32)
            for n in _COLUMNS:
                col = getattr(part, n)
                cols[n].append(path_map[col] if n == "path" else inst_map[col] if n == "instance" else col)
        return cls(*(np.concatenate(cols[n]) for n in _COLUMNS), paths=paths, instances=insts).sorted()

    def select(self, mask: np.ndarray) -> "Requests":
        return Requests(*(getattr(self, n)[mask] for n in _COLUMNS), paths=self.paths, instances=self.instances)

    def path_is(self, path: str) -> np.ndarray:
        """Boolean mask of the requests to `path`."""
        try:
            return self.path == self.paths.index(path)
        except ValueError:
            return np.zeros(len(self.ts), dtype=bool)

    def of_instances(self, names: Iterable[str]) -> np.ndarray:
        """Boolean mask of the requests of these instances."""
        wanted = [i for i, n in enumerate(self.instances) if n in set(names)]
        return np.isin(self.instance, np.array(wanted, dtype=np.int32))


def _index(table: list[str], value: str) -> int:
    if value not in table:
        table.append(value)
    return table.index(value)


_COLUMNS = ("ts", "instance", "status", "path", "uid", "total_us", "queue_us", "audio_s", "infer_s", "hold_s")


@dataclass(slots=True)
class UnitRecord:
    """A record of systemd (PID 1) about an e2vd unit."""

    ts: int
    boot: str
    unit: str
    invocation: str | None
    kind: str               # "starting", "started", "exited", "deactivated", "failed", "stopped"


@dataclass
class Records:
    """Everything the report needs from a journal. `events` and `unit_records` cover the whole
    journal; `requests` at least the period. `boot_ends`: µs of the last record of each boot
    (at least of every boot with an e2vd start); `current_boot`: this machine's boot id, if
    known; `now`: µs when the journal was read; `first`: µs of the journal's first record."""

    events: list[Event] = field(default_factory=list)
    requests: Requests = field(default_factory=lambda: Requests.empty())
    unit_records: list[UnitRecord] = field(default_factory=list)
    boot_ends: dict[str, int] = field(default_factory=dict)
    current_boot: str | None = None
    now: int = 0
    first: int | None = None
    ignored: dict[str, int] = field(default_factory=dict)   # field -> values out of range, read as missing


# --- runs --------------------------------------------------------------------------------------

@dataclass
class Run:
    """One daemon process (module docstring): held from `start` to `end` (µs)."""

    instance: str
    unit: str | None
    boot: str
    pid: int
    invocation: str | None
    start: int
    end: int = 0
    device: str = "unknown"
    ended: str = "abnormal"     # "idle", "stopped", "unavailable", "abnormal", "running"
    closed_by: str = ""         # "e2vd", "systemd", "next start", "now", "end of boot"
    connect: int | None = None  # µs of systemd's "Starting" record: when it was asked for
    ready: int | None = None    # µs of model_loaded
    idle_timeout_s: float | None = None
    holds: list[tuple[int, int]] = field(default_factory=list)   # keep-warm (from, until) µs

    @property
    def gpu(self) -> bool:
        return is_gpu(self.device)

    @property
    def held_us(self) -> int:
        return self.end - self.start


def build_runs(records: Records) -> list[Run]:
    """The runs in `records`, oldest first, each closed as the module docstring says."""
    runs: list[Run] = []
    open_runs: dict[tuple[str, int], Run] = {}
    seen: dict[tuple[str, int], list[Event]] = {}    # events of a process whose start is gone
    for e in sorted(records.events, key=lambda e: e.ts):
        key = (e.boot, e.pid)
        if e.name == "start":
            open_runs.pop(key, None)       # a pid reused on the same boot: the old run stays open
            asked = e.device if e.device and (e.device == "cpu" or is_gpu(e.device)) else None
            run = Run(e.instance, e.unit, e.boot, e.pid, e.invocation, e.ts, device=asked or "unknown",
                      idle_timeout_s=e.idle_timeout_s)
            open_runs[key] = run
            runs.append(run)
            continue
        run = open_runs.get(key)
        if run is None:
            if e.name in EXIT_EVENTS and e.alive_s is not None:
                run = Run(e.instance, e.unit, e.boot, e.pid, e.invocation, e.ts - round(e.alive_s * US))
                for earlier in seen.pop(key, []):
                    _apply(run, earlier)
                runs.append(run)
            else:
                seen.setdefault(key, []).append(e)
                continue
        _apply(run, e)
        if e.name in EXIT_EVENTS:
            open_runs.pop(key, None)
    runs.sort(key=lambda r: r.start)
    _connect_and_close(runs, records)
    return runs


def _apply(run: Run, e: Event) -> None:
    if e.name in ("device_chosen", "model_loaded") and e.device:
        # the main model's device (its device_chosen, then its model_loaded); a choice after the
        # model loaded is the fallback model's, which counts only when it puts a CPU run on a GPU
        if run.ready is None or (e.device.startswith("cuda") and not (run.device or "").startswith("cuda")):
            run.device = e.device
        if e.name == "model_loaded":
            run.ready = e.ts
    elif e.name == "keep_warm" and e.hold_s:
        run.holds.append((e.ts, e.ts + round(e.hold_s * US)))
    elif e.name in EXIT_EVENTS:
        run.end, run.ended, run.closed_by = e.ts, EXIT_EVENTS[e.name], "e2vd"


def _connect_and_close(runs: list[Run], records: Records) -> None:
    """Find each run's "Starting" record and close the runs without an exit event."""
    starting: dict[str, int] = {}
    starting_loose: dict[tuple[str, str], list[int]] = {}
    ends: dict[str, int] = {}
    ends_loose: dict[tuple[str, str], list[int]] = {}
    for u in records.unit_records:
        if u.kind == "starting":
            if u.invocation:
                starting.setdefault(u.invocation, u.ts)
            else:
                starting_loose.setdefault((u.boot, u.unit), []).append(u.ts)
        elif u.kind in UNIT_END_KINDS:
            if u.invocation:
                ends[u.invocation] = min(ends.get(u.invocation, u.ts), u.ts)
            else:
                ends_loose.setdefault((u.boot, u.unit), []).append(u.ts)
    for lst in (*starting_loose.values(), *ends_loose.values()):
        lst.sort()
    by_unit: dict[tuple[str, str | None], list[Run]] = {}
    for run in runs:
        by_unit.setdefault((run.boot, run.unit), []).append(run)
    for same in by_unit.values():
        for i, run in enumerate(same):
            prev_start = same[i - 1].start if i else None
            next_start = same[i + 1].start if i + 1 < len(same) else None
            if run.invocation and run.invocation in starting:
                run.connect = starting[run.invocation]
            elif run.unit:
                run.connect = _last_between(starting_loose.get((run.boot, run.unit), []), prev_start, run.start)
            if run.closed_by:
                continue
            end = None
            if run.invocation and run.invocation in ends and ends[run.invocation] >= run.start:
                end = ends[run.invocation]
            elif run.unit:
                end = _first_between(ends_loose.get((run.boot, run.unit), []), run.start, next_start)
            if end is not None:
                run.end, run.closed_by = end, "systemd"
            elif next_start is not None:
                run.end, run.closed_by = next_start, "next start"
            elif records.current_boot is not None and run.boot == records.current_boot:
                run.end, run.ended, run.closed_by = max(records.now, run.start), "running", "now"
            else:
                run.end, run.closed_by = max(records.boot_ends.get(run.boot, run.start), run.start), "end of boot"


def _last_between(sorted_ts: Sequence[int], after: int | None, until: int) -> int | None:
    """The last of `sorted_ts` in (after, until], or None."""
    i = bisect.bisect_right(sorted_ts, until)
    if i and (after is None or sorted_ts[i - 1] > after):
        return sorted_ts[i - 1]
    return None


def _first_between(sorted_ts: Sequence[int], after: int, before: int | None) -> int | None:
    """The first of `sorted_ts` in [after, before), or None."""
    i = bisect.bisect_left(sorted_ts, after)
    if i < len(sorted_ts) and (before is None or sorted_ts[i] < before):
        return sorted_ts[i]
    return None


def run_of(requests: Requests, runs: Sequence[Run]) -> np.ndarray:
    """For each request, the index in `runs` of the run that logged it, or -1: the run of the same
    instance that was held at that moment (an instance runs one daemon at a time)."""
    out = np.full(len(requests), -1, dtype=np.int64)
    if not len(requests) or not runs:
        return out
    by_instance: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        by_instance.setdefault(run.instance, []).append(i)
    for k, name in enumerate(requests.instances):
        mine = sorted(by_instance.get(name, []), key=lambda i: runs[i].start)
        if not mine:
            continue
        sel = np.nonzero(requests.instance == k)[0]
        ts = requests.ts[sel]
        starts = np.array([runs[i].start for i in mine], dtype=np.int64)
        ends = np.array([runs[i].end for i in mine], dtype=np.int64)
        pos = np.searchsorted(starts, ts, side="right") - 1
        ok = (pos >= 0) & (ts <= ends[np.maximum(pos, 0)])
        out[sel[ok]] = np.array(mine, dtype=np.int64)[pos[ok]]
    return out


# --- the period and its days ---------------------------------------------------------------------

def overlap(a: int, b: int, lo: int, hi: int) -> int:
    """Length of [a, b) ∩ [lo, hi) (0 when they do not meet)."""
    return max(0, min(b, hi) - max(a, lo))


def merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of [from, to) intervals, sorted and disjoint."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


# --- totals --------------------------------------------------------------------------------------

@dataclass
class Day:
    """One local day of the period (times cut to the period)."""

    date: _dt.date
    start: int
    end: int
    held_us: dict[str, int] = field(default_factory=dict)   # device -> µs held
    requests: int = 0
    audio_s: float = 0.0
    infer_s: float = 0.0
    cold_starts: int = 0
    keep_warm_us: int = 0

    @property
    def gpu_held_us(self) -> int:
        return sum(v for d, v in self.held_us.items() if is_gpu(d))


@dataclass
class UserUse:
    """Requests of one client uid (None: not known)."""

    uid: int | None
    requests: int = 0
    recognitions: int = 0
    audio_s: float = 0.0


@dataclass
class Usage:
    """The totals of one period (for one instance, or all of them). Request totals count the
    request events logged within the period; held time is cut exactly at its ends."""

    period: Period
    instances: list[str]
    runs: list[Run]                      # the runs that overlap the period
    held_us: dict[str, int]              # device -> µs held within the period
    days: list[Day]
    requests_by_status: dict[int, int]
    recognitions: int                    # POST /v1/recognize answered 200
    audio_s: float
    infer_s: float                       # inference seconds (each request's share of its batch)
    gpu_infer_s: float                   # the same, on runs that held a GPU
    keep_warm_us: int                    # time held by keep-warm holds (within runs and the period)
    cold_starts: int                     # runs started within the period
    connect_to_ready_s: list[float]      # per cold start whose "Starting" record and model_loaded are known
    start_delay_s: list[float]           # per cold start: "Starting" record -> start event
    load_s: list[float]                  # per cold start: start event -> model_loaded
    users: dict[int | None, UserUse]
    idle_timeouts_s: list[float]         # idle_timeout of each run started within the period

    @property
    def requests(self) -> int:
        return sum(self.requests_by_status.values())

    @property
    def gpu_held_us(self) -> int:
        return sum(v for d, v in self.held_us.items() if is_gpu(d))

    @property
    def ended_abnormally(self) -> int:
        return sum(1 for r in self.runs if r.ended == "abnormal")

    @property
    def still_running(self) -> int:
        return sum(1 for r in self.runs if r.ended == "running")

    @property
    def endings(self) -> dict[str, int]:
        return dict(Counter(r.ended for r in self.runs))

    @property
    def gpu_busy_percent(self) -> float | None:
        """Inference seconds on GPU runs as a share of GPU-held time, or None without GPU time."""
        held = self.gpu_held_us / US
        return 100.0 * self.gpu_infer_s / held if held > 0 else None

    @property
    def active(self) -> bool:
        """Whether anything of e2vd happened in the period."""
        return bool(self.runs or self.requests)


def summarize(runs: Sequence[Run], requests: Requests, period: Period,
              instances: Sequence[str] | None = None) -> Usage:
    """The totals of `runs` and `requests` within `period` (only those of `instances`, if given)."""
    if instances is not None:
        wanted = set(instances)
        runs = [r for r in runs if r.instance in wanted]
        requests = requests.select(requests.of_instances(wanted))
    since, until = period.since, period.until
    days = [Day(d, lo, hi) for d, lo, hi in period.days()]
    bounds = [d.start for d in days]
    held: Counter[str] = Counter()
    keep_warm = 0
    inside: list[Run] = []
    cold = 0
    c2r: list[float] = []
    delays: list[float] = []
    loads: list[float] = []
    timeouts: list[float] = []
    for run in runs:
        if not (run.start < until and run.end > since) and not (run.start == run.end and since <= run.start < until):
            continue
        inside.append(run)
        lo, hi = max(run.start, since), min(run.end, until)
        held[run.device] += max(0, hi - lo)
        for day in _days_of(days, bounds, lo, hi):
            day.held_us[run.device] = day.held_us.get(run.device, 0) + overlap(lo, hi, day.start, day.end)
        for a, b in merge((h0, min(h1, run.end)) for h0, h1 in run.holds):
            for day in _days_of(days, bounds, max(a, since), min(b, until)):
                part = overlap(a, b, day.start, day.end)
                day.keep_warm_us += part
                keep_warm += part
        if since <= run.start < until:
            cold += 1
            days[_day_index(bounds, run.start)].cold_starts += 1
            if run.idle_timeout_s is not None:
                timeouts.append(run.idle_timeout_s)
            if run.connect is not None and run.connect <= run.start:
                delays.append((run.start - run.connect) / US)
            if run.ready is not None:
                loads.append((run.ready - run.start) / US)
                if run.connect is not None and run.connect <= run.start:
                    c2r.append((run.ready - run.connect) / US)

    q = requests.select((requests.ts >= since) & (requests.ts < until))
    statuses, counts = np.unique(q.status, return_counts=True)
    recognized = q.path_is(RECOGNIZE) & (q.status == 200)
    owner = run_of(q, runs)
    gpu_runs = np.array([r.gpu for r in runs] + [False], dtype=bool)     # [-1] -> False
    on_gpu = gpu_runs[owner]
    if days and len(q):
        day_idx = np.searchsorted(np.array(bounds, dtype=np.int64), q.ts, side="right") - 1
        n = len(days)
        per_day = (np.bincount(day_idx, minlength=n), np.bincount(day_idx, q.audio_s, minlength=n),
                   np.bincount(day_idx, q.infer_s, minlength=n))
        for i, day in enumerate(days):
            day.requests, day.audio_s, day.infer_s = int(per_day[0][i]), float(per_day[1][i]), float(per_day[2][i])
    users: dict[int | None, UserUse] = {}
    if len(q):
        uids, inverse = np.unique(q.uid, return_inverse=True)
        n_req = np.bincount(inverse, minlength=len(uids))
        n_rec = np.bincount(inverse, recognized.astype(np.int64), minlength=len(uids))
        audio_by = np.bincount(inverse, q.audio_s, minlength=len(uids))
        for i, uid in enumerate(uids.tolist()):
            key = None if uid < 0 else int(uid)
            users[key] = UserUse(key, int(n_req[i]), int(n_rec[i]), float(audio_by[i]))
    names = sorted({r.instance for r in inside} | {q.instances[i] for i in np.unique(q.instance).tolist()})
    return Usage(period, names, inside, dict(held), days,
                 {int(k): int(v) for k, v in zip(statuses.tolist(), counts.tolist())}, int(recognized.sum()),
                 float(q.audio_s.sum()), float(q.infer_s.sum()), float(q.infer_s[on_gpu].sum()), keep_warm, cold,
                 c2r, delays, loads, users, timeouts)


def _days_of(days: list[Day], bounds: list[int], lo: int, hi: int) -> list[Day]:
    """The days that [lo, hi) touches."""
    if hi <= lo or not days:
        return []
    i = max(0, bisect.bisect_right(bounds, lo) - 1)
    j = bisect.bisect_left(bounds, hi)
    return days[i:j]


def _day_index(bounds: list[int], ts: int) -> int:
    return max(0, bisect.bisect_right(bounds, ts) - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by linear interpolation between order statistics
    (numpy's default), or None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    i = int(pos)
    if i + 1 >= len(xs):
        return xs[-1]
    return xs[i] + (xs[i + 1] - xs[i]) * (pos - i)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 0.5)
