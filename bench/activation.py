#!/usr/bin/env python3
"""Cold start vs warm request through a real systemd (socket activation), tiny and large stand-ins.

Boots a throw-away systemd (tests/sdbox.py), runs `e2vd install` in it, and for each stand-in:
  cold: e2vd.service inactive (no process) -> connect to /run/e2vd/e2vd.sock -> first result:
        systemd starts the daemon, it imports torch/funasr, loads the model, answers;
  warm: the same request to the running daemon (fresh connection each time).
Prints the median of each and the ratio cold/warm.  The page cache is warm (files were read
before), so "cold" is a process cold start, not a disk cold start.  CPU only here.

With ``--against REV`` it compares this checkout's daemon with the one at git revision REV in the
same box, cold starts taking turns (ABBA order), so that a regression is a ratio measured in one
run rather than two figures from two days with different machine load. Both daemons run under
their own tree's e2vd.service template, rendered the same way (`e2vd install`'s
renderer, for this venv); REV's daemon runs its own code (``git archive`` of REV, put first on PYTHONPATH).

    sudo .venv/bin/python bench/activation.py [--presets tiny large] [--cold 3] [--warm 20]
    sudo .venv/bin/python bench/activation.py --against 95e57ec --cold 6 --warm 0
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


import sdbox  # noqa: E402
from conftest import standin_dir, wav_clip  # noqa: E402
from e2vd.client import Client  # noqa: E402

PY = str(Path(sys.executable))
ENV = {"PYTHONPATH": str(ROOT)}
SOCK = "/run/e2vd/e2vd.sock"
UNIT = "/etc/systemd/system/e2vd.service"
BASELINE = "/srv/e2vd-baseline"   # where --against's tree is bound in the box


def request_s(sock: str, data: bytes) -> float:
    """Seconds from connect() to the decoded result, on a fresh connection."""
    t0 = time.perf_counter()
    with Client(sock, timeout=900) as c:
        r = c.recognize(data)
    assert len(r.scores) == 9
    return time.perf_counter() - t0


def cold_s(box: sdbox.Box, data: bytes) -> float:
    """Stop e2vd.service (the socket keeps listening) and time one socket-activated request."""
    box.run(["systemctl", "stop", "e2vd.service"])
    state = box.run(["systemctl", "is-active", "e2vd.service"], check=False).stdout.strip()
    assert state in ("inactive", "failed"), state
    return request_s(f"/proc/{box.init}/root{SOCK}", data)


def set_model(box: sdbox.Box, model: str) -> None:
    box.write("/etc/e2vd/e2vd.toml", f'model = "{model}"\ndevice = "cpu"\nidle_timeout = 600\n')


def measure(box: sdbox.Box, model: str, data: bytes, cold_runs: int, warm_runs: int) -> tuple[list[float], list[float]]:
    """Cold and warm request times (seconds) for `model`."""
    set_model(box, model)
    cold, warm = [], []
    for _ in range(cold_runs):
        cold.append(cold_s(box, data))
        warm += [request_s(f"/proc/{box.init}/root{SOCK}", data) for _ in range(warm_runs)]
    box.run(["systemctl", "stop", "e2vd.service"])
    return cold, warm


def service_unit(templates: Path, pythonpath: str | None) -> str:
    """e2vd.service rendered by `e2vd install` from the templates in `templates` for this venv, with
    PYTHONPATH set to `pythonpath` (so that `e2vd serve` runs that tree's code) when given."""
    from e2vd import install

    text = install.render_units(install.Layout.detect(PY), install.Options(), templates)["e2vd.service"]
    if pythonpath:
        text = text.replace("\nExecStart=", f"\nEnvironment=PYTHONPATH={pythonpath}\nExecStart=", 1)
    return text


def compare(box: sdbox.Box, presets: dict[str, Path], data: bytes, units: dict[str, str], runs: int) -> None:
    """Cold starts of each unit in `units` (name -> unit text), taking turns ABBA, per preset."""
    names = list(units)
    for preset in presets:
        set_model(box, f"/srv/e2vd-models/{preset}")
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(runs):
            for name in (names if i % 2 == 0 else names[::-1]):
                box.write(UNIT, units[name])
                box.run(["systemctl", "daemon-reload"])
                times[name].append(cold_s(box, data))
        box.run(["systemctl", "stop", "e2vd.service"])
        med = {n: statistics.median(t) for n, t in times.items()}
        spread = "   ".join(f"{n} [{min(t):.2f}..{max(t):.2f}]" for n, t in times.items())
        print(f"{preset:>5}: cold start median  " + "   ".join(f"{n} {med[n]:.2f} s" for n in names)
              + f"   {names[0]}/{names[1]} = {med[names[0]] / med[names[1]]:.3f}   ({spread})")


def baseline_tree(rev: str, into: Path) -> Path:
    """Extract git revision `rev` of this repository into `into` (read-only use) and return it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "large"], choices=["tiny", "large"])
    ap.add_argument("--cold", type=int, default=3, help="cold starts per preset (per daemon with --against)")
    ap.add_argument("--warm", type=int, default=10, help="warm requests after each cold start")
    ap.add_argument("--seconds", type=float, default=2.0, help="audio length of each request")
    ap.add_argument("--against", metavar="REV", help="compare cold starts with the daemon at git revision REV")
    args = ap.parse_args()
    reason = sdbox.unavailable_reason()
    if reason:
        print(f"activation bench: cannot boot a systemd here: {reason}", file=sys.stderr)
        return 2
    models = {p: standin_dir(p) for p in args.presets}
    data = wav_clip(args.seconds)
    # models bound read-only to a neutral path (a checkout below /home or /root is hidden from the service)
    binds = [f"{path}:/srv/e2vd-models/{preset}" for preset, path in models.items()]
    with tempfile.TemporaryDirectory(prefix="e2vd-baseline-") as tmp:
        if args.against:
            binds.append(f"{baseline_tree(args.against, Path(tmp))}:{BASELINE}")
        with sdbox.Box.start(f"bench-{os.getpid()}", binds_ro=binds) as box:
            box.run([PY, "-m", "e2vd", "install", "--no-pull"], env=ENV)   # each preset sets its model below
            if args.against:
                print(f"e2vd socket-activated cold start, this checkout vs {args.against}, CPU, {args.seconds:g} s "
                      f"clip, {os.cpu_count()} CPUs; {args.cold} cold starts each, taking turns")
                units = {"now": service_unit(ROOT / "systemd", str(ROOT)),
                         args.against: service_unit(Path(tmp) / "systemd", BASELINE)}
                compare(box, models, data, units, args.cold)
                return 0
            print(f"e2vd activation through systemd, CPU, {args.seconds:g} s clip, {os.cpu_count()} CPUs; "
                  f"median of {args.cold} cold / {args.cold * args.warm} warm requests")
            for preset in models:
                cold, warm = measure(box, f"/srv/e2vd-models/{preset}", data, args.cold, args.warm)
                c, w = statistics.median(cold), statistics.median(warm)
                print(f"{preset:>5}: cold start (connect -> first result) {c:7.2f} s  "
                      f"[{min(cold):.2f}..{max(cold):.2f}]   warm request {w * 1000:8.1f} ms  "
                      f"[{min(warm) * 1000:.1f}..{max(warm) * 1000:.1f}]   cold/warm = {c / w:6.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
