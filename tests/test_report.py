"""`e2vd report` (issue 10) against real journal files whose answers are computed by hand.

Journal files are built from journal export format by systemd-journal-remote
(tests/journalfiles.py) with chosen timestamps, boot ids, pids and units, and read back through
the same code path as the command (`e2vd.report.main` -> journal.Reader). Expected values are
written out as arithmetic on wall-clock times, independent of the code under test. TZ is set
explicitly wherever day boundaries matter (the host's clock and /etc/localtime are never touched).

The last test runs the daemon under a real systemd (tests/sdbox.py) and checks the report of its
own journal against the runs' alive_seconds.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import journalfiles
from journalfiles import Machine, Req, warmup
from e2vd import report, whatif
from e2vd.journalread import JournalSource, read_records
from e2vd.timestamps import US, local_timestamp as lt, parse_timespan, parse_timestamp
from e2vd.usage import build_runs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(journalfiles.unavailable_reason() is not None,
                                reason=journalfiles.unavailable_reason() or "")


@pytest.fixture
def tz(monkeypatch):
    """Set the local time zone of this process (TZ + tzset), restored afterwards."""
    def set_tz(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_tz
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(autouse=True)
def fixed_now(monkeypatch):
    """"now" for the report: 2027-06-01, after every synthetic journal (periods are never cut)."""
    monkeypatch.setattr(report, "_now", lambda: 1812150000.0)


def hms(h: int, m: int = 0, s: float = 0.0) -> float:
    return h * 3600 + m * 60 + s


def at(day: dt.date, h: int, m: int = 0, s: float = 0.0) -> float:
    """Unix time of a local wall-clock time (whole seconds) plus a fraction."""
    whole = int(s)
    return lt(day.year, day.month, day.day, h, m, whole) + (s - whole)


def run_report(capsys, journal_path: Path, *args: str) -> tuple[int, str, str]:
    rc = report.main(["--file", str(journal_path), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def report_json(capsys, journal_path: Path, *args: str) -> dict:
    rc, out, err = run_report(capsys, journal_path, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------------- time parsing
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "UTC"])
def test_time_stamps_parse_like_systemd(tz, zone) -> None:
    """What journalctl --since accepts means what systemd says it means (systemd-analyze timestamp)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing")
    tz(zone)
    cases = ["2026-11-01", "2026-11-01 09:00:00", "2026-11-01 09:00", "today", "yesterday", "tomorrow",
             "09:00", "@1793541600.25", "Sun 2026-11-01 09:00", "2026-11-01 09:00 UTC", "26-11-01",
             "2026-11-01 09:00:00.250", "2026-03-08 02:30", "2026-03-29 02:30"]
    relative = ["-2h", "2h ago", "1 hour 30min ago", "+3d", "1d left", "-1M", "5min ago", "-1w"]
    env = dict(os.environ, TZ=zone)
    for text in cases + relative:
        now = time.time()
        cp = subprocess.run(["systemd-analyze", "timestamp", "--", text], capture_output=True, text=True, env=env)
        m = re.search(r"UNIX seconds: @([\d.]+)", cp.stdout)
        assert m, (text, cp.stdout, cp.stderr)
        got = parse_timestamp(text, now)
        assert got == pytest.approx(float(m[1]), abs=1.0 if text in relative else 1e-6), text
    # a wall-clock time that occurs twice (clocks go back) is its first occurrence; systemd leaves
    # that to the C library's mktime, whose answer depends on its earlier calls
    first = {"Europe/Berlin": ("2026-10-25 02:30", "2026-10-25T00:30:00Z"),
             "America/New_York": ("2026-11-01 01:30", "2026-11-01T05:30:00Z")}.get(zone)
    if first:
        want = dt.datetime.fromisoformat(first[1].replace("Z", "+00:00")).timestamp()
        assert parse_timestamp(first[0]) == want


@pytest.mark.parametrize("bad", ["", "2026-13-01", "someday", "2026-11-01 25:00", "Mon 2026-11-01", "-2 parsecs"])
def test_bad_time_stamps_are_usage_errors(capsys, tmp_path, bad) -> None:
    rc = report.main(["--file", str(tmp_path / "none.journal"), "--since", bad])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("e2vd report: ") and repr(bad) in err or bad == "" and "empty" in err


def test_time_spans_and_relative_times_as_journalctl_takes_them(tz, tmp_path, capsys) -> None:
    assert parse_timespan("1h 30min") == parse_timespan("90m") == parse_timespan("5400") == 5400.0
    assert parse_timespan("2 weeks") == 14 * 86400 and parse_timespan("250ms") == 0.25
    assert parse_timespan("1M") == 2629800.0 and parse_timespan("1y") == 31557600.0
    for bad in ("", "2 parsecs", "h", "1h and a bit"):
        with pytest.raises(ValueError, match="time span"):
            parse_timespan(bad)
    tz("UTC")
    now = report._now()
    m = Machine()
    m.boot(now - 3 * 86400)
    m.run(now - 3600, [Req(now - 3000, 2.0)], end="stopped", end_at=now - 1800)
    path = m.journal.write(tmp_path / "recent.journal")
    for args in (["--since", "-2h"], ["--since=-2h"], ["-S", "-2h", "-U", "now"], ["--since", "2 hours ago"]):
        doc = report_json(capsys, path, *args)
        assert doc["gpu_held_seconds"] == 1800 - 0.5 and doc["period"]["hours"] == 2.0, args


def test_month_period_has_the_real_hours_of_the_month(tz) -> None:
    tz("Europe/Berlin")
    october, _ = report.period_from(None, None, "2026-10", now=2e9)        # DST ends on Oct 25
    assert october.seconds == (31 * 24 + 1) * 3600
    assert [d for d, lo, hi in october.days() if hi - lo != 86400 * US] == [dt.date(2026, 10, 25)]
    september, _ = report.period_from(None, None, "2026-09", now=2e9)
    assert september.seconds == 30 * 24 * 3600
    last30, cut = report.period_from(None, None, None, now=2e9)
    assert (last30.since, last30.until, cut) == (round((2e9 - 30 * 86400) * US), round(2e9 * US), False)
    current, cut = report.period_from("2026-11-01", "2026-12-01", None, now=at(dt.date(2026, 11, 20), 12))
    assert cut and current.until == round(at(dt.date(2026, 11, 20), 12) * US)
    with pytest.raises(report.UsageError, match="--month cannot be combined"):
        report.period_from("today", None, "2026-10", now=2e9)
    with pytest.raises(report.UsageError, match="YYYY-MM"):
        report.period_from(None, None, "2026/10", now=2e9)


# ------------------------------------------------------------------------- a month like the issue's
SEPT = [dt.date(2026, 9, d) for d in range(1, 31)]
WEEKDAYS = [d for d in SEPT if d.weekday() < 5]
SATURDAYS = [d for d in SEPT if d.weekday() == 5]


def issue_month(path: Path) -> Path:
    """September 2026 (30 days, Europe/Berlin): each weekday the warmup timer at 08:55:00 asks
    to stay warm until 18:00 (32,700 s, computed by `e2vd warmup --until 18:00` at 08:55:00),
    87 recognitions of 1.8 s at 09:00 + 6 min * k, idle timeout 300 s; each Saturday one
    recognition at 11:00. systemd starts the process 0.5 s after the connection, the model is
    ready 3.5 s later."""
    m = Machine()
    m.boot(at(dt.date(2026, 8, 28), 7))
    users = [1000, 1001, 0, 4242424]
    for day in SEPT:
        if day in WEEKDAYS:
            reqs = [Req(at(day, 9) + 360 * k, 1.8, audio=3.2, uid=users[k % 4]) for k in range(87)]
            m.serve([warmup(at(day, 8, 55), hms(18) - hms(8, 55))] + reqs, idle_timeout=300)
        elif day in SATURDAYS:
            m.serve([Req(at(day, 11), 1.8, audio=3.2, uid=1000)], idle_timeout=300)
    return m.journal.write(path)


def test_a_month_like_the_issue_table_equals_the_hand_computation(tz, tmp_path, capsys) -> None:
    tz("Europe/Berlin")
    path = issue_month(tmp_path / "month.journal")
    doc = report_json(capsys, path, "--month", "2026-09", "--price-per-hour", "9.90",
                      "--always-on-price-per-hour", "1.78", "--currency", "EUR")
    assert len(WEEKDAYS) == 22 and len(SATURDAYS) == 4
    # weekday: held from the start event (08:55:00.5) to the idle exit, 300 s after the hold that
    # began when the warmup was read (08:55:00.5) and lasts 32,700 s: 18:00:00.5 + 300 s
    weekday = hms(18, 5, 0.5) - hms(8, 55, 0.5)
    # Saturday: start 11:00:00.5, ready 11:00:04, answered 11:00:05.8, exit 300 s later
    saturday = hms(11, 5, 5.8) - hms(11, 0, 0.5)
    held = 22 * weekday + 4 * saturday
    assert (weekday, saturday) == (33000.0, pytest.approx(305.3, abs=1e-9))
    assert doc["held_seconds"] == {"cuda:0": pytest.approx(held, abs=1e-6)}
    assert doc["gpu_held_seconds"] == pytest.approx(727221.2, abs=1e-6)
    assert doc["gpu_held_hours"] == pytest.approx(727221.2 / 3600, abs=1e-6)
    assert doc["always_on_hours"] == 720.0
    assert doc["saving_percent"] == pytest.approx(100 * (1 - 727221.2 / (720 * 3600)), abs=1e-3)
    assert doc["requests"] == {"total": 22 * 88 + 4, "recognitions": 22 * 87 + 4,
                               "by_status": {"200": 22 * 88 + 4}}
    assert doc["cold_starts"]["count"] == 26
    assert doc["cold_starts"]["connect_to_ready_p50_s"] == doc["cold_starts"]["connect_to_ready_p95_s"] == 4.0
    assert doc["audio_hours"] == pytest.approx((22 * 87 + 4) * 3.2 / 3600, abs=1e-6)
    assert doc["inference_seconds"] == pytest.approx((22 * 87 + 4) * 1.8, abs=1e-3)
    assert doc["gpu_busy_percent"] == pytest.approx(100 * (22 * 87 + 4) * 1.8 / held, abs=1e-4)
    assert doc["keep_warm_hours"] == pytest.approx(22 * 32700 / 3600, abs=1e-6)
    assert doc["runs"]["ended"] == {"idle": 26} and doc["runs"]["ended_abnormally"] == 0
    on_demand = 727221.2 / 3600 * 9.9
    assert doc["cost"] == {"currency": "EUR", "price_per_hour": 9.9, "always_on_price_per_hour": 1.78,
                           "always_on": 1281.6, "on_demand": pytest.approx(on_demand, abs=0.005),
                           "saving": pytest.approx(1281.6 - on_demand, abs=0.005),
                           "saving_percent": pytest.approx(100 * (1 - on_demand / 1281.6), abs=1e-3)}
    days = {d["date"]: d for d in doc["days"]}
    assert len(days) == 30
    for day in SEPT:
        d = days[day.isoformat()]
        want = weekday if day in WEEKDAYS else saturday if day in SATURDAYS else 0.0
        assert d["gpu_held_seconds"] == pytest.approx(want, abs=1e-6), day
        assert d["requests"] == (88 if day in WEEKDAYS else 1 if day in SATURDAYS else 0)
    users = {u["uid"]: u for u in doc["users"]}
    assert users[0]["user"] == "root" and users[4242424]["user"] is None
    assert users[1000]["recognitions"] == 22 * 22 + 4 and users[0]["requests"] == 22 * 22 + 22  # + warmups
    assert set(doc) >= {"period", "held_hours", "always_on_hours", "saving_percent", "cold_starts", "requests",
                        "audio_hours", "days", "users", "what_if"}
    assert doc["what_if"] is None and doc["period"]["since"] == "2026-09-01T00:00:00+02:00"

    # the text report: the comparison table, a bar per active day, within 80 columns
    rc, text, _ = run_report(capsys, path, "--month", "2026-09", "--price-per-hour", "9.90",
                             "--always-on-price-per-hour", "1.78", "--currency", "EUR",
                             "--what-if", "idle_timeout=60,300,900", "--what-if", "warmup=recorded,none,08:00-19:00")
    assert rc == 0
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert re.search(r"GPU held\s+720\.0 h\s+202\.0 h\s+71\.9 %", text), text
    assert re.search(r"cost \(EUR\)\s+1,281\.60\s+1,999\.86\s+-56\.0 %", text), text
    bars = [line for line in text.splitlines() if re.match(r"\w{3} 2026-09-\d\d", line)]
    assert len(bars) == 30 and sum(b[-1] in "▏▎▍▌▋▊▉█" for b in bars) == 22 + 4
    assert sum(b.endswith("██████████████████▍") for b in bars) == 22     # 9.17 h at 0.5 h a block
    assert "uid 4242424" in text and "\nroot " in text

    # --csv: one row per day
    rc, out, _ = run_report(capsys, path, "--month", "2026-09", "--csv")
    rows = out.splitlines()
    assert rc == 0 and rows[0].startswith("date,weekday,gpu_held_hours,gpu_held_seconds") and len(rows) == 31
    assert rows[1].split(",")[:4] == ["2026-09-01", "Tue", str(round(33000 / 3600, 6)), "33000.0"]


def test_the_recorded_settings_replayed_reproduce_the_measured_month(tz, tmp_path, capsys) -> None:
    tz("Europe/Berlin")
    doc = report_json(capsys, issue_month(tmp_path / "month.journal"), "--month", "2026-09",
                      "--what-if", "idle_timeout=60,300,900", "--what-if", "warmup=recorded,none")
    w = doc["what_if"]
    assert (w["recorded_idle_timeout_s"], w["start_delay_s"], w["load_s"]) == (300.0, 0.5, 3.5)
    rows = {(s["idle_timeout_s"], s["warmup"]): s for s in w["scenarios"]}
    assert rows[(300.0, "recorded")]["recorded"] and w["scenarios"][0]["recorded"]
    assert rows[(300.0, "recorded")]["held_seconds"] == doc["gpu_held_seconds"]
    assert rows[(300.0, "recorded")]["cold_starts"] == 26
    # no warmup, idle 300 s: recognitions 6 min apart never meet a running daemon (each holds it
    # 0.5 + 3.5 + 1.8 + 300 = 305.8 s): 87 cold starts a weekday
    assert rows[(300.0, "none")]["cold_starts"] == 22 * 87 + 4
    assert rows[(300.0, "none")]["held_seconds"] == pytest.approx((22 * 87 + 4) * 305.3, abs=1e-6)
    # no warmup, idle 900 s: one daemon a weekday, from 09:00:00.5 to 900 s after the 87th answer
    # (arrived 09:00 + 86 * 360 s, answered 1.8 s later); Saturdays as before but 900 s
    assert rows[(900.0, "none")]["cold_starts"] == 22 + 4
    assert rows[(900.0, "none")]["held_seconds"] == pytest.approx(
        22 * (hms(9) + 360 * 86 + 1.8 + 900 - hms(9, 0, 0.5)) + 4 * (4.0 + 1.8 + 900 - 0.5), abs=1e-6)


# ------------------------------------------------------------------- cutting at days and the period
def test_runs_are_cut_at_midnight_the_period_and_a_daylight_saving_change(tz, tmp_path, capsys) -> None:
    tz("America/New_York")
    m = Machine()
    m.boot(at(dt.date(2026, 8, 30), 6))
    a, b, c, d = (dt.date(2026, 8, 31), dt.date(2026, 9, 1), dt.date(2026, 9, 2), dt.date(2026, 9, 3))
    # started before the period, 23:30 -> 00:45
    m.run(at(a, 23, 30), start_delay=0, end="stopped", end_at=at(b, 0, 45))
    # across midnight: 23:00 -> 01:00:30.25
    m.run(at(b, 23), start_delay=0, end="stopped", end_at=at(c, 1, 0, 30.25))
    # across the period's end (2026-09-04 00:00): 22:00 -> 02:00
    m.run(at(d, 22), start_delay=0, end="stopped", end_at=at(d + dt.timedelta(days=1), 2))
    path = m.journal.write(tmp_path / "cut.journal")
    doc = report_json(capsys, path, "--since", "2026-09-01", "--until", "2026-09-04")
    days = {x["date"]: x["gpu_held_seconds"] for x in doc["days"]}
    assert days == {"2026-09-01": 2700.0 + 3600.0, "2026-09-02": 3630.25, "2026-09-03": 7200.0}
    assert doc["gpu_held_seconds"] == 2700 + 3600 + 3630.25 + 7200
    assert doc["always_on_hours"] == 72.0
    assert doc["cold_starts"]["count"] == 2 and doc["runs"]["count"] == 3
    assert doc["period"]["since"] == "2026-09-01T00:00:00-04:00"

    # a night when clocks go back (Europe/Berlin, 2026-10-25 03:00 -> 02:00): 6 real hours held
    tz("Europe/Berlin")
    m = Machine()
    m.boot(at(dt.date(2026, 10, 20), 6))
    m.run(at(dt.date(2026, 10, 24), 23), start_delay=0, end="stopped", end_at=at(dt.date(2026, 10, 25), 4))
    doc = report_json(capsys, m.journal.write(tmp_path / "dst.journal"), "--month", "2026-10")
    days = {x["date"]: x["gpu_held_seconds"] for x in doc["days"] if x["gpu_held_seconds"]}
    assert days == {"2026-10-24": 3600.0, "2026-10-25": 5 * 3600.0}
    assert doc["always_on_hours"] == 745.0


# --------------------------------------------------------------------- runs without an exit event
def test_runs_that_ended_abnormally_are_closed_by_systemd_the_next_start_or_the_end_of_boot(
        tz, tmp_path, capsys) -> None:
    tz("UTC")
    day = dt.date(2026, 9, 7)
    m = Machine()
    m.boot(at(day, 6))
    # SIGKILLed at 10:17:03.25: only systemd knows ("Main process exited, code=killed")
    killed = m.run(at(day, 10), [Req(at(day, 10, 1), 2.0)], end="killed", end_at=at(day, 10, 17, 3.25))
    # its journal lost PID 1's records: the next start on the same boot closes it
    lost = m.run(at(day, 11), end="lost", systemd_records=False)
    m.run(at(day, 12), end="stopped", end_at=at(day, 12, 30))
    # power loss: no record of its end at all; the machine's last record is at 15:42
    gone = m.run(at(day, 15), [Req(at(day, 15, 20), 1.0)], end="lost")
    m.note(at(day, 15, 42), "last words")
    # two boots: the next one begins the day after
    m.boot(at(day + dt.timedelta(days=1), 8))
    m.run(at(day + dt.timedelta(days=1), 9), end="stopped", end_at=at(day + dt.timedelta(days=1), 9, 10))
    path = m.journal.write(tmp_path / "abnormal.journal")
    doc = report_json(capsys, path, "--since", "2026-09-07", "--until", "2026-09-09")
    ab = doc["runs"]["abnormal"]
    assert [(a["closed_by"], a["end"]) for a in ab] == [
        ("systemd", "2026-09-07T10:17:03.250000+00:00"), ("next start", "2026-09-07T12:00:00.500000+00:00"),
        ("end of boot", "2026-09-07T15:42:00+00:00")]
    assert doc["runs"]["ended_abnormally"] == 3 and doc["runs"]["count"] == 5
    held = ((hms(10, 17, 3.25) - hms(10, 0, 0.5)) + (hms(12, 0, 0.5) - hms(11, 0, 0.5))
            + (hms(12, 30) - hms(12, 0, 0.5)) + (hms(15, 42) - hms(15, 0, 0.5)) + (hms(9, 10) - hms(9, 0, 0.5)))
    assert doc["gpu_held_seconds"] == pytest.approx(held, abs=1e-6)
    assert (killed.end, lost.end, gone.end) == (at(day, 10, 17, 3.25), None, None)
    rc, text, _ = run_report(capsys, path, "--since", "2026-09-07", "--until", "2026-09-09")
    assert "3 ended abnormally" in text and "closed by systemd" in text and "closed by end of boot" in text


def test_a_run_on_the_running_boot_without_an_end_is_held_until_now(tz, tmp_path) -> None:
    tz("UTC")
    m = Machine()
    boot = m.boot(at(dt.date(2026, 9, 7), 6))
    m.run(at(dt.date(2026, 9, 7), 10), end="lost")
    path = m.journal.write(tmp_path / "now.journal")
    now = round(at(dt.date(2026, 9, 7), 11) * US)
    records = read_records(JournalSource(files=(str(path),)), now - 86400 * US, now, now=now)
    records.current_boot = boot.id           # as if this were the machine's current boot
    (run,) = build_runs(records)
    assert (run.ended, run.closed_by, run.end - run.start) == ("running", "now", round(3599.5 * US))


def test_a_run_whose_start_was_rotated_away_is_rebuilt_from_alive_seconds(tz, tmp_path, capsys) -> None:
    tz("UTC")
    day = dt.date(2026, 9, 7)
    m = Machine()
    m.boot(at(day, 6))
    m.run(at(day, 10), [Req(at(day, 10, 2), 2.0)], idle_timeout=300, device="cuda:1")
    assert m.journal.drop(b"E2VD_EVENT=start\n") == 1
    doc = report_json(capsys, m.journal.write(tmp_path / "rotated.journal"), "--since", "2026-09-07",
                      "--until", "2026-09-08")
    assert doc["held_seconds"] == {"cuda:1": pytest.approx(hms(10, 2, 2) + 300 - hms(10, 0, 0.5), abs=1e-6)}


# ------------------------------------------------------------------------ devices, instances, what-if
def test_cpu_runs_are_not_gpu_held_and_instances_are_reported_apart_and_together(tz, tmp_path, capsys) -> None:
    tz("UTC")
    day = dt.date(2026, 9, 7)
    journal = journalfiles.Journal()
    a = Machine(journal)
    a.boot(at(day, 6))
    b = Machine(journal, unit="e2vd@big.service")
    b.current, b.machine_id, b._pid = a.current, a.machine_id, 5000      # same boot, other pids
    a.run(at(day, 10), [Req(at(day, 10, 0, 10), 2.0)], device="cuda:0", end="stopped", end_at=at(day, 11))
    a.run(at(day, 12), [Req(at(day, 12, 0, 10), 2.0)], device="cpu", load=2.0, end="stopped", end_at=at(day, 12, 30))
    b.run(at(day, 10, 30), [Req(at(day, 10, 31), 2.0)], device="cuda:1", load=6.0, end="stopped", end_at=at(day, 14))
    path = journal.write(tmp_path / "two.journal")
    doc = report_json(capsys, path, "--since", "2026-09-07", "--until", "2026-09-08")
    assert doc["instances"] == ["e2vd", "e2vd@big"]
    assert doc["held_seconds"] == {"cuda:0": 3599.5, "cuda:1": 12599.5, "cpu": 1799.5}
    assert doc["gpu_held_seconds"] == 3599.5 + 12599.5 and doc["always_on_hours"] == 48.0
    assert doc["by_instance"]["e2vd"]["gpu_held_seconds"] == 3599.5
    assert doc["by_instance"]["e2vd"]["always_on_hours"] == 24.0
    assert doc["by_instance"]["e2vd@big"]["requests"]["total"] == 1
    # inference on the CPU run does not count as GPU busy time
    assert doc["gpu_busy_percent"] == pytest.approx(100 * 4.0 / (3599.5 + 12599.5), abs=1e-4)
    # connect -> ready: 0.5 s to the process, then 2.0, 3.5 and 6.0 s of loading; p95 interpolated
    assert (doc["cold_starts"]["connect_to_ready_p50_s"], doc["cold_starts"]["connect_to_ready_p95_s"]) == (4.0, 6.25)
    only = report_json(capsys, path, "--since", "2026-09-07", "--until", "2026-09-08", "--unit", "e2vd@big.service")
    assert only["instances"] == ["e2vd@big"] and only["held_seconds"] == {"cuda:1": 12599.5}
    assert "by_instance" not in only and only["always_on_hours"] == 24.0
    rc, text, _ = run_report(capsys, path, "--since", "2026-09-07", "--until", "2026-09-08")
    assert rc == 0 and re.search(r"^e2vd@big\s+3\.50 h\s+1\s+1\s+85\.4 %$", text, re.M), text


def test_the_fallback_models_device_does_not_move_a_gpu_run_to_the_cpu(tz, tmp_path, capsys) -> None:
    """The fallback (fallback_device = cpu by default) logs its own device_chosen after the main
    model loaded: the run still holds the main model's GPU; a CPU run whose fallback takes a GPU
    counts as held on that GPU."""
    tz("UTC")
    day = dt.date(2026, 9, 7)
    journal = journalfiles.Journal()
    a = Machine(journal)
    a.boot(at(day, 6))
    a.run(at(day, 10), [Req(at(day, 10, 0, 10), 2.0)], device="cuda:0", fallback_device="cpu",
          end="stopped", end_at=at(day, 11))
    a.run(at(day, 12), [Req(at(day, 12, 0, 10), 2.0)], device="cpu", fallback_device="cuda:1",
          end="stopped", end_at=at(day, 12, 30))
    doc = report_json(capsys, journal.write(tmp_path / "fb.journal"), "--since", "2026-09-07", "--until", "2026-09-08")
    assert doc["held_seconds"] == {"cuda:0": 3599.5, "cuda:1": 1799.5}, doc["held_seconds"]


def test_what_if_idle_timeouts_and_warmup_windows_equal_a_hand_computation(tz, tmp_path, capsys) -> None:
    """Mon 2026-09-07: recognitions at 10:00, 10:03 and 10:20, 2 s each; recorded idle timeout 300 s."""
    tz("UTC")
    day = dt.date(2026, 9, 7)
    m = Machine()
    m.boot(at(day, 6))
    m.serve([Req(at(day, 10), 2.0), Req(at(day, 10, 3), 2.0), Req(at(day, 10, 20), 2.0)], idle_timeout=300)
    doc = report_json(capsys, m.journal.write(tmp_path / "whatif.journal"), "--since", "2026-09-07",
                      "--until", "2026-09-08", "--price-per-hour", "3.60",
                      "--what-if", "idle_timeout=60,300,15m", "--what-if", "warmup=none,10:00-10:30")
    # recorded: 10:00:00.5 -> 10:08:02 (10:03 came within 300 s of 10:00:06) and 10:20:00.5 -> 10:25:06
    assert doc["gpu_held_seconds"] == (hms(10, 8, 2) - hms(10, 0, 0.5)) + (hms(10, 25, 6) - hms(10, 20, 0.5)) == 787.0
    got = {(s["idle_timeout_s"], s["warmup"]): (s["held_seconds"], s["cold_starts"])
           for s in doc["what_if"]["scenarios"]}
    assert got == {
        (300.0, "recorded"): (787.0, 2),
        # 60 s: each request its own daemon, 0.5 + 3.5 + 2 + 60 s after its arrival
        (60.0, "none"): (3 * 65.5, 3),
        # a warmup at 10:00 holding until 10:30 keeps one daemon from 10:00:00.5 to 10:31:00
        (60.0, "10:00-10:30"): (hms(10, 31) - hms(10, 0, 0.5), 1),
        (300.0, "none"): (787.0, 2),
        (300.0, "10:00-10:30"): (hms(10, 35) - hms(10, 0, 0.5), 1),
        # 900 s: 10:00:00.5 -> 10:03:02 + 900 s, then 10:20:00.5 -> 10:20:06 + 900 s
        (900.0, "none"): ((hms(10, 18, 2) - hms(10, 0, 0.5)) + (hms(10, 35, 6) - hms(10, 20, 0.5)), 2),
        (900.0, "10:00-10:30"): (hms(10, 45) - hms(10, 0, 0.5), 1),
    }
    for s in doc["what_if"]["scenarios"]:      # 3.60 an hour: a thousandth of the held seconds
        assert s["cost"]["on_demand"] == pytest.approx(s["held_seconds"] / 1000, abs=0.005)
        assert s["saving_percent"] == pytest.approx(100 * (1 - s["held_seconds"] / 86400), abs=1e-3)
    assert doc["what_if"]["replayed_requests"] == 3
    scenarios = whatif.parse_what_if(["idle_timeout=1m,2h", "warmup=none"])
    assert [(s.idle_timeout_s, s.warmup) for s in scenarios] == [(60.0, None), (7200.0, None)]
    for bad in ["idle_timeout=soon", "warmup=18:00-09:00", "nap=3", "idle_timeout"]:
        with pytest.raises(ValueError, match="--what-if"):
            whatif.parse_what_if([bad])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replaying_random_arrivals_with_the_recorded_settings_gives_the_measured_time(tz, tmp_path, capsys,
                                                                                      seed) -> None:
    """The replay and the daemon's rules agree: a week of random arrivals (bursts, gaps around the
    idle timeout, warmups on some mornings) grouped into runs by tests/journalfiles.py's own
    implementation of those rules; replayed with the recorded settings, the held time and the
    cold starts are the measured ones to the microsecond."""
    import random

    tz("Europe/Berlin")
    rng = random.Random(seed)
    m = Machine()
    m.boot(at(dt.date(2026, 9, 6), 6))
    arrivals = []
    for day in [dt.date(2026, 9, d) for d in range(7, 14)]:
        if rng.random() < 0.5:
            arrivals.append(warmup(at(day, 8, 55), rng.choice([600.0, 3600.0, 4 * 3600.0])))
        t = at(day, 7)
        while t < at(day, 20):
            t += rng.choice([rng.uniform(1, 30), rng.uniform(100, 140), rng.uniform(600, 3000)])
            arrivals.append(Req(round(t, 3), round(rng.uniform(0.2, 8.0), 3), audio=1.0))
    m.serve(arrivals, idle_timeout=120, start_delay=0.7, load=2.3)
    doc = report_json(capsys, m.journal.write(tmp_path / "random.journal"), "--since", "2026-09-07",
                      "--until", "2026-09-14", "--what-if", "idle_timeout=120")
    (base,) = doc["what_if"]["scenarios"]
    assert base["recorded"] and base["idle_timeout_s"] == 120.0
    assert (base["held_seconds"], base["cold_starts"]) == (doc["gpu_held_seconds"], doc["cold_starts"]["count"])
    assert doc["cold_starts"]["count"] > 20


def test_a_journal_without_e2vd_records_says_so_and_exits_0(tz, tmp_path, capsys) -> None:
    tz("UTC")
    m = Machine()
    m.boot(at(dt.date(2026, 9, 7), 6))
    m.note(at(dt.date(2026, 9, 7), 9), "nothing to do with e2vd")
    path = m.journal.write(tmp_path / "quiet.journal")
    rc, out, err = run_report(capsys, path, "--since", "2026-09-01", "--until", "2026-10-01")
    assert (rc, err) == (0, "") and "No e2vd activity in this period" in out
    doc = report_json(capsys, path, "--since", "2026-09-01", "--until", "2026-10-01")
    assert doc["active"] is False and doc["gpu_held_hours"] == 0 and doc["requests"]["total"] == 0
    assert doc["saving_percent"] == 100.0 and len(doc["days"]) == 30


def test_a_journal_that_cannot_be_read_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch) -> None:
    for args, words in ((["--file", str(tmp_path / "missing.journal")], "does not exist"),
                        (["--directory", str(tmp_path)], "no journal files"),
                        (["--directory", str(tmp_path / "nowhere")], "not a directory")):
        rc = report.main(args)
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    text, cut = tmp_path / "text.journal", tmp_path / "cut.journal"
    text.write_bytes(b"not a journal\n" * 100)
    m = Machine()
    m.boot(1790000000.0)
    m.run(1790000100.0, [Req(1790000110.0, 1.0)])
    cut.write_bytes(m.journal.write(tmp_path / "whole.journal").read_bytes()[:1000])
    for path in (text, cut):
        rc = report.main(["--file", str(path)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"journal file {path}:" in err and "not a journal file, or a truncated or damaged one" in err
    from e2vd import journalread

    monkeypatch.setattr(journalread, "SYSTEM_JOURNAL_DIRS", (str(tmp_path / "var"), str(tmp_path / "run")))
    assert report.main([]) == 1
    assert "no system journal" in capsys.readouterr().err
    (tmp_path / "var" / "abc").mkdir(parents=True)
    (tmp_path / "var" / "abc" / "system.journal").write_bytes(b"")
    monkeypatch.setattr(journalread, "_readable", lambda path: False)
    assert report.main([]) == 1
    err = capsys.readouterr().err
    assert "permission denied" in err and "systemd-journal" in err and err.count("\n") == 1


@pytest.mark.parametrize("alive", ["nan", "inf", "-inf", "1e308", "99999999999999999999999", "-5"])
def test_absurd_field_values_are_read_as_missing_with_a_note(tz, tmp_path, capsys, alive) -> None:
    """A hostile or damaged journal: E2VD_ALIVE_SECONDS NaN, infinite, negative or beyond any uptime
    once crashed the report (ValueError/OverflowError in build_runs) or moved a run's start after
    its end; request fields the same. Each is read as missing, and stderr says so in one line."""
    tz("UTC")
    day = dt.date(2026, 9, 7)

    def journal(alive_field: str | None, name: str) -> Path:
        m = Machine()
        m.boot(at(day, 6))
        run = m.run(at(day, 10), [Req(at(day, 10, 2), 2.0)], idle_timeout=300, end="lost")
        m.e2vd(at(day, 10, 30), run.pid, run.invocation, "idle_exit", "idle exit", alive_seconds=alive_field)
        if alive_field is not None:
            m.e2vd(at(day, 10, 20), run.pid, run.invocation, "request", "POST /v1/recognize -> 200",
                   path="/v1/recognize", status="1e30", total_ms=alive_field, queue_ms="inf",
                   audio_seconds=alive_field, infer_ms="-1e300", client_uid="nan", batch_size="1e40")
        assert m.journal.drop(b"E2VD_EVENT=start\n") == 1
        return m.journal.write(tmp_path / name)

    bad = journal(alive, "bad.journal")
    rc, out, err = run_report(capsys, bad, "--json", "--since", "2026-09-07", "--until", "2026-09-08")
    assert rc == 0 and "Traceback" not in err, err
    assert err.count("\n") == 1 and "E2VD_ALIVE_SECONDS x1" in err and "read as missing" in err
    doc, plain = json.loads(out), report_json(capsys, journal(None, "plain.journal"), "--since", "2026-09-07",
                                              "--until", "2026-09-08")
    assert doc["held_seconds"] == plain["held_seconds"]
    assert doc["requests"]["total"] == plain["requests"]["total"] + 1


def test_an_unprivileged_user_gets_permission_denied(tmp_path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run(nobody + ["-c", "import e2vd.report"], capture_output=True, cwd="/", env=env)
    if probe.returncode != 0:
        pytest.skip("user nobody cannot run this checkout's Python (its directories are private)")
    m = Machine()
    m.boot(1.79e9)
    folder = Path(tempfile.mkdtemp(prefix="e2vd-report-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = m.journal.write(folder / "root-only.journal")
        path.chmod(0o640)
        cp = subprocess.run(nobody + ["-m", "e2vd.report", "--file", str(path)], capture_output=True, text=True,
                            cwd="/", env=env)
    finally:
        shutil.rmtree(folder)
    assert cp.returncode == 1 and cp.stdout == "", cp
    assert cp.stderr.strip() == (f"e2vd report: cannot read the journal: {path}: permission denied "
                                 "(run as root or as a member of group systemd-journal or adm)")


def test_reading_in_slices_by_several_processes_gives_the_same_records(tz, tmp_path) -> None:
    tz("Europe/Berlin")
    path = issue_month(tmp_path / "month.journal")
    period, _ = report.period_from(None, None, "2026-09", now=2e9)
    one = read_records(JournalSource(files=(str(path),)), period.since, period.until, workers=1)
    three = read_records(JournalSource(files=(str(path),)), period.since, period.until, workers=3)
    assert len(one.requests) == len(three.requests) == 22 * 88 + 4
    for col in ("ts", "status", "uid", "total_us", "queue_us", "audio_s", "infer_s", "hold_s"):
        assert (getattr(one.requests, col) == getattr(three.requests, col)).all(), col
    assert [one.requests.paths[i] for i in one.requests.path] == [three.requests.paths[i] for i in three.requests.path]


def test_the_cli_runs_the_report(tz, tmp_path, capsys) -> None:
    from e2vd import cli

    tz("UTC")
    m = Machine()
    m.boot(at(dt.date(2026, 9, 7), 6))
    m.serve([Req(at(dt.date(2026, 9, 7), 10), 2.0)], idle_timeout=60)
    path = m.journal.write(tmp_path / "cli.journal")
    assert cli.main(["report", "--file", str(path), "--since", "2026-09-07", "--until", "2026-09-08", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_held_seconds"] == 3.5 + 2.0 + 60


# ------------------------------------------------------------------------------ under real systemd
@pytest.mark.systemd
@pytest.mark.slow
def test_report_in_a_real_systemd_equals_the_runs_alive_seconds() -> None:
    import sdbox
    from conftest import standin_dir, wav_clip
    from e2vd.client import Client

    reason = sdbox.unavailable_reason()
    if reason:
        pytest.skip(f"no throw-away systemd: {reason}")
    model = "/srv/e2vd-models/tiny"
    env = {"PYTHONPATH": str(ROOT)}
    e2vd = [sys.executable, "-m", "e2vd"]
    box = sdbox.Box.start(f"e2vd-report-{os.getpid()}", binds_ro=[f"{standin_dir('tiny')}:{model}"])
    try:
        box.run(e2vd + ["install", "--no-pull"], env=env)
        box.run(["systemctl", "stop", "e2vd.service"])
        box.write("/etc/e2vd/e2vd.toml", f'model = "{model}"\ndevice = "cpu"\nidle_timeout = 2\n')
        sock = f"/proc/{box.init}/root/run/e2vd/e2vd.sock"
        for i in range(3):
            with Client(sock, timeout=180) as c:
                c.recognize(wav_clip(1.0, seed=i))
                c.recognize(wav_clip(0.5, seed=i))
            deadline = time.monotonic() + 60
            while box.run(["systemctl", "is-active", "e2vd.service"], check=False).stdout.strip() != "inactive":
                assert time.monotonic() < deadline, "the daemon did not exit after its idle timeout"
                time.sleep(0.1)
        exits = box.run(["journalctl", "--no-pager", "-o", "json", "E2VD_EVENT=idle_exit"]).stdout.splitlines()
        alive = [float(json.loads(line)["E2VD_ALIVE_SECONDS"]) for line in exits]
        cp = box.run(e2vd + ["report", "--json", "--since", "-1h"], env=env)   # the box's system journal
        doc = json.loads(cp.stdout)
    finally:
        box.stop()
    assert len(alive) >= 3
    assert doc["runs"]["count"] == len(alive) and doc["runs"]["ended"] == {"idle": len(alive)}
    assert doc["held_seconds"]["cpu"] == pytest.approx(sum(alive), abs=0.1)
    assert doc["gpu_held_seconds"] == 0 and doc["requests"]["recognitions"] == 2 * len(alive)
    assert doc["cold_starts"]["count"] == len(alive) and doc["cold_starts"]["measured"] == len(alive)
    print(f"\nreport: {doc['held_seconds']['cpu']:.3f} s held; the runs' alive_seconds add up to {sum(alive):.3f} s")


def test_relative_times_through_the_e2vd_command(tmp_path) -> None:
    """`e2vd report --since -2h` (the real command line, not the module's own parser)."""
    m = Machine()
    now = report._now()
    m.boot(now - 86400)
    path = m.journal.write(tmp_path / "empty.journal")
    proc = subprocess.run([sys.executable, "-m", "e2vd", "report", "--file", str(path), "--since", "-2h",
                           "--until", "-1h", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["period"]["hours"] == 1.0
