"""The `e2vd` command: argument parsing and dispatch to the module that does the work.

Exit codes: `e2vd.vocabulary.ExitCode` (0 ok, 1 a system step failed, 2 usage, 3 daemon
unreachable, 4 request rejected, 5 server error, 130 interrupted). e2vd's exceptions carry theirs
as `exit_code`; `main` is the one place that turns an exception into the exit status.
This module imports nothing heavy at start; each subcommand imports what it needs.
Messages for people go to stderr, one line each, never a traceback; results (tables, JSON) go to
stdout. When stdout's reader goes away (`| head`), the command says so in one line, sends no more
work, and exits with the code of what it did so far: the reader stopping is neither a usage error
nor the daemon's fault, and like a SIGPIPE'd producer it must not fail `set -o pipefail` scripts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence, TextIO

from e2vd.unit_record import (SERVICE, SHOW_PROPS, SOCKET_UNIT, UnitState, how_it_ended,  # noqa: F401 (re-exported)
                        last_error, parse_systemctl_show, service_trouble, socket_fix, systemd_units,
                        unreachable_reason)
from e2vd.vocabulary import ExitCode, Granularity, State

if TYPE_CHECKING:
    from e2vd.client import Client

#: What each exit status means, for `e2vd --help` (every ExitCode has its words).
EXIT_WORDS: dict[ExitCode, str] = {
    ExitCode.OK: "ok", ExitCode.FAILED: "a system step failed (systemctl, groupadd, the journal)",
    ExitCode.USAGE: "usage",
    ExitCode.UNREACHABLE: "daemon unreachable", ExitCode.REJECTED: "request rejected (bad input)",
    ExitCode.SERVER: "server error", ExitCode.INTERRUPTED: "interrupted",
}

#: Seconds `e2vd warmup` waits for the model by default (e2vd-warmup.service allows 600).
WARMUP_TIMEOUT = 590.0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (what is wrong, where to read more), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message}; see `{self.prog} --help`\n")


def _timeout_arg(text: str) -> float:
    """--timeout: seconds, finite, > 0 and at most a day (what a socket timeout can hold)."""
    from e2vd.client import MAX_TIMEOUT

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not usable: give seconds > 0 and at most {MAX_TIMEOUT:g}, e.g. --timeout 300")
    return value


def _socket_arg(text: str) -> str:
    """--socket: a non-empty path."""
    if not text.strip():
        from e2vd.config import Settings

        raise argparse.ArgumentTypeError(f"empty path: give the daemon's socket, e.g. {Settings.socket}")
    return text


def _instance_arg(text: str) -> str:
    """--instance: a valid instance name (e2vd.instances.check_name says what is wrong)."""
    from e2vd.instances import InstanceNameError, check_name

    try:
        return check_name(text)
    except InstanceNameError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--instance ")) from None


def _add_target(parser: argparse.ArgumentParser, socket_help: str) -> None:
    """--socket PATH and --instance NAME (one or the other) on a client subcommand."""
    from e2vd.config import INSTANCE_ENV

    target = parser.add_mutually_exclusive_group()
    target.add_argument("--socket", type=_socket_arg, help=socket_help)
    target.add_argument("--instance", type=_instance_arg, metavar="NAME",
                        help=f"talk to instance NAME (`e2vd install --instance NAME`): its socket "
                             f"/run/e2vd/NAME.sock (default ${INSTANCE_ENV}, else the default instance)")


def _embedding_arg(text: str) -> str:
    """--embedding: a path that names a file (not "", ".", ".." or a path ending in /)."""
    if Path(text).name in ("", ".", "..") or text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} names no file: give a file path, e.g. out.npy")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand (the contract in docs/design.md, section 6)."""
    from e2vd.config import Settings, env_name
    from e2vd.install import Options   # its defaults are the options' defaults

    default_socket, socket_env = Settings.socket, env_name("socket")   # as e2vd.client reads them

    p = _Parser(
        prog="e2vd", description="Emotion2Vec+ speech emotion recognition daemon and client.",
        epilog="exit codes: " + ", ".join(f"{int(code)} {EXIT_WORDS[code]}" for code in ExitCode))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--socket", help="bind this Unix socket path (ignored when systemd passes a socket)")
    s.add_argument("--model", help="absolute model directory or ModelScope id")
    s.add_argument("--device", help="auto, cpu or cuda:N")
    s.add_argument("--idle-timeout", dest="idle_timeout", metavar="DURATION",
                   help="exit after this long with nothing to do: seconds, or e.g. 90s, 30m, 8h")
    s.add_argument("--config", help="config file (default /etc/e2vd/e2vd.toml)")

    r = sub.add_parser(
        "recognize", help="recognise the emotion in audio files",
        description="Send each FILE's bytes to the daemon (one connection for all) and print the "
                    "scores, most probable emotion first. Exit 4 if any file was rejected.")
    r.add_argument("files", nargs="+", metavar="FILE",
                   help="audio files (wav, flac, ogg, mp3, ...); - reads one from stdin (within --timeout); "
                        "files larger than max_body_bytes are refused before sending")
    _add_target(r, f"daemon socket (default ${socket_env} or {default_socket})")
    r.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.UTTERANCE.value,
                   help="embedding per utterance (D,) or per 20 ms frame (T, D)")
    r.add_argument("--embedding", metavar="OUT.npy", type=_embedding_arg,
                   help="write the embedding to OUT.npy; with several files, one file each: "
                        "OUT-<file stem>.npy (OUT-<n>-<stem>.npy when stems repeat)")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object per file and line (JSON Lines) instead of a table")
    r.add_argument("--timeout", type=_timeout_arg, default=None, metavar="S",
                   help="seconds to wait for an answer, cold start included, and for stdin (default 300)")

    st = sub.add_parser("status", help="show whether the daemon and each instance run (never wakes them)",
                        description="Show what systemd records about the default daemon and every installed "
                                    "instance, and the daemon's own status only while its process runs: "
                                    "asking a sleeping daemon would start it.")
    _add_target(st, "ask a daemon started by hand on this socket")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("warmup", help="wake the daemon and keep it warm")
    _add_target(w, f"daemon socket (default ${socket_env} or {default_socket})")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--hold", metavar="DURATION", help="keep warm this long, e.g. 90s, 30m, 9h")
    g.add_argument("--until", metavar="HH:MM", help="keep warm until this local time today")
    w.add_argument("--timeout", type=_timeout_arg, default=None, metavar="S",
                   help="seconds to wait for the model to load (default 590)")

    i = sub.add_parser("install", help="install and start the systemd units (root)")
    i.add_argument("--group", default=Options.group, help=f"the socket's group (default {Options.group})")
    i.add_argument("--warmup-calendar", default=None,
                   help=f"OnCalendar= of e2vd-warmup.timer (default {Options.warmup_calendar!r}); with --instance, "
                        "give it (or --warmup-until) to install the instance's own e2vd-warmup@NAME.timer")
    i.add_argument("--warmup-until", default=None,
                   help=f"keep warm until this local time (default {Options.warmup_until})")
    i.add_argument("--model", help="model for a new /etc/e2vd/e2vd.toml: ModelScope id or absolute directory")
    i.add_argument("--no-start", action="store_true", help="enable the units but do not start them")
    i.add_argument("--no-pull", action="store_true",
                   help="do not pull the configured ModelScope model first (the daemon never downloads: "
                        "run `sudo e2vd pull` before the first request)")
    i.add_argument("--web", nargs="?", const="127.0.0.1:7860", default=None, metavar="ADDR:PORT",
                   help="also install the browser page (e2vd-web.socket) on ADDR:PORT (default 127.0.0.1:7860); "
                        "every local user can reach a TCP port, whatever the e2vd group says")
    i.add_argument("--web-public", action="store_true",
                   help="allow a --web address other than loopback (other machines reach the page and the daemon)")
    i.add_argument("--instance", type=_instance_arg, metavar="NAME",
                   help="install another daemon beside the default one: e2vd@NAME.socket on /run/e2vd/NAME.sock "
                        "with its own /etc/e2vd/NAME.toml (give --model); --web and the warmup timer "
                        "are the default instance's only")

    c = sub.add_parser("check-config", help="check the daemon's settings file before the daemon reads it",
                       description="Read the settings file as the daemon will (/etc/e2vd/e2vd.toml unless "
                                   "--config or $E2VD_CONFIG name another) and check that the model is there. "
                                   "Exit 0 when it can be used, 2 with what is wrong.")
    cg = c.add_mutually_exclusive_group()
    cg.add_argument("--config", help="the file to check (default $E2VD_CONFIG or /etc/e2vd/e2vd.toml)")
    cg.add_argument("--instance", type=_instance_arg, metavar="NAME",
                    help="check instance NAME's settings, /etc/e2vd/NAME.toml")

    u = sub.add_parser("uninstall", help="remove the systemd units (root)")
    u.add_argument("--purge", action="store_true", help="also remove the config and the model cache")
    u.add_argument("--instance", type=_instance_arg, metavar="NAME",
                   help="remove only instance NAME (e2vd@NAME.socket); the default and other instances stay")

    from e2vd import report   # light: what the report computes with is imported when it runs

    report.add_arguments(sub.add_parser(
        "report", help="GPU-held hours, use and cost from the journal",
        description="GPU-held hours, use and cost of e2vd over a period, from the journal; "
                    "--what-if replays the requests against another idle timeout or warmup."))

    from e2vd import web   # light: the front's server is imported when it runs

    web.add_arguments(sub.add_parser(
        "web", help="serve the browser page (run by e2vd-web.socket; never wakes the daemon by itself)",
        description="The browser front: serves the page and forwards /v1/* to the daemon's socket. "
                    "Socket-activated by e2vd-web.socket (`e2vd install --web`); exits when idle."))

    from e2vd import pull_cli   # light: modelscope is imported when a pull runs

    pull_cli.add_arguments(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `e2vd` command; returns the process exit status.

    The one place where an exception becomes an exit status: an exception that carries an
    `ExitCode` as `exit_code` (e2vd's own) is printed as one line and exits with that code;
    Ctrl-C exits INTERRUPTED; anything else is a bug and propagates with its traceback."""
    _tolerate_undecodable_names()
    try:
        from e2vd.report import join_relative_times   # "--since -2h", as journalctl takes it

        args = build_parser().parse_args(join_relative_times(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # --help into a closed pipe
        _stdout_closed()
        return int(ExitCode.OK)
    try:
        return int(_dispatch(args))
    except KeyboardInterrupt:
        _err("interrupted")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:
        code = exit_code_of(exc)
        if code is None:
            raise
        _err(_failure(args.command, exc))
        return int(code)


def _failure(command: str, exc: BaseException) -> str:
    """The one line for an e2vd exception that ended `command`: its message, and for the
    daemon's errors what the operator can do about them."""
    from e2vd.client import ClientError, DaemonUnreachable

    if isinstance(exc, DaemonUnreachable):
        return f"{command}: {_unreachable(exc)}"
    return f"{command}: {_explain(exc) if isinstance(exc, ClientError) else exc}"


def _unreachable(exc) -> str:
    """A DaemonUnreachable's message, or, when e2vd.socket on that path is not listening, why
    from systemd's own record (e2vd.unit_record.unreachable_reason) and what to run."""
    from e2vd.client import DaemonTimeout

    if isinstance(exc, DaemonTimeout):
        return str(exc)
    units = systemd_units()
    reason = None if isinstance(units, str) else unreachable_reason(units, exc.socket)
    return reason or str(exc)


def exit_code_of(exc: BaseException) -> ExitCode | None:
    """The exit status `exc` carries as `exit_code` (every e2vd exception class has one), or None."""
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, ExitCode) else None


def _dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand `args.command`; its exit status, or an exception carrying one."""
    if args.command == "serve":
        from e2vd import daemon

        overrides = {k: v for k in ("socket", "model", "device", "idle_timeout")
                     if (v := getattr(args, k)) is not None}
        return daemon.main(overrides, config_path=args.config)
    if args.command in ("install", "uninstall"):
        from e2vd import install

        return install.main(args)
    if args.command == "report":
        from e2vd import report

        return report.run(args)
    if args.command == "web":
        from e2vd import web

        return web.run(args)
    if args.command in ("pull", "models"):
        from e2vd import pull_cli

        return pull_cli.run(args)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "recognize": cmd_recognize, "status": cmd_status, "warmup": cmd_warmup, "check-config": cmd_check_config}
    return commands[args.command](args)


# -- output helpers ---------------------------------------------------------------------------

def _err(message: str) -> None:
    """One line for the operator on stderr; a closed or missing stderr loses it silently.
    Control characters (a daemon's or systemd's words may hold them) are escaped (`_lines_out`)."""
    if sys.stderr is None:  # fd 2 was closed at start: print(file=None) would write to stdout
        return
    try:
        print(f"e2vd: {_lines_out([message])}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _out(text: str) -> bool:
    """Print `text` on stdout at once; False when stdout's reader has gone (EPIPE), after which
    stdout points at /dev/null so nothing else (not even the exit's flush) can fail on it."""
    try:
        print(text, flush=True)
        return True
    except BrokenPipeError:
        _stdout_closed()
        return False


#: Characters that reorder or break the text around them on a terminal without being control
#: characters: bidirectional overrides, embeddings and isolates, marks, line/paragraph separators.
#: Lone surrogates too: no character, from a daemon's JSON ("\\ud800") or an undecodable name; in
#: the C locale stdout would write \\udc80-\\udcff as raw bytes (0x9b: a terminal's CSI).
_INVISIBLE = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_text(doc: Any, indent: int | None = None) -> str:
    """`doc` as JSON for stdout: non-ASCII as it is, but lone surrogates as \\uXXXX escapes
    (JSON reads them back; stdout cannot encode them)."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(doc, indent=indent, ensure_ascii=False))


def _lines_out(lines: Sequence[str]) -> str:
    """`lines` as one text for the terminal: what systemd, the journal or a daemon said may hold
    control characters (an escape sequence in a unit's state or a daemon's label), written as
    backslash escapes (e2vd.log.escape_controls), and bidirectional overrides or line separators
    (_INVISIBLE) as \\uXXXX, so that they cannot rewrite or reorder the screen."""
    from e2vd.log import escape_controls

    return "\n".join(_INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", escape_controls(line)) for line in lines)


def _stdout_closed() -> None:
    """Point fd 1 at /dev/null, as the Python documentation recommends for EPIPE (signal), so
    the interpreter's final flush of the unwritten buffer does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _tolerate_undecodable_names() -> None:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) are printed with
    backslash escapes on stdout instead of failing with UnicodeEncodeError."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        try:
            reconfigure(errors="backslashreplace")
        except (OSError, ValueError):
            pass


def _client(args: argparse.Namespace):
    from e2vd.client import DEFAULT_TIMEOUT, Client

    timeout = getattr(args, "timeout", None)
    return Client(args.socket, timeout=timeout if timeout else DEFAULT_TIMEOUT,
                  instance=getattr(args, "instance", None))


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
        if state != State.LOADING:
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
    bar, most probable first. When the fallback model decided, the header says so and a second
    line gives the main model's top label and model; when the fallback was asked but could not
    answer, a line says why (e2vd.fallback). Control characters in what the daemon sent (labels,
    model ids, fallback_error) are written as backslash escapes (`_lines_out`)."""
    timing = result.timing_ms or {}
    ms = sum(v for v in timing.values())
    head = f"{name}: {result.top.label} {100 * result.top.score:.1f}%  ({result.duration_s:.2f} s of audio"
    decided_by = getattr(result, "decided_by", "primary")
    if result.model:
        head += f", {'fallback model' if decided_by == 'fallback' else 'model'} {result.model}"
    if timing:
        head += f", {ms:.0f} ms in daemon"
    head += ")"
    width = max(len(t.label) for t in result.ranked())
    lines = [head]
    primary = getattr(result, "primary", None)
    if decided_by == "fallback" and primary is not None:
        lines.append(f"  decided by the fallback: the main model {primary.model} was unsure "
                     f"({primary.top.label} {100 * primary.top.score:.1f}%)")
    if getattr(result, "fallback_error", ""):
        lines.append(f"  decided by the main model: {result.fallback_error}")
    for t in result.ranked():
        lines.append(f"  {t.label:<{width}} {100 * t.score:5.1f}% {_bar(t.score, unicode=unicode)}".rstrip())
    return _lines_out(lines)


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
    """Problems with the local files (missing, a directory, a FIFO or device, unreadable, a
    terminal or closed stdin for "-"), one message each."""
    from e2vd.client import file_kind

    problems = []
    if files.count("-") > 1:
        problems.append("-: stdin can be read only once; give - once")
    for f in files:
        if f == "-":
            problems.extend(_check_stdin())
            continue
        try:
            mode = os.stat(f).st_mode
        except FileNotFoundError:
            problems.append(f"{f}: no such file")
            continue
        except PermissionError:
            problems.append(f"{f}: not reachable by you (permission denied on a directory above it)")
            continue
        except (OSError, ValueError) as e:
            problems.append(f"{f}: cannot be examined: {getattr(e, 'strerror', None) or e}")
            continue
        if stat.S_ISDIR(mode):
            problems.append(f"{f}: is a directory, give audio files")
        elif not stat.S_ISREG(mode):
            problems.append(f"{f}: {file_kind(mode)}, not a regular file; give an audio file, or pipe "
                            f"the audio in as - (e.g. `producer | e2vd recognize -`)")
        elif not os.access(f, os.R_OK):
            problems.append(f"{f}: not readable by you (permission denied)")
    return problems


def _check_stdin() -> list[str]:
    """Problems with stdin as the input "-": closed, or a terminal (audio is piped in)."""
    try:
        os.fstat(0)
    except OSError:
        return ["-: stdin is closed; pipe the audio in, e.g. `e2vd recognize - < clip.wav`"]
    if os.isatty(0):
        return ["-: stdin is a terminal; pipe the audio in, e.g. `e2vd recognize - < clip.wav`"]
    return []


def _check_embedding_dir(path: Path) -> str | None:
    """Why `path`'s directory cannot take the embedding file, or None when it is a directory."""
    try:
        if stat.S_ISDIR(os.stat(path.parent).st_mode):
            return None
        return f"--embedding: {path.parent} is not a directory"
    except FileNotFoundError:
        return f"--embedding: directory {path.parent} does not exist"
    except (OSError, ValueError) as e:
        return f"--embedding: directory {path.parent} cannot be examined: {getattr(e, 'strerror', None) or e}"


def cmd_recognize(args: argparse.Namespace) -> ExitCode:
    """Recognise every file over one connection; print a table or JSON Lines; exit 0/2/3/4/5."""
    problems = _check_files(args.files)
    if problems:
        for msg in problems:
            _err(msg)
        _err("nothing was sent; fix the file names and try again")
        return ExitCode.USAGE
    emb_paths = embedding_paths(args.embedding, args.files) if args.embedding else [None] * len(args.files)
    if args.embedding and (why := _check_embedding_dir(emb_paths[0])):
        _err(why)
        return ExitCode.USAGE
    worst = ExitCode.OK
    with _client(args) as client:
        with Waking("waking the e2vd daemon") as waking:   # DaemonUnreachable: main says it
            if waking.enabled:
                _wait_until_ready(client, waking)
        for n, (name, emb_path) in enumerate(zip(args.files, emb_paths)):
            code, go_on = _recognize_one(client, args, name, emb_path, first=n == 0)
            if go_on is False and code in (ExitCode.UNREACHABLE, ExitCode.USAGE):
                return code  # no daemon, or nowhere to write embeddings: the rest cannot succeed
            worst = max(worst, code)
            left = len(args.files) - n - 1
            if go_on is None:
                _err(f"stdout was closed by its reader; stopped after {n + 1} of {len(args.files)} "
                     f"file(s), {left} not sent")
                break
            if go_on is False:
                if left:
                    _err(f"skipping the other {left} file(s): the daemon has no model")
                break
    return worst


def _recognize_one(client: "Client", args: argparse.Namespace, name: str, emb_path: Path | None,
                   first: bool) -> tuple[ExitCode, bool | None]:
    """Recognise one file ("-": stdin) and print its result or error; returns (exit code for
    this file, go on: True, False when the other files cannot succeed, None when stdout closed)."""
    import numpy as np

    from e2vd.client import ClientError, DaemonDied, DaemonUnreachable, InputError, read_audio_stream

    label = "stdin" if name == "-" else name
    try:
        if name == "-":
            audio: Any = read_audio_stream(0, client.body_limit, client.timeout, "stdin")
        else:
            audio = name
        result = client.recognize(audio, granularity=args.granularity, embedding=bool(args.embedding))
    except DaemonUnreachable as e:
        _err(_unreachable(e))
        return e.exit_code, False
    except DaemonDied as e:   # this request ended the daemon; the next file starts a fresh one
        _err(f"{label}: {e}")
        shown = not args.json or _out(json.dumps({"file": name, "error": {"code": "daemon_died", "message": e.message}}))
        return e.exit_code, (True if shown else None)
    except ClientError as e:
        _err(f"{label}: {_explain(e)}")
        shown = not args.json or _out(json.dumps({"file": name, "error": {"code": e.code, "message": e.message}}))
        go_on = e.code != "model_unavailable"
        return e.exit_code, (go_on if shown else None)
    except InputError as e:  # too large, not a regular file, stdin stalled: nothing was sent
        _err(e.message)
        shown = not args.json or _out(json.dumps({"file": name, "error": {"code": e.code, "message": e.message}}))
        return e.exit_code, (True if shown else None)
    except OSError as e:  # the file vanished or became unreadable after the check
        _err(f"{label}: cannot read: {e.strerror or e}")
        return ExitCode.REJECTED, True
    if emb_path is not None and result.embedding is not None:
        try:
            np.save(emb_path, result.embedding)
        except OSError as e:
            _err(f"{label}: cannot write the embedding to {emb_path}: {e.strerror or e}; "
                 f"choose another --embedding path")
            return ExitCode.USAGE, False
        if not args.json:
            _err(f"{label}: wrote embedding {tuple(result.embedding.shape)} to {emb_path}")
    if args.json:
        doc = {"file": name, **result.to_dict(embedding=False)}
        if emb_path is not None:
            doc["embedding_file"] = str(emb_path)
            doc["embedding_shape"] = list(result.embedding.shape) if result.embedding is not None else None
        text = _json_text(doc)
    else:
        text = ("" if first else "\n") + format_table(label, result, unicode=_can_unicode(sys.stdout))
    return ExitCode.OK, (True if _out(text) else None)


#: What the operator can do about each of the daemon's error codes (keys: protocol.ERRORS).
ERROR_HINTS: dict[str, str] = {
    "bad_audio": "the file is not audio libsndfile can decode (wav, flac, ogg, mp3): check it with `file` or re-export it",
    "too_long": "cut the clip into shorter pieces (see max_seconds in /etc/e2vd/e2vd.toml)",
    "too_short": "give at least a fraction of a second of speech",
    "too_large": "the file exceeds the daemon's max_body_bytes; shorten or compress it",
    "busy": "the daemon's queue is full; retry in a moment",
    "model_unavailable": "the daemon cannot load its model; see `journalctl -u e2vd` and `e2vd status`",
    "config_invalid": "fix the daemon's settings file (`e2vd check-config` says what is wrong); the next "
                      "request after the fix starts the daemon with it",
    "internal": "the daemon failed; see `journalctl -u e2vd`",
}


def _explain(e) -> str:
    """The daemon's error plus what the operator can do about it (ERROR_HINTS; for busy, the
    Retry-After the daemon suggested)."""
    hint = ERROR_HINTS.get(e.code)
    if hint and e.code == "busy" and e.retry_after:
        hint += f" (it suggests {e.retry_after:g} s)"
    return f"{e.message} [{e.code}, HTTP {e.status}]" + (f"; {hint}" if hint and hint not in e.message else "")


# -- status -----------------------------------------------------------------------------------

def _describe_units(units: dict[str, UnitState],
                    error_of: Callable[[UnitState], str | None] = last_error, instance: str | None = None) -> list[str]:
    """Human lines for e2vd.service and e2vd.socket (with `instance` NAME: e2vd@NAME.service and
    e2vd@NAME.socket), each with what to do when it is wrong; a failed unit with systemd's own
    record of it (Result, exit status, `error_of`: the service's last error line in the journal)."""
    from e2vd.instances import DEFAULT, Instance

    inst = Instance(instance or DEFAULT)
    service, socket_unit = inst.service_unit, inst.socket_unit
    svc, sock = units.get(service), units.get(socket_unit)
    lines = []
    if svc is None or not svc.loaded:
        how = "sudo e2vd install" + ("" if inst.default else f" --instance {inst.name} --model MODEL")
        lines.append(f"{service}: not installed (LoadState={svc.get('LoadState') if svc else '?'}); "
                     f"install it with `{how}`")
    else:
        state = f"{svc.get('ActiveState')} ({svc.get('SubState')})"
        if svc.active:
            since = svc.get("ActiveEnterTimestamp")
            state += f", PID {svc.get('MainPID')}" + (f", since {since}" if since else "")
        elif svc.failed:
            error = error_of(svc)   # quoted as it is; only the advice without one names units
            state += f", {service_trouble(svc, error) if error else _for_instance(service_trouble(svc, None), inst)}"
        lines.append(f"{service}: {state}")
        if svc.get("StatusText"):
            lines.append(f"  {svc.get('StatusText')}")
    if sock is not None and sock.loaded:
        where = ", ".join(sock.listen)
        line = f"{socket_unit}: {sock.get('ActiveState')} ({sock.get('SubState')})" + (f" on {where}" if where else "")
        if sock.active and not (svc and svc.active):
            line += "; the next request starts the daemon"
        elif not sock.active:
            line += ((f", {how_it_ended(sock)}" if sock.failed else "")
                     + f"; requests will fail: {_for_instance(socket_fix(sock), inst)}")
        lines.append(line)
    elif svc is not None and svc.loaded:
        lines.append(f"{socket_unit}: not installed; requests cannot wake the daemon")
    return lines


def _for_instance(advice: str, inst) -> str:
    """`advice` (e2vd.unit_record's words, which name the default instance's units and commands)
    about instance `inst`'s units; for the default instance unchanged."""
    if inst.default:
        return advice
    return (advice.replace(SOCKET_UNIT, inst.socket_unit).replace(SERVICE, inst.service_unit)
            .replace("journalctl -u e2vd`", f"journalctl -u {inst.service_unit}`"))


def _describe_daemon(st: dict[str, Any]) -> list[str]:
    """The daemon's /v1/status as indented `key: value` lines (bytes and deadlines humanised)."""
    from e2vd.durations import format_duration

    def fmt(key: str, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                return str(value)
            if key.endswith("_deadline"):  # Unix time
                left = value - time.time()
                return (_local_time(value, "%Y-%m-%d %H:%M:%S")
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


#: Deepest nesting shown from a daemon's answer (its status nests 2 levels).
MAX_ANSWER_DEPTH = 16


def _nesting(doc: Any, limit: int = MAX_ANSWER_DEPTH) -> int:
    """How many levels of dicts/lists `doc` nests, counted without recursion and up to limit + 1
    (the status printers recurse, so an absurdly nested answer is refused before them)."""
    level, depth = [doc], 0
    while depth <= limit:
        level = [c for node in level if isinstance(node, (dict, list))
                 for c in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return depth
        depth += 1
    return depth


def _local_time(ts: float, fmt: str) -> str:
    """Unix time `ts` as local time in `fmt`, or the bare number when no calendar holds it."""
    try:
        return time.strftime(fmt, time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (Unix time)"


def cmd_status(args: argparse.Namespace) -> ExitCode:
    """Report systemd's view, and the daemon's own status only where asking cannot wake it.

    The daemon described is the default one, or instance --instance / $E2VD_INSTANCE; without
    --socket, every instance (the default and each installed one) is listed as well, from
    systemd's records and the file system only (e2vd.instances.list_instances)."""
    from e2vd.client import ClientError, DaemonUnreachable
    from e2vd.config import INSTANCE_ENV
    from e2vd.instances import instance, list_instances

    name = getattr(args, "instance", None)
    if name is None and args.socket is None and os.environ.get(INSTANCE_ENV, "").strip():
        name = os.environ[INSTANCE_ENV]
    inst = instance(name, "--instance" if getattr(args, "instance", None) else f"${INSTANCE_ENV}")
    units = systemd_units((inst.service_unit, inst.socket_unit))
    report: dict[str, Any] = {}
    lines: list[str] = []
    ask_daemon = args.socket is not None
    code = ExitCode.OK
    if isinstance(units, str):
        report["systemd"] = {"available": False, "reason": units}
        lines.append(f"systemd: not available: {units}")
        if not ask_daemon:
            lines.append("to ask a daemon started by hand, pass --socket PATH")
            code = ExitCode.UNREACHABLE
    else:
        report["systemd"] = {"available": True, "units": {u.id: {**u.props, "Listen": u.listen}
                                                           for u in units.values()}}
        lines.extend(_describe_units(units, instance=None if inst.default else inst.name))
        svc = units.get(inst.service_unit)
        # Only a live process is asked (running, or loading its model): connecting to the socket
        # of a stopped service would start it. A daemon that exits between `systemctl show` and
        # our connect is restarted by that connect; the window is a few milliseconds.
        ask_daemon = ask_daemon or (svc is not None and (svc.get("ActiveState"), svc.get("SubState"))
                                    in (("active", "running"), ("activating", "start")))
        if svc is None or not svc.loaded:
            code = ExitCode.UNREACHABLE if not ask_daemon else ExitCode.OK
    if ask_daemon:
        client = _client(argparse.Namespace(socket=args.socket, instance=None if inst.default else inst.name,
                                            timeout=10.0))
        try:
            with client:
                st = client.status()
        except DaemonUnreachable as e:
            report["daemon"] = {"reachable": False, "error": str(e)}
            lines.append(f"daemon on {client.socket}: unreachable: {e}")
            code = e.exit_code
        except ClientError as e:
            report["daemon"] = {"reachable": True, "error": {"code": e.code, "message": e.message}}
            lines.append(f"daemon on {client.socket}: {_explain(e)}")
            code = ExitCode.SERVER   # a status request cannot be bad input: any error is the daemon's
        else:
            if _nesting(st) > MAX_ANSWER_DEPTH:
                st = {"error": f"the daemon's status nests more than {MAX_ANSWER_DEPTH} levels; not shown"}
                code = ExitCode.SERVER
            report["daemon"] = {"reachable": True, "socket": client.socket, "status": st}
            lines.append(f"daemon on {client.socket}:")
            lines.extend(_describe_daemon(st))
    else:
        report["daemon"] = None
        if not isinstance(units, str):
            lines.append("daemon: not running (not asked, so it stays asleep)")
    if args.socket is None:   # every instance, never connected to
        listed = list_instances()
        report["instances"] = [i.to_dict() for i in listed]
        if len(listed) > 1:
            lines.append("instances (from systemd; none was asked, none woken):")
            lines.extend(f"  {i.line()}" for i in listed)
    text = _json_text(report, indent=2) if args.json else _lines_out(lines)
    if not _out(text):
        _err("stdout was closed by its reader; the status was not shown")
    return code


# -- check-config -----------------------------------------------------------------------------

def cmd_check_config(args: argparse.Namespace) -> ExitCode:
    """Check the settings file as the daemon will read it (e2vd.config.check_file); one line on
    stdout and 0 when it can be used; ConfigError (exit 2, through `main`) when it cannot. The
    file: --config, else --instance's, else $E2VD_CONFIG, else $E2VD_INSTANCE's (blank: unset),
    else the default instance's."""
    from e2vd.config import CONFIG_ENV, ENV_PREFIX, INSTANCE_ENV, check_file, config_file_path
    from e2vd.instances import instance

    chosen = args.config if getattr(args, "instance", None) is None else str(instance(args.instance).config)
    named = os.environ.get(INSTANCE_ENV, "")
    if chosen is None and not os.environ.get(CONFIG_ENV) and named.strip():   # as recognize and status do
        chosen = str(instance(named, f"${INSTANCE_ENV}").config)
    path, explicit = config_file_path(chosen)
    settings, present = check_file(path, required=explicit)
    where = path if present else f"{path} (absent: the defaults apply)"
    line = (f"{where}: usable; model {settings.model}, device {settings.device}, idle_timeout "
            f"{settings.idle_timeout:g} s, inference_timeout {settings.inference_timeout:g} s")
    ignored = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in (CONFIG_ENV, INSTANCE_ENV))
    if ignored:
        line += f" ({', '.join(ignored)} of this shell not applied: the service has its own environment)"
    if not _out(line):
        _err("stdout was closed by its reader; the settings are usable all the same")
    return ExitCode.OK


# -- warmup -----------------------------------------------------------------------------------

def cmd_warmup(args: argparse.Namespace) -> ExitCode:
    """Wake the daemon, wait for the model, ask it to stay warm; 0 or 2 here, and the exit code
    of a DaemonUnreachable/ClientError that leaves through `main`."""
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
                return ExitCode.OK
    except ValueError as e:
        _err(f"warmup: {e}")
        return ExitCode.USAGE
    if args.timeout is None:
        args.timeout = WARMUP_TIMEOUT
    with _client(args) as client:
        with Waking("waking the e2vd daemon and loading the model"):
            answer = client.warmup(hold)   # DaemonUnreachable, ClientError: main says it, exits
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
        if not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
            deadline = time.time() + hold
        until = _local_time(deadline, "%H:%M")
        if isinstance(granted, (int, float)) and math.isfinite(granted) and granted + 1 < hold:
            msg += (f"; keeping it warm for {format_duration(granted)} only (until {until}): the daemon "
                    f"caps holds at its max_hold, asked for {format_duration(hold)}")
        else:
            msg += f"; keeping it warm for {format_duration(hold)} (until {until})"
    if not _out(msg):
        _err("stdout was closed by its reader; the daemon is warm all the same")
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
