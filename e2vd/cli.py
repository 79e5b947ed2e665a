"""The `e2vd` command: argument parsing and dispatch to the module that does the work.

Exit codes (DESIGN §3): 0 ok, 2 usage, 3 daemon unreachable, 4 request rejected, 5 server error.
This module imports nothing heavy at start; each subcommand imports what it needs.
Messages for people go to stderr; results (tables, JSON) go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED, EXIT_SERVER = 0, 2, 3, 4, 5

SERVICE, SOCKET_UNIT = "e2vd.service", "e2vd.socket"
#: Seconds `e2vd warmup` waits for the model by default (e2vd-warmup.service allows 600).
WARMUP_TIMEOUT = 590.0


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand (the contract of DESIGN §3)."""
    p = argparse.ArgumentParser(
        prog="e2vd", description="Emotion2Vec+ speech emotion recognition daemon and client.",
        epilog="exit codes: 0 ok, 2 usage, 3 daemon unreachable, 4 request rejected (bad input), "
               "5 server error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--socket", help="bind this Unix socket path (ignored when systemd passes a socket)")
    s.add_argument("--model", help="absolute model directory or ModelScope id")
    s.add_argument("--device", help="auto, cpu or cuda:N")
    s.add_argument("--idle-timeout", type=float, dest="idle_timeout", metavar="S",
                   help="exit after S seconds with nothing to do")
    s.add_argument("--config", help="config file (default /etc/e2vd/e2vd.toml)")

    r = sub.add_parser(
        "recognize", help="recognise the emotion in audio files",
        description="Send each FILE's bytes to the daemon (one connection for all) and print the "
                    "scores, most probable emotion first. Exit 4 if any file was rejected.")
    r.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3, ...)")
    r.add_argument("--socket", help="daemon socket (default $E2VD_SOCKET or /run/e2vd/e2vd.sock)")
    r.add_argument("--granularity", choices=["utterance", "frame"], default="utterance",
                   help="embedding per utterance (D,) or per 20 ms frame (T, D)")
    r.add_argument("--embedding", metavar="OUT.npy",
                   help="write the embedding to OUT.npy; with several files, one file each: "
                        "OUT-<file stem>.npy (OUT-<n>-<stem>.npy when stems repeat)")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object per file and line (JSON Lines) instead of a table")
    r.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for an answer, cold start included (default 300)")

    st = sub.add_parser("status", help="show whether the daemon runs (never wakes it)")
    st.add_argument("--socket", help="ask a daemon started by hand on this socket")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("warmup", help="wake the daemon and keep it warm")
    w.add_argument("--socket", help="daemon socket (default $E2VD_SOCKET or /run/e2vd/e2vd.sock)")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--hold", metavar="DURATION", help="keep warm this long, e.g. 90s, 30m, 9h")
    g.add_argument("--until", metavar="HH:MM", help="keep warm until this local time today")
    w.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for the model to load (default 590)")

    i = sub.add_parser("install", help="install and start the systemd units (root)")
    i.add_argument("--group", default="e2vd")
    i.add_argument("--warmup-calendar", default="Mon..Fri 08:55", help="OnCalendar= of e2vd-warmup.timer")
    i.add_argument("--warmup-until", default="18:00", help="keep warm until this local time")
    i.add_argument("--model", help="model for a new /etc/e2vd/e2vd.toml: ModelScope id or absolute directory")
    i.add_argument("--no-start", action="store_true", help="enable the units but do not start them")

    u = sub.add_parser("uninstall", help="remove the systemd units (root)")
    u.add_argument("--purge", action="store_true", help="also remove the config and the model cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `e2vd` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from e2vd import daemon

        overrides = {k: v for k in ("socket", "model", "device", "idle_timeout")
                     if (v := getattr(args, k)) is not None}
        return daemon.main(overrides, config_path=args.config)
    if args.command in ("install", "uninstall"):
        from e2vd import install

        return install.main(args)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "recognize": cmd_recognize, "status": cmd_status, "warmup": cmd_warmup}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


# -- output helpers ---------------------------------------------------------------------------

def _err(message: str) -> None:
    print(f"e2vd: {message}", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace):
    from e2vd.client import DEFAULT_TIMEOUT, Client

    timeout = getattr(args, "timeout", None)
    return Client(args.socket, timeout=timeout if timeout else DEFAULT_TIMEOUT)


class Waking:
    """A progress line on stderr while the daemon starts and loads its model.

    Shown only when `stream` is a terminal, and only once the wait has lasted `delay` seconds
    (a warm daemon answers long before that, so it never flickers). Pipes get nothing.
    `text` may be changed while it runs; the line is erased on exit.
    """

    FRAMES = "|/-\\"

    def __init__(self, text: str, stream: TextIO | None = None, delay: float = 0.3) -> None:
        self.text = text
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    @property
    def enabled(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def __enter__(self) -> "Waking":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="e2vd-waking", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        if self._stop.wait(self.delay):
            return
        i = 0
        while not self._stop.is_set():
            self._shown = True
            elapsed = time.monotonic() - start
            self.stream.write(f"\r\033[K{self.FRAMES[i % 4]} {self.text} ({elapsed:.0f} s)")
            self.stream.flush()
            i += 1
            self._stop.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()


def _wait_until_ready(client, waking: Waking) -> None:
    """Poll /v1/health until the model is ready (or the daemon reports an error, which the next
    request will surface). Raises DaemonUnreachable/DaemonTimeout."""
    from e2vd.client import ClientError

    deadline = time.monotonic() + client.timeout
    while True:
        try:
            state = client.health().get("status")
        except ClientError:
            return
        if state != "loading":
            return
        waking.text = "loading the emotion model"
        if time.monotonic() > deadline:
            return  # the recognize call itself will wait (and time out) with a clear message
        time.sleep(0.2)


BAR_WIDTH = 24


def _bar(fraction: float, width: int = BAR_WIDTH, unicode: bool = True) -> str:
    """A horizontal bar `fraction` (0..1) of `width` characters, with eighth-blocks if unicode."""
    fraction = min(1.0, max(0.0, fraction))
    if not unicode:
        return "#" * int(round(fraction * width))
    eighths = int(round(fraction * width * 8))
    full, part = divmod(eighths, 8)
    return "\u2588" * full + ("" if part == 0 else chr(0x2590 - part))


def _can_unicode(stream: TextIO) -> bool:
    enc = (getattr(stream, "encoding", None) or "ascii").lower()
    try:
        "\u2588\u258f".encode(enc)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def format_table(name: str, result, unicode: bool = True) -> str:
    """The human view of one result: a header line, then every label with its percentage and a
    bar, most probable first."""
    timing = result.timing_ms or {}
    ms = sum(v for v in timing.values())
    head = f"{name}: {result.top.label} {100 * result.top.score:.1f}%  ({result.duration_s:.2f} s of audio"
    if result.model:
        head += f", model {result.model}"
    if timing:
        head += f", {ms:.0f} ms in daemon"
    head += ")"
    width = max(len(t.label) for t in result.ranked())
    lines = [head]
    for t in result.ranked():
        lines.append(f"  {t.label:<{width}} {100 * t.score:5.1f}% {_bar(t.score, unicode=unicode)}".rstrip())
    return "\n".join(lines)


def embedding_paths(out: str, files: Sequence[str]) -> list[Path]:
    """Where `--embedding OUT` writes each file's array: OUT itself for one file; for several,
    OUT-<stem>.npy beside OUT, or OUT-<n>-<stem>.npy (n from 1) when two inputs share a stem."""
    base = Path(out)
    if base.suffix != ".npy":
        base = base.with_name(base.name + ".npy")
    if len(files) == 1:
        return [base]
    stems = [Path(f).stem for f in files]
    unique = len(set(stems)) == len(stems)
    stem = base.name[:-len(".npy")]
    return [base.with_name(f"{stem}-{s}.npy" if unique else f"{stem}-{n}-{s}.npy")
            for n, s in enumerate(stems, 1)]


# -- recognize --------------------------------------------------------------------------------

def _check_files(files: Sequence[str]) -> list[str]:
    """Problems with the local files (missing, a directory, unreadable), one message each."""
    problems = []
    for f in files:
        p = Path(f)
        if not p.exists():
            problems.append(f"{f}: no such file")
        elif p.is_dir():
            problems.append(f"{f}: is a directory, give audio files")
        elif not os.access(p, os.R_OK):
            problems.append(f"{f}: not readable by you (permission denied)")
    return problems


def cmd_recognize(args: argparse.Namespace) -> int:
    """Recognise every file over one connection; print a table or JSON Lines; exit 0/2/3/4/5."""
    import numpy as np

    from e2vd.client import ClientError, DaemonUnreachable

    problems = _check_files(args.files)
    if problems:
        for msg in problems:
            _err(msg)
        _err("nothing was sent; fix the file names and try again")
        return EXIT_USAGE
    emb_paths = embedding_paths(args.embedding, args.files) if args.embedding else [None] * len(args.files)
    if args.embedding and not emb_paths[0].parent.is_dir():
        _err(f"--embedding: directory {emb_paths[0].parent} does not exist")
        return EXIT_USAGE
    unicode = _can_unicode(sys.stdout)
    worst = EXIT_OK
    with _client(args) as client:
        try:
            with Waking("waking the e2vd daemon") as waking:
                if waking.enabled:
                    _wait_until_ready(client, waking)
        except DaemonUnreachable as e:
            _err(str(e))
            return EXIT_UNREACHABLE
        for n, (name, emb_path) in enumerate(zip(args.files, emb_paths)):
            try:
                result = client.recognize(name, granularity=args.granularity, embedding=bool(args.embedding))
            except DaemonUnreachable as e:
                _err(str(e))
                return EXIT_UNREACHABLE
            except ClientError as e:
                code = EXIT_REJECTED if e.rejected else EXIT_SERVER
                worst = max(worst, code)
                _err(f"{name}: {_explain(e)}")
                if args.json:
                    print(json.dumps({"file": name, "error": {"code": e.code, "message": e.message}}), flush=True)
                if e.code == "model_unavailable" and n + 1 < len(args.files):
                    _err(f"skipping the other {len(args.files) - n - 1} file(s): the daemon has no model")
                    break
                continue
            except OSError as e:  # the file vanished or became unreadable after the check
                worst = max(worst, EXIT_REJECTED)
                _err(f"{name}: cannot read: {e.strerror or e}")
                continue
            if emb_path is not None and result.embedding is not None:
                try:
                    np.save(emb_path, result.embedding)
                except OSError as e:
                    _err(f"{name}: cannot write the embedding to {emb_path}: {e.strerror or e}; "
                         f"choose another --embedding path")
                    return EXIT_USAGE
                if not args.json:
                    _err(f"{name}: wrote embedding {tuple(result.embedding.shape)} to {emb_path}")
            if args.json:
                doc = {"file": name, **result.to_dict(embedding=False)}
                if emb_path is not None:
                    doc["embedding_file"] = str(emb_path)
                    doc["embedding_shape"] = list(result.embedding.shape) if result.embedding is not None else None
                print(json.dumps(doc, ensure_ascii=False), flush=True)
            else:
                if n:
                    print()
                print(format_table(name, result, unicode=unicode), flush=True)
    return worst


def _explain(e) -> str:
    """The daemon's error plus what the operator can do about it."""
    hints = {
        "bad_audio": "the file is not audio libsndfile can decode (wav, flac, ogg, mp3): check it with `file` or re-export it",
        "too_long": "cut the clip into shorter pieces (see max_seconds in /etc/e2vd/e2vd.toml)",
        "too_short": "give at least a fraction of a second of speech",
        "too_large": "the file exceeds the daemon's max_body_bytes; shorten or compress it",
        "busy": "the daemon's queue is full; retry in a moment"
                + (f" (it suggests {e.retry_after:g} s)" if e.retry_after else ""),
        "model_unavailable": "the daemon cannot load its model; see `journalctl -u e2vd` and `e2vd status`",
        "internal": "the daemon failed; see `journalctl -u e2vd`",
    }
    hint = hints.get(e.code)
    return f"{e.message} [{e.code}, HTTP {e.status}]" + (f"; {hint}" if hint and hint not in e.message else "")


# -- status -----------------------------------------------------------------------------------

@dataclass
class UnitState:
    """Properties of one systemd unit from `systemctl show` (strings as systemd prints them)."""

    id: str
    props: dict[str, str] = field(default_factory=dict)
    listen: list[str] = field(default_factory=list)

    def get(self, key: str, default: str = "") -> str:
        return self.props.get(key, default)

    @property
    def loaded(self) -> bool:
        return self.get("LoadState") == "loaded"

    @property
    def active(self) -> bool:
        return self.get("ActiveState") == "active"


SHOW_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "MainPID", "StatusText",
              "ActiveEnterTimestamp", "Result", "Listen")


def parse_systemctl_show(text: str) -> dict[str, UnitState]:
    """Parse `systemctl show UNIT... -p ...` output (Key=Value lines, one blank-line separated
    block per unit, Listen= may repeat) into UnitState by unit Id."""
    units: dict[str, UnitState] = {}
    for block in text.strip().split("\n\n"):
        props: dict[str, str] = {}
        listen: list[str] = []
        for line in block.splitlines():
            key, sep, value = line.partition("=")
            if not sep:
                continue
            if key == "Listen":
                listen.append(value)
            else:
                props[key] = value
        if "Id" in props:
            units[props["Id"]] = UnitState(props["Id"], props, listen)
    return units


def systemd_units(units: Sequence[str] = (SERVICE, SOCKET_UNIT)) -> dict[str, UnitState] | str:
    """Ask systemd about `units` without touching them; a str says why systemd cannot be asked."""
    cmd = ["systemctl", "show", *units, "-p", ",".join(SHOW_PROPS), "--no-pager"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "systemctl is not installed here"
    except subprocess.TimeoutExpired:
        return "systemctl did not answer within 10 s"
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split()) or f"systemctl exited {proc.returncode}"
        return f"systemd cannot be asked ({why})"
    return parse_systemctl_show(proc.stdout)


def _describe_units(units: dict[str, UnitState]) -> list[str]:
    """Human lines for e2vd.service and e2vd.socket, each with what to do when it is wrong."""
    svc, sock = units.get(SERVICE), units.get(SOCKET_UNIT)
    lines = []
    if svc is None or not svc.loaded:
        lines.append(f"{SERVICE}: not installed (LoadState={svc.get('LoadState') if svc else '?'}); "
                     f"install it with `sudo e2vd install`")
    else:
        state = f"{svc.get('ActiveState')} ({svc.get('SubState')})"
        if svc.active:
            since = svc.get("ActiveEnterTimestamp")
            state += f", PID {svc.get('MainPID')}" + (f", since {since}" if since else "")
        elif svc.get("Result") not in ("", "success"):
            state += f", last run failed: {svc.get('Result')} — see `journalctl -u e2vd`"
        lines.append(f"{SERVICE}: {state}")
        if svc.get("StatusText"):
            lines.append(f"  {svc.get('StatusText')}")
    if sock is not None and sock.loaded:
        where = ", ".join(sock.listen)
        line = f"{SOCKET_UNIT}: {sock.get('ActiveState')} ({sock.get('SubState')})" + (f" on {where}" if where else "")
        if sock.active and not (svc and svc.active):
            line += "; the next request starts the daemon"
        elif not sock.active:
            line += "; requests will fail: `sudo systemctl enable --now e2vd.socket`"
        lines.append(line)
    elif svc is not None and svc.loaded:
        lines.append(f"{SOCKET_UNIT}: not installed; requests cannot wake the daemon")
    return lines


def _describe_daemon(st: dict[str, Any]) -> list[str]:
    """The daemon's /v1/status as indented `key: value` lines (bytes and deadlines humanised)."""
    from e2vd.durations import format_duration

    def fmt(key: str, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key.endswith("_deadline"):  # Unix time
                left = value - time.time()
                return (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
                        + (f" (in {format_duration(left)})" if left > 0 else ""))
            if key.endswith("_bytes"):
                return f"{value / 2**20:.1f} MiB"
            if key.endswith(("_s", "_seconds")) or key in ("uptime", "idle_in", "warm_for"):
                return format_duration(value) if value >= 60 else f"{value:.1f} s"
        return str(value)

    lines = []

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                lines.append(f"  {prefix}{k}: {fmt(k, v) if v is not None else '-'}")

    walk("", st)
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    """Report systemd's view, and the daemon's own status only where asking cannot wake it."""
    from e2vd.client import ClientError, DaemonUnreachable

    units = systemd_units()
    report: dict[str, Any] = {}
    lines: list[str] = []
    ask_daemon = args.socket is not None
    code = EXIT_OK
    if isinstance(units, str):
        report["systemd"] = {"available": False, "reason": units}
        lines.append(f"systemd: not available: {units}")
        if not ask_daemon:
            lines.append("to ask a daemon started by hand, pass --socket PATH")
            code = EXIT_UNREACHABLE
    else:
        report["systemd"] = {"available": True, "units": {u.id: {**u.props, "Listen": u.listen}
                                                           for u in units.values()}}
        lines.extend(_describe_units(units))
        svc = units.get(SERVICE)
        # Only a live process is asked (running, or loading its model): connecting to the socket
        # of a stopped service would start it. A daemon that exits between `systemctl show` and
        # our connect is restarted by that connect; the window is a few milliseconds.
        ask_daemon = ask_daemon or (svc is not None and (svc.get("ActiveState"), svc.get("SubState"))
                                    in (("active", "running"), ("activating", "start")))
        if svc is None or not svc.loaded:
            code = EXIT_UNREACHABLE if not ask_daemon else EXIT_OK
    if ask_daemon:
        client = _client(argparse.Namespace(socket=args.socket, timeout=10.0))
        try:
            with client:
                st = client.status()
        except DaemonUnreachable as e:
            report["daemon"] = {"reachable": False, "error": str(e)}
            lines.append(f"daemon on {client.socket}: unreachable: {e}")
            code = EXIT_UNREACHABLE
        except ClientError as e:
            report["daemon"] = {"reachable": True, "error": {"code": e.code, "message": e.message}}
            lines.append(f"daemon on {client.socket}: {_explain(e)}")
            code = EXIT_SERVER
        else:
            report["daemon"] = {"reachable": True, "socket": client.socket, "status": st}
            lines.append(f"daemon on {client.socket}:")
            lines.extend(_describe_daemon(st))
    else:
        report["daemon"] = None
        if not isinstance(units, str):
            lines.append("daemon: not running (not asked, so it stays asleep)")
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print("\n".join(lines))
    return code


# -- warmup -----------------------------------------------------------------------------------

def cmd_warmup(args: argparse.Namespace) -> int:
    """Wake the daemon, wait for the model, ask it to stay warm; exit 0/2/3/5."""
    from e2vd.client import ClientError, DaemonUnreachable
    from e2vd.durations import format_duration, parse_clock, parse_duration, seconds_until

    hold: float | None = None
    try:
        if args.hold is not None:
            hold = parse_duration(args.hold)
        elif args.until is not None:
            clock = parse_clock(args.until)
            hold = seconds_until(clock)
            if hold <= 0:
                now = time.strftime("%H:%M")
                _err(f"--until {args.until}: that time has already passed today (it is {now}); "
                     f"not waking the daemon. Use --hold DURATION to keep it warm from now.")
                return EXIT_OK
    except ValueError as e:
        _err(f"warmup: {e}")
        return EXIT_USAGE
    if args.timeout is None:
        args.timeout = WARMUP_TIMEOUT
    with _client(args) as client:
        try:
            with Waking("waking the e2vd daemon and loading the model"):
                answer = client.warmup(hold)
        except DaemonUnreachable as e:
            _err(str(e))
            return EXIT_UNREACHABLE
        except ClientError as e:
            _err(f"warmup failed: {_explain(e)}")
            return EXIT_REJECTED if e.rejected else EXIT_SERVER
        try:
            st = client.status()  # only to name the model and device in the message
        except (DaemonUnreachable, ClientError):
            st = {}
    msg = "e2vd is warm"
    if st.get("model"):
        msg += f": model {st['model']}" + (f" on {st['device']}" if st.get("device") else "")
    if isinstance(answer.get("load_seconds"), (int, float)):
        msg += f" (loaded in {answer['load_seconds']:.1f} s)"
    if hold:
        granted = answer.get("hold_s")
        deadline = answer.get("keep_warm_deadline")
        if not isinstance(deadline, (int, float)):
            deadline = time.time() + hold
        until = time.strftime("%H:%M", time.localtime(deadline))
        if isinstance(granted, (int, float)) and granted + 1 < hold:
            msg += (f"; keeping it warm for {format_duration(granted)} only (until {until}): the daemon "
                    f"caps holds at its max_hold, asked for {format_duration(hold)}")
        else:
            msg += f"; keeping it warm for {format_duration(hold)} (until {until})"
    print(msg)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
