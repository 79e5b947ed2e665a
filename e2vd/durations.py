"""Human durations and clock times for the command line: "90s", "30m", "9h", "1h30m", "18:00".

Pure functions, no I/O; every error is a `ValueError` whose message names the bad text (cut to
a readable length) and shows a valid example, so the CLI can print it as is. Digits are ASCII
digits only, as systemd and the shell read them.
"""
from __future__ import annotations

import datetime as _dt
import math
import re

_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])", re.ASCII)
_HHMM = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", re.ASCII)
_SHOWN_CHARS = 40


def _quote(text: str) -> str:
    """`text` quoted for an error message, cut to _SHOWN_CHARS characters ("..." marks a cut)."""
    return repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + "..."


def parse_duration(text: str) -> float:
    """Seconds in `text`: a plain number of seconds ("90", "2.5") or unit parts in the order
    d, h, m, s ("90s", "30m", "9h", "1h30m", "1d"). Negative, empty, non-ASCII and unknown
    forms raise ValueError, and so does a number too large for a float ("9" * 400 + "s"), which
    would otherwise silently mean forever."""
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration: give e.g. 90s, 30m, 9h or 1h30m")
    if not s.isascii():   # float() and \d read every script's digits: "٣s" would be 3 seconds
        raise ValueError(f"bad duration {_quote(text)}: use ASCII digits and a unit s, m, h or d, "
                         f"e.g. 90s, 30m, 9h, 1h30m")
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad duration {_quote(text)}: must be a finite number of seconds >= 0")
        return value
    pos, total, seen = 0, 0.0, []
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        unit = m.group(2)
        if unit in seen or (seen and "dhms".index(unit) < "dhms".index(seen[-1])):
            raise ValueError(f"bad duration {_quote(text)}: give each unit once, largest first, e.g. 1h30m")
        seen.append(unit)
        total += float(m.group(1)) * _UNIT_SECONDS[unit]
        pos = m.end()
    if pos != len(s) or not seen:
        raise ValueError(f"bad duration {_quote(text)}: use a number with a unit s, m, h or d, "
                         f"e.g. 90s, 30m, 9h, 1h30m")
    if not math.isfinite(total):
        raise ValueError(f"bad duration {_quote(text)}: too large to be a duration; give e.g. 9h")
    return total


def format_duration(seconds: float) -> str:
    """A short human form of `seconds`: "45 s", "12 min 5 s", "9 h 0 min", "2 d 3 h"; negative
    numbers (-inf too) are "0 s", and inf and nan are written as such rather than raising."""
    if math.isnan(seconds) or seconds == math.inf:
        return str(seconds)
    sec = max(0, int(round(max(0.0, seconds))))
    d, rem = divmod(sec, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    if m:
        return f"{m} min {s} s"
    return f"{s} s"


def parse_clock(text: str) -> _dt.time:
    """A local wall-clock time "HH:MM" or "HH:MM:SS" (24-hour). Raises ValueError otherwise."""
    m = _HHMM.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad time {_quote(text)}: use 24-hour HH:MM, e.g. 18:00")
    hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"bad time {_quote(text)}: use 24-hour HH:MM (hours 0-23, minutes 0-59), e.g. 18:00")
    return _dt.time(hour, minute, second)


def seconds_until(clock: _dt.time, now: _dt.datetime | None = None) -> float:
    """Seconds from `now` (default: the current local time) until `clock` today, in local time.

    Negative when that time has already passed today; callers decide what to say. Across a DST
    change the difference is computed on aware local datetimes, so it is real elapsed seconds.
    """
    if now is None:
        now = _dt.datetime.now().astimezone()
        # A naive local datetime resolved by astimezone() gets the UTC offset valid at that instant.
        target = _dt.datetime.combine(now.date(), clock).astimezone()
    else:
        if now.tzinfo is None:
            now = now.astimezone()
        target = now.replace(hour=clock.hour, minute=clock.minute, second=clock.second, microsecond=0)
    # Subtract in UTC: aware datetimes sharing a tzinfo object subtract as naive wall-clock times.
    utc = _dt.timezone.utc
    return (target.astimezone(utc) - now.astimezone(utc)).total_seconds()
