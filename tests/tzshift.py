"""Time-zone files that move local time, not the clock: for firing calendar timers in a box.

`shifted_zone("08:55", 5)` returns the bytes of a TZif file whose UTC offset makes local "now"
5 s before the nearest weekday 08:55.  Copied to /etc/localtime inside a throw-away systemd
(never on the host), it makes an unmodified `OnCalendar=Mon..Fri 08:55` timer fire 5 s later;
the real clock is never touched.  zic (tzdata's compiler) accepts offsets beyond a day, so any
day of the week works.
"""
from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
from pathlib import Path


def offset_for(hhmm: str, lead_s: float, now: dt.datetime | None = None) -> int:
    """UTC offset in whole seconds that makes local time `lead_s` s before the nearest weekday HH:MM."""
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(tzinfo=None, microsecond=0)
    hh, mm = (int(x) for x in hhmm.split(":"))
    offsets = []
    for days in range(-3, 4):
        day = now.date() + dt.timedelta(days=days)
        if day.weekday() < 5:   # Mon..Fri
            target = dt.datetime.combine(day, dt.time(hh, mm)) - dt.timedelta(seconds=lead_s)
            offsets.append(int((target - now).total_seconds()))
    return min(offsets, key=abs)


def zone_bytes(offset_s: int, name: str = "SHIFT") -> bytes:
    """Compile a fixed-offset zone (local = UTC + offset_s) with zic; returns the TZif bytes."""
    sign, a = ("-" if offset_s < 0 else ""), abs(offset_s)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shift.zi"
        src.write_text(f"Zone E2vd/Shift {sign}{a // 3600}:{a % 3600 // 60:02d}:{a % 60:02d} - {name}\n")
        subprocess.run(["zic", "-d", tmp, str(src)], check=True, capture_output=True)
        return (Path(tmp) / "E2vd" / "Shift").read_bytes()


def shifted_zone(hhmm: str, lead_s: float) -> bytes:
    """TZif bytes in which local "now" is `lead_s` seconds before the nearest weekday `hhmm`."""
    return zone_bytes(offset_for(hhmm, lead_s))
