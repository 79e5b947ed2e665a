"""e2vd.durations: human durations ("90s", "1h30m") and clock times ("18:00") from the command line
and the config file, with hostile inputs: huge numbers, negatives, NaN, infinity, odd units and
digits. Every refusal is a ValueError whose message names the text and shows an example."""
from __future__ import annotations

import datetime as dt
import math

import pytest

from e2vd.durations import format_duration, parse_clock, parse_duration, seconds_until


# -- parse_duration -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("2.5", 2.5), ("0", 0), ("1e3", 1000), ("+5", 5),
    ("90s", 90), ("30m", 1800), ("9h", 32400), ("1d", 86400), ("1.5h", 5400),
    ("1h30m", 5400), ("1d2h3m4s", 93784), ("0s", 0), (" 45 s ", 45), ("1H30M", 5400), ("1 h 30 m", 5400),
])
def test_parse_duration_accepts_numbers_and_units_largest_first(text: str, seconds: float) -> None:
    value = parse_duration(text)
    assert value == seconds and isinstance(value, float)


@pytest.mark.parametrize("text, words", [
    ("", "empty duration"), ("   ", "empty duration"),
    ("-5", ">= 0"), ("-0.5", ">= 0"), ("-5s", "e.g. 90s"), ("-1h", "e.g. 90s"),
    ("nan", "finite"), ("NaN", "finite"), ("inf", "finite"), ("-inf", "finite"), ("infinity", "finite"),
    ("1e309", "finite"), ("9" * 400, "finite"),
    ("9x", "unit s, m, h or d"), ("h", "unit s, m, h or d"), ("1w", "unit s, m, h or d"),
    ("5ms", "unit s, m, h or d"), ("1e3s", "unit s, m, h or d"), (".5s", "unit s, m, h or d"),
    ("0x10", "unit s, m, h or d"), ("1h30", "unit s, m, h or d"), ("1h-30m", "unit s, m, h or d"),
    ("30m1h", "largest first"), ("1h1h", "once"), ("1s1s", "once"),
])
def test_parse_duration_refuses_with_the_text_and_an_example(text: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert words in str(e.value)
    assert ("e.g." in str(e.value)) or (">= 0" in str(e.value))


@pytest.mark.parametrize("text", ["9" * 400 + "s", "9" * 400 + "d", "1" + "0" * 310 + "h",
                                  "1" + "0" * 305 + "d",                       # finite number, 86400x overflows
                                  "1" + "0" * 303 + "d" + "2" + "0" * 306 + "m"])  # finite parts, the sum overflows
def test_a_duration_too_large_for_a_float_is_refused_not_infinite(text: str) -> None:
    """float("9" * 400) is inf: a unit part that overflows must not silently become 'forever'."""
    with pytest.raises(ValueError, match="too large|finite"):
        parse_duration(text)


def test_huge_but_finite_durations_stay_finite_numbers() -> None:
    """The callers cap them (the daemon's max_hold, the CLI's checks); parsing keeps them exact."""
    assert parse_duration("99999999999999999999d") == 99999999999999999999 * 86400.0
    assert math.isfinite(parse_duration("1e308"))


@pytest.mark.parametrize("text", ["٣s", "１s", "३h", "１８:００"])
def test_only_ascii_digits_are_numbers(text: str) -> None:
    """\\d in a str pattern matches any script's digits, and int()/float() read them: "٣s" was
    3 seconds. systemd and the rest of the command line read ASCII digits only."""
    parse = parse_clock if ":" in text else parse_duration
    with pytest.raises(ValueError):
        parse(text)


def test_a_long_bad_text_is_shortened_in_the_message() -> None:
    """An operator's terminal gets one readable line, not 10 000 characters echoed back."""
    with pytest.raises(ValueError) as e:
        parse_duration("x" * 10_000)
    assert len(str(e.value)) < 300 and "xxx" in str(e.value)


# -- parse_clock --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, clock", [
    ("18:00", dt.time(18, 0)), ("8:05", dt.time(8, 5)), ("08:05", dt.time(8, 5)), ("0:00", dt.time(0, 0)),
    ("23:59:59", dt.time(23, 59, 59)), ("7:05:09", dt.time(7, 5, 9)), (" 7:30 ", dt.time(7, 30)),
])
def test_parse_clock_accepts_24_hour_times(text: str, clock: dt.time) -> None:
    assert parse_clock(text) == clock


@pytest.mark.parametrize("text", ["", "18", "6pm", "24:00", "18:60", "18:00:60", "-1:00", "7:3", "007:30",
                                  "18:00:00.5", "18.00", "18:00 UTC", "99:99", "1" * 500 + ":00"])
def test_parse_clock_refuses_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM.*e.g. 18:00"):
        parse_clock(text)


# -- seconds_until, format_duration -------------------------------------------------------------

def test_seconds_until_today_and_already_passed() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    now = dt.datetime(2026, 11, 25, 9, 0, 0, 500_000, tzinfo=tz)
    assert seconds_until(dt.time(18, 0), now) == 9 * 3600 - 0.5
    assert seconds_until(dt.time(8, 0), now) == -3600.5
    assert seconds_until(dt.time(9, 0), now) == -0.5


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (0.4, "0 s"), (59.4, "59 s"), (59.5, "1 min 0 s"), (75, "1 min 15 s"), (3600, "1 h 0 min"),
    (32400, "9 h 0 min"), (86400 + 3 * 3600, "1 d 3 h"), (-5, "0 s"), (1e20, "1157407407407407 d 9 h"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds, text", [(math.inf, "inf"), (-math.inf, "0 s"), (math.nan, "nan")])
def test_format_duration_of_a_non_finite_number_does_not_raise(seconds: float, text: str) -> None:
    """round(inf) raises OverflowError: a status line must not die on an odd number."""
    assert format_duration(seconds) == text
