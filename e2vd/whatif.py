"""What other settings would have cost: replay a period's requests against another idle timeout
or warmup window.

The replay follows the daemon's own rules (e2vd/lifecycle.py): a request that arrives while no
daemon runs starts one (a cold start); the daemon is held from `start_delay` after that arrival
(systemd starting the process) and ready `load` later; each request is worked on from its arrival
or from ready, whichever is later, for its recorded service time; the daemon exits `idle_timeout`
after the latest of ready, the keep-warm deadline and the end of its last request; a request that
arrives at or after that moment starts a new daemon.

What is replayed, from the journal: every request logged in the period, arriving when the daemon
began to read it, except the first request of a run when it came before the model was ready: that
one is taken to have arrived when systemd was asked to start the daemon (its "Starting" record),
since it is the connection that woke it. Service time: total_ms − queue_ms (waiting for the
model or the worker is not service). A recorded warmup (POST /v1/warmup) holds the daemon until
its read time + the hold it was granted. Not replayed: runs nobody asked for by a request
(`systemctl start`), health checks (not logged), idle keep-alive connections.

Scenarios: `idle_timeout` (seconds) and `warmup`: "recorded" (replay the recorded warmups),
None (no warmups) or a `Window` (a warmup on each weekday, Monday to Friday like the installed
timer, at the window's start, holding until its end; the recorded warmups are dropped). The
start delay and load time are the medians measured in the period.

Times are integer µs since the epoch, as in `e2vd.usage`.
"""
from __future__ import annotations

import datetime as _dt
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from e2vd.durations import parse_clock, parse_duration
from e2vd.timestamps import US, Period, local_timestamp
from e2vd.usage import WARMUP, Requests, Run, run_of

RECORDED = "recorded"
"""`Scenario.warmup` value: replay the warmups the journal has."""


@dataclass(frozen=True)
class Window:
    """A weekday warmup window in local wall-clock time (end after start, same day)."""

    start: _dt.time
    end: _dt.time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class Scenario:
    """Settings to replay: `idle_timeout_s` None = as recorded; `warmup` RECORDED, None or a Window."""

    idle_timeout_s: float | None = None
    warmup: Window | str | None = RECORDED

    def label(self, recorded_idle_timeout_s: float | None = None) -> str:
        t = self.idle_timeout_s if self.idle_timeout_s is not None else recorded_idle_timeout_s
        idle = "idle_timeout=?" if t is None else f"idle_timeout={t:g}"
        warm = {RECORDED: "warmup as recorded", None: "warmup=none"}.get(self.warmup, f"warmup={self.warmup}")  # type: ignore[arg-type]
        return f"{idle}, {warm}"


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request to replay: arrives at `at` (µs), is worked on `service` µs; a warmup holds the
    daemon warm until `hold_until` (µs)."""

    at: int
    service: int
    hold_until: int | None = None
    warmup: bool = False


@dataclass
class Arrivals:
    """Requests to replay, sorted by arrival, as plain lists (the replay is one loop over them):
    `at` and `service` µs, `hold_until` µs or -1 for none, `warmup` flags."""

    at: list[int] = field(default_factory=list)
    service: list[int] = field(default_factory=list)
    hold_until: list[int] = field(default_factory=list)
    warmup: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.at)

    @classmethod
    def of(cls, items: Iterable[Arrival]) -> "Arrivals":
        out = cls()
        for a in sorted(items, key=lambda a: a.at):
            out.at.append(a.at)
            out.service.append(a.service)
            out.hold_until.append(-1 if a.hold_until is None else a.hold_until)
            out.warmup.append(a.warmup)
        return out

    def items(self) -> list[Arrival]:
        return [Arrival(a, s, None if h < 0 else h, w)
                for a, s, h, w in zip(self.at, self.service, self.hold_until, self.warmup)]


@dataclass
class Outcome:
    """A scenario's result over the period: held µs (cut to the period) and cold starts."""

    scenario: Scenario
    idle_timeout_s: float
    held_us: int
    cold_starts: int

    @property
    def held_hours(self) -> float:
        return self.held_us / US / 3600


def parse_what_if(specs: Sequence[str]) -> list[Scenario]:
    """Scenarios from --what-if arguments: each "key=v1,v2,..." with key idle_timeout (seconds or
    a duration: 60, 5m, 1h) or warmup (HH:MM-HH:MM, none, recorded); several arguments combine
    (every idle timeout with every warmup); a key not given stays as recorded; no arguments, no
    scenarios. Raises ValueError."""
    timeouts: list[float | None] = []
    warmups: list[Window | str | None] = []
    for spec in specs:
        for part in spec.split():
            key, eq, values = part.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not eq or not values:
                raise ValueError(f"bad --what-if {part!r}: use key=values, e.g. idle_timeout=60,300,900 "
                                 f"or warmup=09:00-18:00")
            for value in values.split(","):
                value = value.strip()
                if key == "idle_timeout":
                    try:
                        timeouts.append(parse_duration(value))
                    except ValueError as exc:
                        raise ValueError(f"bad --what-if idle_timeout {value!r}: {exc}") from None
                elif key == "warmup":
                    warmups.append(parse_window(value))
                else:
                    raise ValueError(f"bad --what-if key {key!r}: use idle_timeout or warmup")
    if not timeouts and not warmups:
        return []
    return [Scenario(t, w) for t, w in itertools.product(timeouts or [None], warmups or [RECORDED])]


def parse_window(text: str) -> Window | str | None:
    """"09:00-18:00" -> Window; "none" -> None; "recorded" -> RECORDED. Raises ValueError."""
    low = text.strip().lower()
    if low in ("none", "off", "no"):
        return None
    if low == RECORDED:
        return RECORDED
    a, dash, b = low.partition("-")
    try:
        if not dash:
            raise ValueError("no '-'")
        window = Window(parse_clock(a), parse_clock(b))
    except ValueError:
        raise ValueError(f"bad --what-if warmup {text!r}: use HH:MM-HH:MM (e.g. 09:00-18:00) or none") from None
    if window.end <= window.start:
        raise ValueError(f"bad --what-if warmup {text!r}: the end must come after the start on the same day")
    return window


def arrivals(requests: Requests, runs: Sequence[Run], period: Period) -> Arrivals:
    """The period's recorded requests as arrivals (module docstring), sorted by arrival."""
    q = requests.select((requests.ts >= period.since) & (requests.ts < period.until))
    begin = q.ts - q.total_us
    at = begin.copy()
    owner = run_of(q, runs)
    if len(q):
        order = np.lexsort((begin, owner))
        sorted_owner = owner[order]
        first = order[np.r_[True, sorted_owner[1:] != sorted_owner[:-1]] & (sorted_owner >= 0)]
        for i in first.tolist():
            run = runs[int(owner[i])]
            b = int(begin[i])
            if run.ready is None or b < run.ready:
                at[i] = run.connect if run.connect is not None and run.connect <= b else min(run.start, b)
    warm = q.path_is(WARMUP)
    service = np.where(warm, 0, np.maximum(0, q.total_us - q.queue_us))
    hold = np.where(warm & (q.hold_s > 0), begin + np.round(q.hold_s * US).astype(np.int64), -1)
    order = np.argsort(at, kind="stable")
    return Arrivals(at[order].tolist(), service[order].tolist(), hold[order].tolist(), warm[order].tolist())


def warmup_arrivals(window: Window, period: Period) -> list[Arrival]:
    """A warmup at the window's start on each weekday (Mon-Fri) of the period, holding to its end."""
    out: list[Arrival] = []
    for day, _, _ in period.days():
        if day.weekday() >= 5:
            continue
        at, until = _at(day, window.start), _at(day, window.end)
        if period.since <= at < period.until:
            out.append(Arrival(at, 0, until, True))
    return out


def _at(day: _dt.date, clock: _dt.time) -> int:
    return round(local_timestamp(day.year, day.month, day.day, clock.hour, clock.minute, clock.second) * US)


def replay(recorded: Arrivals, period: Period, scenario: Scenario, idle_timeout_s: float,
           start_delay_s: float, load_s: float) -> Outcome:
    """Held time and cold starts of `scenario` over `period` (module docstring). `idle_timeout_s`
    is used when the scenario keeps the recorded one."""
    timeout_s = scenario.idle_timeout_s if scenario.idle_timeout_s is not None else idle_timeout_s
    if scenario.warmup == RECORDED:
        items = recorded
    else:
        kept = [a for a in recorded.items() if not a.warmup]
        if isinstance(scenario.warmup, Window):
            kept += warmup_arrivals(scenario.warmup, period)
        items = Arrivals.of(kept)
    timeout, delay, load = round(timeout_s * US), round(start_delay_s * US), round(load_s * US)
    since, until = period.since, period.until
    held = cold = 0
    running = False
    held_from = ready = busy = keep = exit_at = 0
    for at, service, hold in zip(items.at, items.service, items.hold_until):
        if not running or at >= exit_at:
            if running:
                held += max(0, min(exit_at, until) - max(held_from, since))
            running = True
            held_from = at + delay
            if since <= held_from < until:
                cold += 1
            ready = busy = keep = held_from + load
        end = (at if at > ready else ready) + service
        if end > busy:
            busy = end
        if hold > keep:
            keep = hold
        exit_at = (busy if busy > keep else keep) + timeout
    if running:
        held += max(0, min(exit_at, until) - max(held_from, since))
    return Outcome(scenario, timeout_s, held, cold)
