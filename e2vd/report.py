"""`e2vd report`: GPU-held hours, use and cost of e2vd over a period, from the journal.

`add_arguments(parser)` adds the options to a (sub)parser; `run(args)` prints the report and
returns the exit status (`e2vd.vocabulary.ExitCode`): OK (also when the period had no e2vd
activity: the report says so), FAILED (1) when the journal cannot be read, USAGE (2) for bad
options; errors are one line on stderr. `build(...)` returns the report as the JSON document
`--json` prints (keys documented in the README, "e2vd report").

Reading is `e2vd.journalread`, the sums `e2vd.usage`, the replay of other settings
`e2vd.whatif`. Nothing here imports torch, funasr or ray.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from e2vd.timestamps import US, Period, local_timestamp, parse_timestamp
from e2vd.vocabulary import ExitCode

if TYPE_CHECKING:  # pragma: no cover
    from e2vd import whatif
    from e2vd.usage import Records, Run, Usage

# e2vd.usage and e2vd.whatif (numpy) are imported by the functions that need them, so that
# `e2vd recognize` does not pay for them when the CLI builds its parser.

EXIT_OK, EXIT_JOURNAL, EXIT_USAGE = ExitCode.OK, ExitCode.FAILED, ExitCode.USAGE
DEFAULT_DAYS = 30
BAR_WIDTH = 34
_EIGHTHS = " ▏▎▍▌▋▊▉█"
_RELATIVE = re.compile(r"^-\d")      # "-2h", "-1 day": a value of --since/--until, not an option


class UsageError(ValueError):
    """A bad option; the message is one line for the operator."""

    exit_code = ExitCode.USAGE


def join_relative_times(argv: Sequence[str]) -> list[str]:
    """`argv` with "--since -2h" / "--until -1 day" joined into "--since=-2h", so that argparse
    reads a relative time that starts with "-" as the option's value (as journalctl does), not as
    another option. Other arguments are left as they are."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i] in ("--since", "--until", "-S", "-U") and i + 1 < len(args) \
                and _RELATIVE.match(args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `e2vd report`."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("-D", "--directory", metavar="DIR",
                     help="read the journal files in DIR (like journalctl -D); default: the system journal")
    src.add_argument("--file", action="append", metavar="FILE",
                     help="read this journal file (repeatable; like journalctl --file)")
    p.add_argument("-S", "--since", metavar="TIME",
                   help="period start, as journalctl takes it: 2026-11-01, '2026-11-01 09:00:00', "
                        "yesterday, -2h (default: 30 days ago)")
    p.add_argument("-U", "--until", metavar="TIME", help="period end (default: now)")
    p.add_argument("--month", metavar="YYYY-MM", help="the period is this calendar month (local time)")
    p.add_argument("--unit", action="append", metavar="UNIT",
                   help="only this e2vd unit, e.g. e2vd.service (repeatable; default: every e2vd unit)")
    p.add_argument("--price-per-hour", type=_price, metavar="P", help="what one GPU hour costs on demand")
    p.add_argument("--always-on-price-per-hour", type=_price, metavar="P",
                   help="what a GPU hour costs when rented around the clock (default: --price-per-hour)")
    p.add_argument("--currency", default="", metavar="CUR", help="label for the prices, e.g. EUR")
    p.add_argument("--what-if", action="append", metavar="KEY=V1,V2",
                   help="replay the period's requests with other settings: idle_timeout=60,300,900 "
                        "and/or warmup=09:00-18:00,none (repeatable; values combine)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON document")
    fmt.add_argument("--csv", action="store_true", help="print the per-day rows as CSV")


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a price: give a number >= 0, e.g. 2.50")
    return value


def _now() -> float:
    """The current time (Unix seconds); tests replace it."""
    return time.time()


# --- the period ----------------------------------------------------------------------------------

def period_from(since: str | None, until: str | None, month: str | None, now: float) -> tuple[Period, bool]:
    """The period the options ask for, and whether its end was cut to `now`. Raises UsageError."""
    if month is not None:
        if since is not None or until is not None:
            raise UsageError("--month cannot be combined with --since/--until")
        try:
            first = _dt.datetime.strptime(month.strip(), "%Y-%m").date()
        except ValueError:
            raise UsageError(f"bad --month {month!r}: use YYYY-MM, e.g. 2026-11") from None
        nxt = (first.replace(day=28) + _dt.timedelta(days=4)).replace(day=1)
        lo, hi = local_timestamp(first.year, first.month, 1), local_timestamp(nxt.year, nxt.month, 1)
    else:
        try:
            lo = parse_timestamp(since, now) if since is not None else now - DEFAULT_DAYS * 86400
            hi = parse_timestamp(until, now) if until is not None else now
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    cut = hi > now
    hi = min(hi, now)
    if hi <= lo:
        raise UsageError(f"the period is empty: it ends ({_fmt_time(hi)}) before it begins ({_fmt_time(lo)})"
                         if not cut else f"the period begins in the future ({_fmt_time(lo)})")
    return Period(round(lo * US), round(hi * US)), cut


# --- the report document ---------------------------------------------------------------------

@dataclass
class Prices:
    """Price of a GPU hour on demand and always on (same when only one is given)."""

    on_demand: float
    always_on: float
    currency: str = ""


def build(records: Records, period: Period, *, prices: Prices | None = None,
          scenarios: Sequence[whatif.Scenario] = (), source: str = "", cut_to_now: bool = False) -> dict[str, Any]:
    """The report as a JSON-ready dict (README "e2vd report" lists the keys)."""
    from e2vd.usage import build_runs, summarize

    runs = build_runs(records)
    total = summarize(runs, records.requests, period)
    doc: dict[str, Any] = {
        "period": _period_doc(period, cut_to_now),
        "journal": {"source": source, "first_record": None if records.first is None else _iso(records.first),
                    "covers_period": records.first is None or records.first <= period.since},
        "active": total.active,
        "instances": total.instances,
    }
    doc.update(_usage_doc(total, period, prices))
    doc["what_if"] = _what_if_doc(total, runs, records, period, scenarios, prices) if scenarios else None
    if len(total.instances) > 1:
        doc["by_instance"] = {name: _usage_doc(summarize(runs, records.requests, period, [name]), period, prices,
                                               instances=1)
                              for name in total.instances}
    return doc


def _usage_doc(u: Usage, period: Period, prices: Prices | None, instances: int | None = None) -> dict[str, Any]:
    from e2vd.usage import is_gpu, percentile

    n = instances if instances is not None else max(1, len(u.instances))
    always_on_s = period.seconds * n
    gpu_s = u.gpu_held_us / US
    devices = sorted(u.held_us, key=lambda d: (not is_gpu(d), d))
    c2r = u.connect_to_ready_s
    return {
        "held_hours": {d: _r(u.held_us.get(d, 0) / US / 3600) for d in devices},
        "held_seconds": {d: _r(u.held_us.get(d, 0) / US) for d in devices},
        "gpu_held_hours": _r(gpu_s / 3600),
        "gpu_held_seconds": _r(gpu_s),
        "always_on_hours": _r(always_on_s / 3600),
        "saving_percent": _r(100.0 * (1 - gpu_s / always_on_s), 3) if always_on_s > 0 else None,
        "cost": _cost(gpu_s / 3600, always_on_s / 3600, prices),
        "runs": {"count": len(u.runs), "ended": u.endings, "ended_abnormally": u.ended_abnormally,
                 "still_running": u.still_running,
                 "abnormal": [{"start": _iso(r.start), "end": _iso(r.end), "closed_by": r.closed_by,
                               "device": r.device, "instance": r.instance}
                              for r in u.runs if r.ended == "abnormal"]},
        "cold_starts": {"count": u.cold_starts, "measured": len(c2r),
                        "connect_to_ready_p50_s": _r(percentile(c2r, 0.5), 3),
                        "connect_to_ready_p95_s": _r(percentile(c2r, 0.95), 3)},
        "requests": {"total": u.requests, "recognitions": u.recognitions,
                     "by_status": {str(k): v for k, v in u.requests_by_status.items()}},
        "audio_hours": _r(u.audio_s / 3600),
        "inference_seconds": _r(u.infer_s, 3),
        "gpu_busy_percent": _r(u.gpu_busy_percent, 4),
        "keep_warm_hours": _r(u.keep_warm_us / US / 3600),
        "days": [{"date": d.date.isoformat(), "weekday": d.date.strftime("%a"),
                  "gpu_held_hours": _r(d.gpu_held_us / US / 3600), "gpu_held_seconds": _r(d.gpu_held_us / US),
                  "held_seconds": {k: _r(v / US) for k, v in sorted(d.held_us.items())},
                  "requests": d.requests, "audio_hours": _r(d.audio_s / 3600),
                  "inference_seconds": _r(d.infer_s, 3), "cold_starts": d.cold_starts,
                  "keep_warm_hours": _r(d.keep_warm_us / US / 3600)} for d in u.days],
        "users": [{"uid": x.uid, "user": _user_name(x.uid), "requests": x.requests,
                   "recognitions": x.recognitions, "audio_seconds": _r(x.audio_s, 3)}
                  for x in sorted(u.users.values(), key=lambda x: (-x.requests, str(x.uid)))],
    }


def _cost(gpu_h: float, always_on_h: float, prices: Prices | None) -> dict[str, Any] | None:
    if prices is None:
        return None
    on, always = gpu_h * prices.on_demand, always_on_h * prices.always_on
    return {"currency": prices.currency, "price_per_hour": prices.on_demand,
            "always_on_price_per_hour": prices.always_on, "always_on": _r(always, 2),
            "on_demand": _r(on, 2), "saving": _r(always - on, 2),
            "saving_percent": _r(100.0 * (1 - on / always), 3) if always > 0 else None}


def _what_if_doc(u: Usage, runs: list[Run], records: Records, period: Period,
                 scenarios: Sequence[whatif.Scenario], prices: Prices | None) -> dict[str, Any]:
    from e2vd import whatif
    from e2vd.usage import median

    recorded_timeout = _mode(u.idle_timeouts_s) if u.idle_timeouts_s else None
    delay = median(u.start_delay_s) or 0.0
    load = median(u.load_s) or 0.0
    always_on_h = period.seconds * max(1, len(u.instances)) / 3600
    out = []
    recorded = {name: whatif.arrivals(records.requests.select(records.requests.of_instances([name])),
                                      [r for r in runs if r.instance == name], period)
                for name in u.instances or ["e2vd"]}
    chosen = [whatif.Scenario()]
    resolved = {(recorded_timeout, whatif.RECORDED)}
    for sc in scenarios:
        key = (sc.idle_timeout_s if sc.idle_timeout_s is not None else recorded_timeout, sc.warmup)
        if key not in resolved:
            resolved.add(key)
            chosen.append(sc)
    for sc in chosen:
        held = cold = 0
        timeout = sc.idle_timeout_s if sc.idle_timeout_s is not None else recorded_timeout
        if timeout is None:
            timeout = 300.0
        for arrivals in recorded.values():
            o = whatif.replay(arrivals, period, sc, timeout, delay, load)
            held, cold = held + o.held_us, cold + o.cold_starts
        h = held / US / 3600
        baseline = sc is chosen[0]
        out.append({"label": ("recorded: " if baseline else "") + sc.label(recorded_timeout),
                    "recorded": baseline, "idle_timeout_s": timeout,
                    "warmup": {whatif.RECORDED: "recorded", None: "none"}.get(sc.warmup, str(sc.warmup)),  # type: ignore[arg-type]
                    "held_hours": _r(h), "held_seconds": _r(held / US), "cold_starts": cold,
                    "saving_percent": _r(100.0 * (1 - h / always_on_h), 3) if always_on_h > 0 else None,
                    "cost": _cost(h, always_on_h, prices)})
    return {"recorded_idle_timeout_s": recorded_timeout, "start_delay_s": _r(delay, 3), "load_s": _r(load, 3),
            "replayed_requests": sum(len(a) for a in recorded.values()),
            "scenarios": out}


def _period_doc(period: Period, cut: bool) -> dict[str, Any]:
    return {"since": _iso(period.since), "until": _iso(period.until), "hours": _r(period.seconds / 3600),
            "timezone": time.strftime("%Z", time.localtime(period.since / US)), "cut_to_now": cut}


def _mode(values: Sequence[float]) -> float:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], v))


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def _iso(us: int) -> str:
    return _dt.datetime.fromtimestamp(us / US).astimezone().isoformat(timespec="seconds" if us % US == 0 else "microseconds")


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


_USER_NAMES: dict[int, str | None] = {}


def _user_name(uid: int | None) -> str | None:
    """The user name of `uid` on this machine, or None where it does not resolve."""
    if uid is None:
        return None
    if uid not in _USER_NAMES:
        import pwd

        try:
            _USER_NAMES[uid] = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            _USER_NAMES[uid] = None
    return _USER_NAMES[uid]


# --- printing --------------------------------------------------------------------------------------

def render_text(doc: dict[str, Any]) -> str:
    """The report for people, at most 80 columns wide."""
    p, out = doc["period"], []
    since = _dt.datetime.fromisoformat(p["since"])
    until = _dt.datetime.fromisoformat(p["until"])
    out.append(f"e2vd report  {since:%Y-%m-%d %H:%M} → {until:%Y-%m-%d %H:%M} {p['timezone']}"
               f"  ({_num(p['hours'], 1)} h{', to now' if p['cut_to_now'] else ''})")
    j = doc["journal"]
    source = j["source"] if len(j["source"]) <= 70 else "…" + j["source"][-69:]
    out.append(f"journal: {source}")
    if j["first_record"] and not j["covers_period"]:
        out.append(f"(its first record is from {j['first_record'][:16].replace('T', ' ')}: "
                   "the period begins before it)")
    if not doc["active"]:
        out.append("")
        out.append("No e2vd activity in this period: no daemon ran and no request was logged.")
        return "\n".join(out) + "\n"
    if len(doc["instances"]) > 1:
        out.append(f"instances: {', '.join(doc['instances'])} (totals below; each one after the days)")
    out.append("")
    out += _summary_lines(doc)
    out.append("")
    out += _comparison_lines(doc)
    out.append("")
    out += _day_lines(doc["days"])
    if "by_instance" in doc:
        out.append("")
        out.append(f"{'instance':<20}{'GPU held':>12}{'runs':>7}{'requests':>10}{'saving':>9}")
        for name, sub in doc["by_instance"].items():
            out.append(f"{name[:19]:<20}{_hours(sub['gpu_held_seconds']):>12}{sub['runs']['count']:>7}"
                       f"{sub['requests']['total']:>10,}{_pct(sub['saving_percent']):>9}")
    if doc["users"]:
        out.append("")
        out.append(f"{'user':<24}{'requests':>10}{'recognitions':>14}{'audio':>12}")
        for x in doc["users"]:
            who = x["user"] or ("unknown" if x["uid"] is None else f"uid {x['uid']}")
            out.append(f"{who[:23]:<24}{x['requests']:>10,}{x['recognitions']:>14,}{_dur(x['audio_seconds']):>12}")
    if doc["what_if"]:
        out.append("")
        out += _what_if_lines(doc["what_if"], doc["cost"] is not None)
    return "\n".join(out) + "\n"


def _summary_lines(doc: dict[str, Any]) -> list[str]:
    from e2vd.usage import is_gpu

    out = []
    gpu = [d for d in doc["held_seconds"] if is_gpu(d) and doc["held_seconds"][d]]
    other = [d for d in doc["held_seconds"] if not is_gpu(d) and doc["held_seconds"][d]]
    detail = ", ".join(f"{d} {_hours(doc['held_seconds'][d])}" for d in gpu)
    out.append(f"{'GPU held':<14}{_hours(doc['gpu_held_seconds'])}" + (f"  ({detail})" if len(gpu) > 1 else
                                                                    f"  on {gpu[0]}" if gpu else ""))
    if other:
        out.append(f"{'not on a GPU':<14}" + ", ".join(f"{d} {_hours(doc['held_seconds'][d])}" for d in other))
    r = doc["runs"]
    ends = ", ".join(f"{n} {_ENDINGS.get(k, k)}" for k, n in sorted(r["ended"].items(), key=lambda kv: -kv[1]))
    out.append(f"{'runs':<14}{r['count']:,}" + (f": {ends}" if ends else ""))
    for a in r["abnormal"][:5]:
        out.append(f"{'':<16}ended abnormally: {a['start'][:19].replace('T', ' ')} → "
                   f"{a['end'][:19].replace('T', ' ')}, closed by {a['closed_by']}")
    if len(r["abnormal"]) > 5:
        out.append(f"{'':<16}... and {len(r['abnormal']) - 5} more (see --json)")
    c = doc["cold_starts"]
    cs = f"{c['count']:,}"
    if c["measured"]:
        cs += (f"; connect → ready p50 {c['connect_to_ready_p50_s']:.1f} s, p95 {c['connect_to_ready_p95_s']:.1f} s"
               f" ({c['measured']} measured)")
    out.append(f"{'cold starts':<14}{cs}")
    q = doc["requests"]
    statuses = ", ".join(f"{k} × {v:,}" for k, v in q["by_status"].items())
    out.append(f"{'requests':<14}{q['total']:,}" + (f" ({statuses}); {q['recognitions']:,} recognitions"
                                                    if q["total"] else ""))
    busy = doc["gpu_busy_percent"]
    out.append(f"{'audio':<14}{_dur(doc['audio_hours'] * 3600)}; inference {_dur(doc['inference_seconds'])}"
               + (f" = GPU busy {busy:.2f} % of GPU-held time" if busy is not None else ""))
    out.append(f"{'keep-warm':<14}{_hours(doc['keep_warm_hours'] * 3600)}")
    return out


_ENDINGS = {"idle": "idle exits", "stopped": "stopped", "unavailable": "model unavailable",
            "abnormal": "ended abnormally", "running": "still running"}


def _comparison_lines(doc: dict[str, Any]) -> list[str]:
    out = [f"{'':<16}{'always on':>14}{'on demand':>14}{'saving':>10}",
           f"{'GPU held':<16}{_num(doc['always_on_hours'], 1) + ' h':>14}{_num(doc['gpu_held_hours'], 1) + ' h':>14}"
           f"{_pct(doc['saving_percent']):>10}"]
    if not doc["gpu_held_seconds"] and any(doc["held_seconds"].values()):
        out.append("(no run held a GPU in this period: the runs above used the CPU)")
    c = doc["cost"]
    if c is not None:
        label = f"cost ({c['currency']})" if c["currency"] else "cost"
        out.append(f"{label[:16]:<16}{_num(c['always_on'], 2):>14}{_num(c['on_demand'], 2):>14}"
                   f"{_pct(c['saving_percent']):>10}")
    return out


def _day_lines(days: list[dict[str, Any]]) -> list[str]:
    peak = max((d["gpu_held_seconds"] for d in days), default=0.0)
    scale = _nice_scale(peak / 3600 / BAR_WIDTH) if peak else 0.0
    head = f"{'day':<15}{'GPU held':>9}{'reqs':>6}{'audio':>9}  "
    out = [head + (f"GPU held (█ = {_num(scale, 3 if scale < 0.1 else 2).rstrip('0').rstrip('.')} h)" if scale else "")]
    for d in days:
        date = _dt.date.fromisoformat(d["date"])
        bar = _bar(d["gpu_held_seconds"] / 3600 / scale) if scale else ""
        out.append(f"{date:%a %Y-%m-%d} {_num(d['gpu_held_hours'], 2) + ' h':>9}{d['requests']:>6,}"
                   f"{_dur(d['audio_hours'] * 3600):>9}  {bar}".rstrip())
    return out


def _nice_scale(per_cell: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k hours per full block at least `per_cell`."""
    k = 1e-4
    while True:
        for m in (1, 2, 2.5, 5):
            if m * k >= per_cell:
                return m * k
        k *= 10


def _bar(cells: float) -> str:
    """A horizontal bar `cells` blocks long, in eighths."""
    eighths = int(round(cells * 8))
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _what_if_lines(w: dict[str, Any], with_cost: bool) -> list[str]:
    out = [f"what if: {w['replayed_requests']:,} requests replayed; a cold start: process "
           f"{w['start_delay_s']:.1f} s + model {w['load_s']:.1f} s"]
    out.append(f"{'settings':<34}{'held':>11}{'cold starts':>13}" + (f"{'cost':>12}" if with_cost else "")
               + f"{'saving':>9}")
    for s in w["scenarios"]:
        label = re.sub(r"idle_timeout=([\d.e+]+)", r"idle \1 s", s["label"]).replace("recorded: ", "* ")
        out.append(f"{label[:33]:<34}{_hours(s['held_seconds']):>11}{s['cold_starts']:>13,}"
                   + (f"{_num(s['cost']['on_demand'], 2):>12}" if with_cost else "") + f"{_pct(s['saving_percent']):>9}")
    out.append("* the recorded settings replayed: compare with the measured time above")
    return out


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} %"


def _hours(seconds: float) -> str:
    """"193.69 h" (hours with two decimals), or minutes/seconds below an hour."""
    if seconds >= 3600:
        return f"{seconds / 3600:,.2f} h"
    return _dur(seconds)


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def render_csv(doc: dict[str, Any]) -> str:
    """The per-day rows as CSV (a header line first)."""
    from e2vd.usage import is_gpu

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["date", "weekday", "gpu_held_hours", "gpu_held_seconds", "cpu_held_seconds", "requests",
                "audio_hours", "inference_seconds", "cold_starts", "keep_warm_hours"])
    for d in doc["days"]:
        cpu = sum(v for k, v in d["held_seconds"].items() if not is_gpu(k))
        w.writerow([d["date"], d["weekday"], d["gpu_held_hours"], d["gpu_held_seconds"], round(float(cpu), 6),
                    d["requests"], d["audio_hours"], d["inference_seconds"], d["cold_starts"], d["keep_warm_hours"]])
    return buf.getvalue()


# --- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """`e2vd report` with parsed `args`; returns the exit code."""
    from e2vd import whatif
    from e2vd.journalread import JournalError, JournalSource, read_records

    now = _now()
    try:
        period, cut = period_from(args.since, args.until, args.month, now)
        scenarios = whatif.parse_what_if(args.what_if or [])
    except (UsageError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    prices = None
    if args.price_per_hour is not None or args.always_on_price_per_hour is not None:
        on = args.price_per_hour if args.price_per_hour is not None else args.always_on_price_per_hour
        always = args.always_on_price_per_hour if args.always_on_price_per_hour is not None else on
        prices = Prices(on, always, args.currency)
    source = JournalSource(args.directory, tuple(args.file or ()))
    try:
        records = read_records(source, period.since, period.until, args.unit, now=round(now * US))
    except JournalError as exc:
        _err(str(exc))
        return EXIT_JOURNAL
    if records.ignored:
        _err("note: ignored out-of-range values in the journal (NaN, infinite, negative or absurd; read as "
             "missing): " + ", ".join(f"{name} x{count}" for name, count in sorted(records.ignored.items())))
    doc = build(records, period, prices=prices, scenarios=scenarios, source=str(source), cut_to_now=cut)
    if not doc["active"] and (args.json or args.csv):
        _err(f"no e2vd activity between {doc['period']['since']} and {doc['period']['until']}")
    if args.json:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    elif args.csv:
        text = render_csv(doc)
    else:
        text = render_text(doc)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return EXIT_OK


def _err(message: str) -> None:
    try:
        print(f"e2vd report: {message}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m e2vd.report ...`: the same as `e2vd report ...`."""
    p = argparse.ArgumentParser(prog="e2vd report", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(join_relative_times(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
