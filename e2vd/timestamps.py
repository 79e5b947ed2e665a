"""Points in time and time spans as journalctl's --since/--until take them (systemd.time(7)):
"2026-11-01", "2026-11-01 09:00:00", "today", "yesterday", "-2h", "3 days ago", "@1793541600",
and `Period`: the local days `e2vd report` cuts a period into.

Pure functions (the local time zone is the process's: the TZ environment variable applies); every
error is a ValueError whose message names the bad text and shows a valid example. Human durations
of e2vd's own options ("90s", "1h30m") are `e2vd.durations`.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time as _time
from dataclasses import dataclass

US = 1_000_000
"""Microseconds in a second: `Period` and the report count time in integer microseconds, as the
journal does."""

# systemd's time span units (systemd.time(7)); "m" is a minute, "M" a month (30.44 d), "y" 365.25 d.
_SPAN_UNITS: dict[str, float] = {
    **dict.fromkeys(("usec", "us", "µs", "μs"), 1e-6),
    **dict.fromkeys(("msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "sec", "s"), 1.0),
    **dict.fromkeys(("minutes", "minute", "min", "m"), 60.0),
    **dict.fromkeys(("hours", "hour", "hr", "h"), 3600.0),
    **dict.fromkeys(("days", "day", "d"), 86400.0),
    **dict.fromkeys(("weeks", "week", "w"), 7 * 86400.0),
    **dict.fromkeys(("months", "month", "M"), 2629800.0),
    **dict.fromkeys(("years", "year", "y"), 31557600.0),
}
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([^\d\s.]*)")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_STAMP = re.compile(
    r"(?:(?P<y>\d{4}|\d{2})-(?P<mo>\d{1,2})-(?P<d>\d{1,2}))?"
    r"(?:(?:^|[ T])(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?P<f>\.\d{1,6})?)?)?")


def parse_timespan(text: str) -> float:
    """Seconds in a systemd time span (systemd.time(7)): a plain number of seconds, or number-unit
    parts added up, spaces allowed: "2h", "1h 30min", "90 s", "1.5d", "2 weeks", "1M" (a month,
    30.44 days), "1y" (365.25 days), "250ms". Raises ValueError naming the text otherwise."""
    s = text.strip()
    if not s:
        raise ValueError("empty time span: give e.g. 2h, 30min or 1d")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _SPAN_PART.match(s, pos)
        if not m or m.end() == pos:
            break
        unit = m.group(2)
        if unit == "":
            factor = 1.0
        elif unit in _SPAN_UNITS:
            factor = _SPAN_UNITS[unit]
        else:
            raise ValueError(f"bad time span {text!r}: unknown unit {unit!r}; use e.g. 2h, 30min, 1d, 1w")
        total += float(m.group(1)) * factor
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"bad time span {text!r}: use numbers with units, e.g. 2h, 1h 30min, 1d")
    return total


def parse_timestamp(text: str, now: float | None = None) -> float:
    """A point in time written as journalctl's --since/--until accept it (systemd.time(7)), as
    Unix seconds. Local time unless "UTC" (or this zone's abbreviation) follows:

    - "2026-11-01" (midnight), "2026-11-01 09:00", "2026-11-01 09:00:00[.frac]", "26-11-01",
      an optional weekday in front ("Sun 2026-11-01", checked), a "T" instead of the space;
    - "09:00" / "09:00:00" (today);
    - "now", "today", "yesterday", "tomorrow" (midnights);
    - "-2h", "2h ago", "+1d", "1d left" (relative to `now`, a time span as in `parse_timespan`);
    - "@1793541600" (Unix seconds).

    `now` defaults to the current time. Local midnights and wall-clock times are resolved like
    systemd does (C mktime with isdst=-1, so the TZ environment variable applies). Raises
    ValueError with an example otherwise."""
    now = _time.time() if now is None else now
    s = " ".join(text.split())
    low = s.lower()
    example = "e.g. 2026-11-01, '2026-11-01 09:00:00', today, yesterday, -2h or '3 days ago'"
    if not s:
        raise ValueError(f"empty time: give {example}")
    try:
        if low == "now":
            return now
        if low in ("today", "yesterday", "tomorrow"):
            day = _dt.date.fromtimestamp(now) + _dt.timedelta(days={"today": 0, "yesterday": -1, "tomorrow": 1}[low])
            return local_timestamp(day.year, day.month, day.day, 0, 0, 0)
        if s.startswith("@"):
            value = float(s[1:])
            if not math.isfinite(value):
                raise ValueError
            return value
        if s[0] in "+-":
            return now + (1 if s[0] == "+" else -1) * parse_timespan(s[1:])
        for suffix, sign in ((" ago", -1), (" left", 1)):
            if low.endswith(suffix):
                return now + sign * parse_timespan(s[: -len(suffix)])
    except ValueError as exc:
        raise ValueError(f"bad time {text!r}: {exc}" if str(exc) else f"bad time {text!r}: give {example}") from None
    utc = False
    words = s.split(" ")
    if len(words) > 1 and (words[-1] == "UTC" or words[-1] in _time.tzname):
        utc = words[-1] == "UTC"
        s = " ".join(words[:-1])
    weekday = None
    words = s.split(" ", 1)
    if words[0].lower() in _WEEKDAYS or words[0].lower() in _WEEKDAY_NAMES:
        name = words[0].lower()
        weekday = (_WEEKDAYS.index(name) if name in _WEEKDAYS else _WEEKDAY_NAMES.index(name))
        s = words[1] if len(words) > 1 else ""
    m = _STAMP.fullmatch(s)
    if not s or not m or (m.group("y") is None and m.group("h") is None):
        raise ValueError(f"bad time {text!r}: give {example}")
    if m.group("y") is not None:
        year = int(m.group("y"))
        if len(m.group("y")) == 2:
            year += 1900 if year >= 70 else 2000   # systemd (strptime %y): 69-99 -> 19xx, else 20xx
        month, day = int(m.group("mo")), int(m.group("d"))
    else:
        today = _dt.datetime.fromtimestamp(now, _dt.timezone.utc) if utc else _dt.datetime.fromtimestamp(now)
        year, month, day = today.year, today.month, today.day
    hour, minute, second = (int(m.group(k) or 0) for k in ("h", "mi", "s"))
    frac = float(m.group("f") or 0)
    try:
        _dt.datetime(year, month, day, hour, minute, second)
    except ValueError:
        raise ValueError(f"bad time {text!r}: no such date or time of day; give {example}") from None
    if weekday is not None and _dt.date(year, month, day).weekday() != weekday:
        raise ValueError(f"bad time {text!r}: {_dt.date(year, month, day):%Y-%m-%d} is a "
                         f"{_dt.date(year, month, day):%A}")
    if utc:
        return _dt.datetime(year, month, day, hour, minute, second, tzinfo=_dt.timezone.utc).timestamp() + frac
    return local_timestamp(year, month, day, hour, minute, second) + frac


def local_timestamp(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Unix seconds of a local wall-clock time (the TZ environment variable applies). A time that
    occurs twice (the hour repeated when DST ends) is its first occurrence (systemd leaves that to
    C mktime, whose choice depends on its earlier calls); a time skipped when DST begins is C
    mktime's (isdst=-1) answer, as systemd's."""
    wall = (year, month, day, hour, minute, second)
    hits = []
    for isdst in (0, 1):
        t = _time.mktime((*wall, 0, 0, isdst))
        if tuple(_time.localtime(t))[:6] == wall:
            hits.append(t)
    return float(min(hits)) if hits else float(_time.mktime((*wall, 0, 0, -1)))


@dataclass(frozen=True)
class Period:
    """[since, until) in µs since the epoch."""

    since: int
    until: int

    @property
    def seconds(self) -> float:
        return (self.until - self.since) / US

    def days(self) -> list[tuple[_dt.date, int, int]]:
        """The local days the period touches: (date, from µs, to µs), cut at the period's ends."""
        if self.until <= self.since:
            return []
        first = _dt.datetime.fromtimestamp(self.since / US).date()
        last = _dt.datetime.fromtimestamp((self.until - 1) / US).date()
        out: list[tuple[_dt.date, int, int]] = []
        day = first
        while day <= last:
            nxt = day + _dt.timedelta(days=1)
            lo = max(self.since, day_start(day))
            hi = min(self.until, day_start(nxt))
            if hi > lo:
                out.append((day, lo, hi))
            day = nxt
        return out


def day_start(day: _dt.date) -> int:
    """µs of local midnight at the start of `day`."""
    return round(local_timestamp(day.year, day.month, day.day) * US)
