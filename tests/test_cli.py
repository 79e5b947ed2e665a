"""The `e2vd` command's client side (recognize, status, warmup): output, files written and exit codes,
against a real Unix-socket HTTP server (unix_http_server) and, in test_cli_daemon.py, the real daemon."""
from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_audio
from e2vd import cli
from e2vd.client import Recognition
from e2vd.durations import format_duration, parse_clock, parse_duration, seconds_until
from e2vd.vocabulary import ExitCode
from raw_peer import RawPeer, http_answer, json_answer
from unix_http_server import LABELS, TinyDaemon

ROOT = Path(__file__).resolve().parent.parent


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def clips(tmp_path: Path) -> list[Path]:
    return [write_audio(tmp_path / f"c{i}.wav", seconds=1.0 + i, seed=i) for i in range(3)]


# -- pure helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("9h", 32400), ("1h30m", 5400),
                                           ("2.5", 2.5), ("0", 0), ("1d", 86400), (" 45 s ", 45)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "9x", "-5", "30m1h", "1h1h", "nan", "inf", "h"])
def test_parse_duration_rejects_with_example(text: str) -> None:
    with pytest.raises(ValueError, match="e.g.|>= 0"):
        parse_duration(text)


def test_clock_and_seconds_until() -> None:
    assert parse_clock("18:00") == dt.time(18, 0) and parse_clock("7:05:09") == dt.time(7, 5, 9)
    for bad in ("24:00", "18:60", "6pm", "18"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_clock(bad)
    tz = dt.timezone(dt.timedelta(hours=2))
    now = dt.datetime(2026, 11, 25, 9, 0, 0, tzinfo=tz)
    assert seconds_until(dt.time(18, 0), now) == 9 * 3600
    assert seconds_until(dt.time(8, 0), now) == -3600
    assert format_duration(32400) == "9 h 0 min" and format_duration(75) == "1 min 15 s"


def test_seconds_until_across_dst_change() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database here")
    now = dt.datetime(2026, 3, 29, 1, 0, tzinfo=berlin)  # clocks jump 02:00 -> 03:00 this night
    assert seconds_until(dt.time(4, 0), now) == 2 * 3600  # 3 wall-clock hours, 2 real ones


def test_embedding_paths() -> None:
    assert cli.embedding_paths("out.npy", ["a.wav"]) == [Path("out.npy")]
    assert cli.embedding_paths("d/out", ["a.wav"]) == [Path("d/out.npy")]
    assert cli.embedding_paths("out.npy", ["x/a.wav", "b.flac"]) == [Path("out-a.npy"), Path("out-b.npy")]
    assert cli.embedding_paths("out.npy", ["x/a.wav", "y/a.wav"]) == [Path("out-1-a.npy"), Path("out-2-a.npy")]


def test_table_lists_every_label_top_first() -> None:
    scores = [0.05, 0.01, 0.02, 0.62, 0.2, 0.03, 0.04, 0.02, 0.01]
    r = Recognition.from_json({"labels": LABELS, "scores": scores, "duration_s": 2.0, "model": "m",
                               "model_labels": LABELS, "timing_ms": {"queue": 1.0, "infer": 9.0}})
    text = cli.format_table("clip.wav", r)
    lines = text.splitlines()
    assert lines[0].startswith("clip.wav: happy 62.0%") and "2.00 s of audio" in lines[0] and "10 ms" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["happy", "neutral", "angry", "sad", "other",
                                                   "fearful", "surprised", "disgusted", "unknown"]
    assert "62.0% " + "\u2588" * 14 in lines[1]  # 0.62 * 24 = 14.9 blocks: 14 full + a part
    assert "#" * 15 in cli.format_table("clip.wav", r, unicode=False)


# A real `systemctl show` answer, captured from systemd 252 booted in a throw-away box (sdbox.sh).
SHOW_SAMPLE = """MainPID=0
StatusText=
Result=success
Id=e2vd.service
LoadState=not-found
ActiveState=inactive
SubState=dead
ActiveEnterTimestamp=

Listen=/run/systemd/journal/socket (Datagram)
Listen=/run/systemd/journal/stdout (Stream)
Result=success
Id=systemd-journald.socket
LoadState=loaded
ActiveState=active
SubState=listening
ActiveEnterTimestamp=Wed 2026-11-25 21:38:11 UTC
"""


def test_parse_systemctl_show() -> None:
    units = cli.parse_systemctl_show(SHOW_SAMPLE)
    assert set(units) == {"e2vd.service", "systemd-journald.socket"}
    svc, sock = units["e2vd.service"], units["systemd-journald.socket"]
    assert not svc.loaded and not svc.active and svc.get("MainPID") == "0"
    assert sock.active and sock.listen == ["/run/systemd/journal/socket (Datagram)",
                                           "/run/systemd/journal/stdout (Stream)"]
    lines = cli._describe_units(units)
    assert "not installed" in lines[0] and "sudo e2vd install" in lines[0]


def test_describe_units_running_and_idle() -> None:
    running = cli.parse_systemctl_show(
        "Id=e2vd.service\nLoadState=loaded\nActiveState=active\nSubState=running\nMainPID=42\n"
        "StatusText=ready: cpu, 3 requests served\nActiveEnterTimestamp=Wed 2026-11-25 09:00:00 UTC\n\n"
        "Id=e2vd.socket\nLoadState=loaded\nActiveState=active\nSubState=running\nListen=/run/e2vd/e2vd.sock (Stream)\n")
    text = "\n".join(cli._describe_units(running))
    assert "e2vd.service: active (running), PID 42" in text and "3 requests served" in text
    idle = cli.parse_systemctl_show(
        "Id=e2vd.service\nLoadState=loaded\nActiveState=inactive\nSubState=dead\nResult=success\n\n"
        "Id=e2vd.socket\nLoadState=loaded\nActiveState=active\nSubState=listening\nListen=/run/e2vd/e2vd.sock (Stream)\n")
    text = "\n".join(cli._describe_units(idle))
    assert "inactive (dead)" in text and "the next request starts the daemon" in text


# -- recognize against the small server -------------------------------------------------------

def test_recognize_table_for_several_files_over_one_connection(clips: list[Path], capsys) -> None:
    with TinyDaemon() as d:
        code, out, err = run(["recognize", *map(str, clips), "--socket", d.socket], capsys)
        assert code == 0, err
        assert d.connections == 1 and [r[1] for r in d.requests] == ["/v1/recognize"] * 3
    for c in clips:
        assert f"{c}: happy 84.0%" in out
    assert out.count("neutral") == 3 and err == ""


def test_recognize_json_lines(clips: list[Path], capsys) -> None:
    with TinyDaemon() as d:
        code, out, err = run(["recognize", str(clips[0]), str(clips[1]), "--json", "--socket", d.socket], capsys)
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [doc["file"] for doc in docs] == [str(clips[0]), str(clips[1])]
    assert docs[0]["labels"] == LABELS and docs[0]["top"]["label"] == "happy"
    assert docs[1]["duration_s"] == clips[1].stat().st_size


def test_recognize_embedding_files(clips: list[Path], tmp_path: Path, capsys) -> None:
    with TinyDaemon() as d:
        code, _, err = run(["recognize", str(clips[0]), "--embedding", str(tmp_path / "e.npy"),
                            "--socket", d.socket], capsys)
        assert code == 0 and np.load(tmp_path / "e.npy").shape == (4,)
        assert "wrote embedding (4,)" in err
        code, out, _ = run(["recognize", str(clips[0]), str(clips[1]), "--granularity", "frame", "--json",
                            "--embedding", str(tmp_path / "f.npy"), "--socket", d.socket], capsys)
    assert code == 0
    for c in clips[:2]:
        assert np.load(tmp_path / f"f-{c.stem}.npy").shape == (3, 4)
    doc = json.loads(out.splitlines()[0])
    assert doc["embedding_file"] == str(tmp_path / f"f-{clips[0].stem}.npy") and "embedding" not in doc


def test_recognize_rejected_file_exit_4_others_still_done(clips: list[Path], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio, just text")
    with TinyDaemon() as d:
        code, out, err = run(["recognize", str(clips[0]), str(bad), str(clips[1]), "--socket", d.socket], capsys)
    assert code == ExitCode.REJECTED
    assert f"{bad}: cannot decode" in err and "bad_audio, HTTP 400" in err and "libsndfile" in err
    assert f"{clips[0]}: happy" in out and f"{clips[1]}: happy" in out


def test_recognize_server_error_exit_5(tmp_path: Path, capsys) -> None:
    boom = tmp_path / "boom.wav"
    boom.write_bytes(b"boom")
    with TinyDaemon() as d:
        code, _, err = run(["recognize", str(boom), "--json", "--socket", d.socket], capsys)
    assert code == ExitCode.SERVER and "journalctl -u e2vd" in err


def test_recognize_missing_file_exit_2_sends_nothing(clips: list[Path], tmp_path: Path, capsys) -> None:
    with TinyDaemon() as d:
        code, out, err = run(["recognize", str(clips[0]), str(tmp_path / "nope.wav"), str(tmp_path),
                              "--socket", d.socket], capsys)
        assert d.connections == 0
    assert code == ExitCode.USAGE and out == ""
    assert "nope.wav: no such file" in err and "is a directory" in err and "nothing was sent" in err


def test_recognize_embedding_into_missing_directory_exit_2(clips: list[Path], tmp_path: Path, capsys) -> None:
    with TinyDaemon() as d:
        code, out, err = run(["recognize", str(clips[0]), "--embedding", str(tmp_path / "no" / "e.npy"),
                              "--socket", d.socket], capsys)
        assert d.connections == 0
    assert code == ExitCode.USAGE and out == "" and "does not exist" in err


def test_recognize_unreachable_exit_3_with_fix(clips: list[Path], capsys) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "none.sock")
    code, out, err = run(["recognize", str(clips[0]), "--socket", path], capsys)
    assert code == ExitCode.UNREACHABLE and out == ""
    assert path in err and "systemctl enable --now e2vd.socket" in err


def test_recognize_via_environment_socket_in_subprocess(clips: list[Path]) -> None:
    """The real entry point (`python -m e2vd`), socket from $E2VD_SOCKET, output on a pipe."""
    with TinyDaemon() as d:
        env = {**os.environ, "E2VD_SOCKET": d.socket}
        proc = subprocess.run([sys.executable, "-m", "e2vd", "recognize", str(clips[0])], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{clips[0]}: happy 84.0%" in proc.stdout and proc.stderr == ""  # no progress line on a pipe


# -- waking indicator -------------------------------------------------------------------------

def test_waking_line_only_on_a_terminal() -> None:
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    try:
        with cli.Waking("waking the e2vd daemon", stream=tty, delay=0.0):
            time.sleep(0.35)
        tty.close()
        shown = b""
        while True:  # a pty hands data over asynchronously: read until the closed end reports EIO
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if not tty.closed:
            tty.close()
        os.close(master)
    shown = shown.decode()
    assert "waking the e2vd daemon" in shown and shown.endswith("\r\x1b[K")
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        with cli.Waking("waking", stream=pipe, delay=0.0) as waking:
            assert not waking.enabled
            time.sleep(0.2)
    with os.fdopen(r) as f:
        assert f.read() == ""


# -- status and warmup against the small server -----------------------------------------------

def test_status_with_socket_asks_that_daemon(capsys) -> None:
    with TinyDaemon() as d:
        code, out, _ = run(["status", "--socket", d.socket], capsys)
        assert code == 0 and f"daemon on {d.socket}:" in out
        assert "model: tiny-test" in out and "memory.param_bytes: 1.0 MiB" in out
        code, out, _ = run(["status", "--socket", d.socket, "--json"], capsys)
        doc = json.loads(out)
        assert doc["daemon"]["status"]["model"] == "tiny-test" and "systemd" in doc
        assert [r[1] for r in d.requests] == ["/v1/status", "/v1/status"]


def test_status_never_connects_without_systemd_or_socket(capsys) -> None:
    units = cli.systemd_units()
    if not isinstance(units, str):
        pytest.skip("systemd runs here; the sdbox tests cover status with systemd")
    code, out, _ = run(["status"], capsys)
    assert code == ExitCode.UNREACHABLE
    assert "systemd: not available" in out and "--socket PATH" in out


def test_status_socket_unreachable_exit_3(capsys) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "none.sock")
    code, out, _ = run(["status", "--socket", path], capsys)
    assert code == ExitCode.UNREACHABLE and "unreachable" in out and "systemctl enable --now e2vd.socket" in out


def test_warmup_hold_and_until(capsys) -> None:
    with TinyDaemon() as d:
        code, out, _ = run(["warmup", "--hold", "9h", "--socket", d.socket], capsys)
        assert code == 0 and "e2vd is warm: model tiny-test on cpu" in out and "9 h 0 min" in out
        assert [r[:3] for r in d.requests] == [("POST", "/v1/warmup", {"hold": "32400"}), ("GET", "/v1/status", {})]
        assert d.connections == 1
        code, out, _ = run(["warmup", "--socket", d.socket], capsys)
        assert code == 0 and d.requests[-2][:3] == ("POST", "/v1/warmup", {})
        in_a_while = (dt.datetime.now() + dt.timedelta(minutes=2)).strftime("%H:%M")
        if in_a_while > dt.datetime.now().strftime("%H:%M"):  # not across midnight
            code, out, _ = run(["warmup", "--until", in_a_while, "--socket", d.socket], capsys)
            assert code == 0
            assert 60 <= float(d.requests[-2][2]["hold"]) <= 120
        n = len(d.requests)
        earlier = (dt.datetime.now() - dt.timedelta(minutes=2)).strftime("%H:%M")
        if earlier < dt.datetime.now().strftime("%H:%M"):
            code, _, err = run(["warmup", "--until", earlier, "--socket", d.socket], capsys)
            assert code == 0 and "already passed today" in err and len(d.requests) == n
        code, _, err = run(["warmup", "--hold", "9x", "--socket", d.socket], capsys)
        assert code == ExitCode.USAGE and "bad duration '9x'" in err and len(d.requests) == n


def test_warmup_unreachable_exit_3(capsys) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "none.sock")
    code, _, err = run(["warmup", "--hold", "1m", "--socket", path], capsys)
    assert code == ExitCode.UNREACHABLE and "systemctl enable --now e2vd.socket" in err


@pytest.mark.parametrize("answer, code, words", [
    (http_answer('{"error": {"code": "bad_option", "message": "hold=x is not accepted"}}', "400 Bad Request"),
     ExitCode.REJECTED, "warmup: hold=x is not accepted [bad_option, HTTP 400]"),
    (http_answer('{"error": {"code": "model_unavailable", "message": "model.pt is missing"}}',
                 "503 Service Unavailable"),
     ExitCode.SERVER, "warmup: model.pt is missing [model_unavailable, HTTP 503]; the daemon cannot load"),
])
def test_warmup_refused_exits_with_the_errors_own_code(answer: bytes, code: ExitCode, words: str, capsys) -> None:
    with RawPeer(answer) as peer:
        got, out, err = run(["warmup", "--socket", peer.socket], capsys)
    assert got == code and out == "" and err.count("\n") == 1 and words in err, err


# -- exit codes: e2vd's exceptions carry theirs, main alone maps them ---------------------------

def test_help_lists_every_exit_code() -> None:
    epilog = cli.build_parser().epilog
    assert set(cli.EXIT_WORDS) == set(ExitCode)
    for code in ExitCode:
        assert f"{int(code)} {cli.EXIT_WORDS[code]}" in epilog


def _failing(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make `e2vd status` raise `exc`, as any subcommand's code could."""
    def fail(args: object) -> ExitCode:
        raise exc
    monkeypatch.setattr(cli, "cmd_status", fail)


@pytest.mark.parametrize("module, name, args, code", [
    ("e2vd.client", "DaemonUnreachable", ("/x.sock", "no daemon socket at /x.sock"), ExitCode.UNREACHABLE),
    ("e2vd.client", "DaemonTimeout", ("/x.sock", "no answer within 1 s"), ExitCode.UNREACHABLE),
    ("e2vd.client", "InputError", ("a.wav", "too_large", "a.wav: too large"), ExitCode.REJECTED),
    ("e2vd.engine", "ModelError", ("model.pt is missing",), ExitCode.SERVER),
    ("e2vd.audio", "AudioError", ("bad_audio", "not audio"), ExitCode.REJECTED),
    ("e2vd.gpu", "GpuBusyError", ("cuda:0 has 10 MiB free",), ExitCode.SERVER),
    ("e2vd.install", "InstallError", ("`systemctl daemon-reload` failed",), ExitCode.FAILED),
    ("e2vd.install", "InstallUsageError", ("--group 'A B' is not valid",), ExitCode.USAGE),
])
def test_main_exits_with_the_code_the_exception_carries(module: str, name: str, args: tuple, code: ExitCode,
                                                        monkeypatch, capsys) -> None:
    exc = getattr(importlib.import_module(module), name)(*args)
    assert exc.exit_code == code
    _failing(monkeypatch, exc)
    got, out, err = run(["status"], capsys)
    assert got == code and type(got) is int and out == ""
    assert err == f"e2vd: status: {exc}\n"


def test_main_lets_a_bug_keep_its_traceback_and_maps_ctrl_c(monkeypatch, capsys) -> None:
    _failing(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["status"])
    _failing(monkeypatch, KeyboardInterrupt())
    assert run(["status"], capsys) == (ExitCode.INTERRUPTED, "", "e2vd: interrupted\n") and ExitCode.INTERRUPTED == 130


def test_install_errors_exit_through_main_with_their_own_code(monkeypatch, capsys) -> None:
    """install.py no longer picks an exit status from its message (`2 if "--" in str(exc) else 1`):
    it raises, and main exits with the exception's code."""
    from e2vd import install, systemd

    monkeypatch.setattr(systemd, "booted", lambda: True)
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    code, out, err = run(["install", "--no-start"], capsys)
    assert code == ExitCode.USAGE and out == "" and err.startswith("e2vd: install: must run as root")
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)

    def groupadd_fails(options, **kw) -> None:
        raise install.InstallError("`groupadd --system e2vd` failed (exit 10): cannot lock /etc/group")
    monkeypatch.setattr(install, "install", groupadd_fails)
    code, _, err = run(["install"], capsys)
    assert code == ExitCode.FAILED and err == "e2vd: install: `groupadd --system e2vd` failed (exit 10): cannot lock /etc/group\n"
    monkeypatch.undo()
    monkeypatch.setattr(systemd, "booted", lambda: True)
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    monkeypatch.setattr(install.Layout, "detect", lambda: pytest.fail("a bad option must stop before anything else"))
    code, _, err = run(["install", "--group", "Bad Group", "--no-start"], capsys)   # validated first: nothing changes
    assert code == ExitCode.USAGE and "--group 'Bad Group' is not a valid group name" in err


def test_serve_with_bad_settings_exits_2_through_main(tmp_path: Path) -> None:
    """daemon.main lets ConfigError through; cli.main prints it on one line and exits 2."""
    proc = e2vd("serve", "--socket", str(tmp_path / "s.sock"), env={"E2VD_QUANTIZE": "maybe"})
    one_line(proc, ExitCode.USAGE, "e2vd: serve: Bad value for environment variable E2VD_QUANTIZE",
             "1/0, true/false, yes/no, on/off")
    proc = e2vd("serve", "--config", str(tmp_path / "none.toml"))
    one_line(proc, ExitCode.USAGE, f"e2vd: serve: Config file {tmp_path / 'none.toml'} does not exist")
    assert not (tmp_path / "s.sock").exists()


# -- `e2vd` as a process: bounded input, one-line failures (issue 7, items 3 and 9) ------------

def e2vd(*argv: str, env: dict[str, str] | None = None, stdin: object = subprocess.DEVNULL,
         stdout: object = subprocess.PIPE, memory_gib: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m e2vd ARGV` as an operator would, with this machine's E2VD_* variables removed,
    E2VD_CONFIG=/dev/null unless `env` says otherwise, and an address-space cap of `memory_gib`
    (so that an unbounded read fails with MemoryError instead of eating the machine)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("E2VD_")}
    full_env.update({"E2VD_CONFIG": "/dev/null", **(env or {})})

    def cap() -> None:
        if memory_gib is not None:
            import resource
            limit = int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "e2vd", *argv], cwd=ROOT, env=full_env, stdin=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=cap)


def one_line(proc: subprocess.CompletedProcess[str], code: int, *parts: str, lines: int = 1) -> str:
    """Assert `proc` exited `code` with `lines` stderr lines (no traceback) containing `parts`."""
    err = proc.stderr
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == code, err
    assert len(err.splitlines()) == lines, err
    for part in parts:
        assert part in err, err
    return err


def test_recognize_dev_zero_by_name_is_refused_at_once(clips: list[Path]) -> None:
    """Issue 7.3: it used to read /dev/zero until MemoryError (2.7 GB) and print a traceback."""
    with TinyDaemon() as d:
        proc = e2vd("recognize", str(clips[0]), "/dev/zero", "--socket", d.socket, memory_gib=1)
        assert d.connections == 0
    one_line(proc, ExitCode.USAGE, "/dev/zero: a character device, not a regular file",
             "e2vd recognize -", "nothing was sent", lines=2)


def test_recognize_fifo_by_name_is_refused_without_waiting(clips: list[Path], tmp_path: Path) -> None:
    """Issue 7.3: a FIFO nobody writes to used to block the command forever (in open())."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    with TinyDaemon() as d:
        proc = e2vd("recognize", str(fifo), "--socket", d.socket)
        assert d.connections == 0
    one_line(proc, ExitCode.USAGE, f"{fifo}: a FIFO (named pipe), not a regular file", lines=2)


def test_recognize_stdin_endless_is_cut_at_max_body_bytes() -> None:
    with TinyDaemon() as d:
        with open("/dev/zero", "rb") as zero:
            proc = e2vd("recognize", "-", "--socket", d.socket, stdin=zero, memory_gib=1,
                        env={"E2VD_MAX_BODY_BYTES": "100000"})
            assert d.requests == []
            one_line(proc, ExitCode.REJECTED, "stdin: larger than 100000 bytes",
                     "max_body_bytes", "from $E2VD_MAX_BODY_BYTES", "nothing was sent")
        with open("/dev/zero", "rb") as zero:  # no setting anywhere: the daemon's default
            proc = e2vd("recognize", "-", "--socket", d.socket, stdin=zero, memory_gib=1)
            assert d.requests == []
    one_line(proc, ExitCode.REJECTED, "stdin: larger than 50000000 bytes", "the default")


def test_recognize_large_file_refused_others_still_done(clips: list[Path], tmp_path: Path) -> None:
    toml = tmp_path / "e2vd.toml"
    toml.write_text("max_body_bytes = 200000\n")
    big = tmp_path / "big.wav"
    big.write_bytes(b"RIFF" + b"\0" * 200_000)
    with TinyDaemon() as d:
        proc = e2vd("recognize", str(clips[0]), str(big), str(clips[1]), "--json", "--socket", d.socket,
                    env={"E2VD_CONFIG": str(toml)})
        assert [r[3] for r in d.requests] == [clips[0].stat().st_size, clips[1].stat().st_size]
    one_line(proc, ExitCode.REJECTED, f"{big}: larger than 200000 bytes", f"from {toml}",
             "set $E2VD_MAX_BODY_BYTES")
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [doc["file"] for doc in docs] == [str(clips[0]), str(big), str(clips[1])]
    assert docs[1]["error"]["code"] == "too_large" and docs[2]["top"]["label"] == "happy"


def test_recognize_stdin_audio_and_a_stalled_writer(clips: list[Path]) -> None:
    with TinyDaemon() as d:
        with open(clips[0], "rb") as f:
            proc = e2vd("recognize", "-", "--socket", d.socket, stdin=f)
        assert proc.returncode == 0 and proc.stderr == ""
        assert proc.stdout.startswith("stdin: happy 84.0%") and d.requests[-1][3] == clips[0].stat().st_size
        r, w = os.pipe()  # the writer stays open and never writes: --timeout bounds the wait
        try:
            os.write(w, b"RIFF")
            proc = e2vd("recognize", "-", "--socket", d.socket, "--timeout", "0.5", stdin=r)
        finally:
            os.close(r)
            os.close(w)
        assert len(d.requests) == 1
    one_line(proc, ExitCode.REJECTED, "stdin: the audio did not arrive in full within 0.5 s (4 bytes so far)",
             "--timeout")


def test_recognize_stdin_must_be_a_pipe_or_file(clips: list[Path]) -> None:
    master, slave = os.openpty()
    try:
        proc = e2vd("recognize", "-", "--socket", "/nonexistent.sock", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    one_line(proc, ExitCode.USAGE, "stdin is a terminal", lines=2)
    proc = e2vd("recognize", "-", str(clips[0]), "-", "--socket", "/nonexistent.sock")
    one_line(proc, ExitCode.USAGE, "stdin can be read only once", lines=2)


@pytest.mark.parametrize("command", ["recognize", "warmup"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e300", "soon"])
def test_unusable_timeout_is_a_usage_error(command: str, value: str, clips: list[Path]) -> None:
    """Issue 7.9: -1 and nan ended in a traceback (settimeout/struct), 0 silently meant 300."""
    with TinyDaemon() as d:
        args = [str(clips[0])] if command == "recognize" else []
        proc = e2vd(command, *args, "--timeout", value, "--socket", d.socket)
        assert d.connections == 0
    one_line(proc, ExitCode.USAGE, f"e2vd {command}: argument --timeout: '{value}'", "seconds > 0",
             f"`e2vd {command} --help`")


@pytest.mark.parametrize("argv", [["recognize", "{clip}"], ["status"], ["warmup"]])
def test_peer_that_does_not_speak_http_exit_3(argv: list[str], clips: list[Path]) -> None:
    with RawPeer(b"SSH-2.0-OpenSSH_9.2p1\r\n") as peer:
        proc = e2vd(*[a.format(clip=clips[0]) for a in argv], "--socket", peer.socket)
    out_or_err = proc.stdout + proc.stderr
    assert "Traceback" not in out_or_err and proc.returncode == ExitCode.UNREACHABLE, out_or_err
    assert "does not speak HTTP" in out_or_err and "not the e2vd daemon" in out_or_err


@pytest.mark.parametrize("argv", [["recognize", "{clip}"], ["recognize", "{clip}", "--json"], ["warmup"]])
def test_response_header_over_64k_exit_5(argv: list[str], clips: list[Path]) -> None:
    with RawPeer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n") as peer:
        proc = e2vd(*[a.format(clip=clips[0]) for a in argv], "--socket", peer.socket)
    one_line(proc, ExitCode.SERVER, "malformed answer", "LineTooLong")
    if "--json" in argv:
        assert json.loads(proc.stdout)["error"]["code"] == "internal"


def test_mangled_answers_exit_5(clips: list[Path]) -> None:
    for answer in (json_answer({"labels": [], "scores": [], "duration_s": 1.0}),
                   http_answer("[" * 100_000 + "]" * 100_000)):
        with RawPeer(answer) as peer:
            proc = e2vd("recognize", str(clips[0]), "--socket", peer.socket)
        one_line(proc, ExitCode.SERVER, f"{clips[0]}: ", "HTTP 502")


def test_status_with_odd_numbers_and_absurd_nesting() -> None:
    odd = {"state": "ready", "uptime": float("inf"), "idle_in": float("nan"), "keep_warm_deadline": 1e300,
           "idle_deadline": -1e300}
    with RawPeer(json_answer(odd)) as peer:
        proc = e2vd("status", "--socket", peer.socket)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "uptime: inf" in proc.stdout and "keep_warm_deadline: 1e+300 (Unix time)" in proc.stdout
    nested: object = 1
    for _ in range(500):
        nested = {"a": nested}
    with RawPeer(json_answer({"state": "ready", "deep": nested})) as peer:
        for argv in (["status"], ["status", "--json"]):
            proc = e2vd(*argv, "--socket", peer.socket)
            assert proc.returncode == ExitCode.SERVER and "Traceback" not in proc.stderr, proc.stderr
            assert "nests more than 16 levels" in proc.stdout


def _closed_pipe_run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run e2vd with stdout a pipe whose read end is already closed (`| head -0`, deterministically)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return e2vd(*argv, stdout=w)
    finally:
        os.close(w)


def test_closed_stdout_one_line_and_no_more_work(clips: list[Path]) -> None:
    """Issue 7.9: `| head -0` ended in a BrokenPipeError traceback (twice: print, then exit's flush).
    Now: one line, the rest is not sent, exit code of what was done (0: the reader chose to stop)."""
    with TinyDaemon() as d:
        proc = _closed_pipe_run("recognize", *map(str, clips), "--socket", d.socket)
        one_line(proc, ExitCode.OK, "stdout was closed by its reader; stopped after 1 of 3 file(s), 2 not sent")
        assert len(d.requests) == 1
        bad = clips[0].with_name("bad.wav")
        bad.write_bytes(b"not audio")
        proc = _closed_pipe_run("recognize", str(bad), str(clips[0]), "--json", "--socket", d.socket)
        one_line(proc, ExitCode.REJECTED, "stopped after 1 of 2", lines=2)  # the rejection, then the stop
        proc = _closed_pipe_run("status", "--socket", d.socket)
        one_line(proc, ExitCode.OK, "the status was not shown")
        proc = _closed_pipe_run("warmup", "--hold", "1m", "--socket", d.socket)
        one_line(proc, ExitCode.OK, "the daemon is warm all the same")
    proc = _closed_pipe_run("--help")
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("hold", ["inf", "-5", "9" * 400 + "s"])
def test_warmup_unusable_hold_exit_2(hold: str) -> None:
    with TinyDaemon() as d:
        proc = e2vd("warmup", "--hold", hold, "--socket", d.socket)
        assert d.connections == 0
    one_line(proc, ExitCode.USAGE, "warmup: ")


def test_warmup_hold_beyond_any_calendar() -> None:
    """A hold the daemon grants as asked (the small server does) but no calendar can show."""
    with TinyDaemon() as d:
        proc = e2vd("warmup", "--hold", "1e17", "--socket", d.socket)
        assert d.requests[0][2] == {"hold": "1e+17"}
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "e2vd is warm" in proc.stdout and "(Unix time)" in proc.stdout


def test_socket_paths_that_cannot_work(clips: list[Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    for path, words in ((plain, "is a regular file, not a socket"), (tmp_path, "is a directory, not a socket"),
                        ("/tmp/" + "s" * 120, "too long for AF_UNIX")):
        proc = e2vd("recognize", str(clips[0]), "--socket", str(path))
        one_line(proc, ExitCode.UNREACHABLE, words)
    proc = e2vd("status", "--socket", "")
    one_line(proc, ExitCode.USAGE, "--socket: empty path")


def test_bad_file_and_embedding_names_exit_2(clips: list[Path], tmp_path: Path) -> None:
    proc = e2vd("recognize", str(tmp_path / ("n" * 300)), "--socket", "/nonexistent.sock")
    one_line(proc, ExitCode.USAGE, "File name too long", "nothing was sent", lines=2)
    for out in ("", ".", "/", str(tmp_path) + "/"):
        proc = e2vd("recognize", str(clips[0]), "--embedding", out, "--socket", "/nonexistent.sock")
        one_line(proc, ExitCode.USAGE, "--embedding", "names no file")
    proc = e2vd("recognize", str(clips[0]), "--embedding", str(tmp_path / ("d" * 300) / "e.npy"),
                "--socket", "/nonexistent.sock")
    one_line(proc, ExitCode.USAGE, "--embedding: directory", "File name too long")


def test_file_name_that_is_not_utf8(clips: list[Path], tmp_path: Path) -> None:
    name = os.fsdecode(bytes(tmp_path) + b"/clip-\xff.wav")
    Path(name).write_bytes(clips[0].read_bytes())
    with TinyDaemon() as d:
        for extra in ([], ["--json"]):
            # A strict UTF-8 stdout, as under en_US.UTF-8 (Python picks surrogateescape for C.UTF-8).
            proc = e2vd("recognize", name, *extra, "--socket", d.socket, env={"PYTHONIOENCODING": "utf-8:strict"})
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            assert "clip-\\udcff.wav" in proc.stdout
    assert json.loads(proc.stdout)["file"] == name


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_permission_problems_as_another_user(clips: list[Path]) -> None:
    private = Path(tempfile.mkdtemp(prefix="e2vd-t-"))  # 0700, root's
    clip = private / "clip.wav"
    clip.write_bytes(clips[0].read_bytes())
    public = Path(tempfile.mkdtemp(prefix="e2vd-t-"))
    public.chmod(0o755)
    readable = public / "clip.wav"
    readable.write_bytes(clips[0].read_bytes())
    readable.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2VD_")}
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "e2vd"]
    probe = subprocess.run(as_nobody[:-2] + ["-c", "import e2vd.cli"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this interpreter here: {probe.stderr[-200:]}")
    try:
        with TinyDaemon() as d:
            os.chmod(d.socket, 0o600)
            os.chmod(os.path.dirname(d.socket), 0o755)
            runs = [subprocess.run(as_nobody + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
                    for argv in (["recognize", str(clip), "--socket", d.socket],
                                 ["recognize", str(readable), "--socket", d.socket])]
            assert d.connections == 0
    finally:
        shutil.rmtree(private)
        shutil.rmtree(public)
    one_line(runs[0], ExitCode.USAGE, f"{clip}: not reachable by you (permission denied", lines=2)
    one_line(runs[1], ExitCode.UNREACHABLE, "permission denied", "usermod -aG e2vd")


# -- against the real daemon (`e2vd serve` with the tiny stand-in) ----------------------------

@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from daemon_proc import DaemonProcess

    sock = tmp_path_factory.mktemp("cli") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600) as d:
        yield d


def test_daemon_recognize_table_matches_json(daemon, clips: list[Path], capsys) -> None:
    sock = str(daemon.socket)
    code, table, err = run(["recognize", *map(str, clips), "--socket", sock], capsys)
    assert code == 0, err
    code, out, _ = run(["recognize", *map(str, clips), "--json", "--socket", sock], capsys)
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["file"] for d in docs] == list(map(str, clips))
    for clip, doc in zip(clips, docs):
        assert doc["labels"] == LABELS and sum(doc["scores"]) == pytest.approx(1.0, abs=1e-4)
        assert doc["duration_s"] == pytest.approx(1.0 + clips.index(clip), abs=0.01)
        # The table's header names the same top label and percentage as the JSON.
        assert f"{clip}: {doc['top']['label']} {100 * doc['top']['score']:.1f}%" in table
        ranked = sorted(zip(doc["scores"], doc["labels"]), reverse=True)
        block = table.split(f"{clip}: ", 1)[1].splitlines()[1:10]
        assert [ln.split()[0] for ln in block] == [lab for _, lab in ranked]


def test_daemon_recognize_embedding_npy(daemon, clips: list[Path], tmp_path: Path, capsys) -> None:
    sock = str(daemon.socket)
    code, _, err = run(["recognize", str(clips[1]), "--embedding", str(tmp_path / "u.npy"), "--socket", sock], capsys)
    assert code == 0, err
    u = np.load(tmp_path / "u.npy")
    assert u.ndim == 1 and u.dtype == np.float32
    code, _, err = run(["recognize", str(clips[0]), str(clips[2]), "--granularity", "frame",
                        "--embedding", str(tmp_path / "f.npy"), "--socket", sock], capsys)
    assert code == 0, err
    f0, f2 = np.load(tmp_path / "f-c0.npy"), np.load(tmp_path / "f-c2.npy")
    assert f0.shape[1] == f2.shape[1] == u.shape[0]
    assert abs(f0.shape[0] - 50) <= 2 and abs(f2.shape[0] - 150) <= 2  # 1 s and 3 s at 50 Hz


def test_daemon_recognize_bad_audio_exit_4(daemon, clips: list[Path], tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(os.urandom(4000))
    tiny = write_audio(tmp_path / "blip.wav", seconds=0.01)
    code, out, err = run(["recognize", str(garbage), str(clips[0]), str(tiny), "--socket", str(daemon.socket)], capsys)
    assert code == ExitCode.REJECTED
    assert f"{garbage}: " in err and "bad_audio, HTTP 400" in err
    assert f"{tiny}: " in err and "too_short" in err
    assert f"{clips[0]}: " in out  # the good file in between was still recognised


def test_daemon_status_and_warmup_with_socket(daemon, capsys) -> None:
    sock = str(daemon.socket)
    code, out, err = run(["warmup", "--hold", "45s", "--socket", sock], capsys)
    assert code == 0, err
    assert out.startswith("e2vd is warm: model ") and "on cpu" in out and "45 s" in out
    code, out, _ = run(["status", "--socket", sock], capsys)
    assert code == 0
    assert f"daemon on {sock}:" in out and "state: ready" in out and "device: cpu" in out
    assert "keep_warm_deadline: " in out and "(in " in out
    code, out, _ = run(["status", "--socket", sock, "--json"], capsys)
    st = json.loads(out)["daemon"]["status"]
    assert st["state"] == "ready" and st["keep_warm_deadline"] > time.time()


def test_daemon_without_model_exit_5_and_stops_early(clips: list[Path], tmp_path: Path, capsys) -> None:
    from daemon_proc import DaemonProcess

    missing = tmp_path / "no-such-model"
    with DaemonProcess(tmp_path / "e2vd.sock", missing, unavailable_grace=60) as d:
        code, out, err = run(["recognize", str(clips[0]), str(clips[1]), "--socket", str(d.socket)], capsys)
        assert code == ExitCode.SERVER and out == ""
        assert f"{clips[0]}: " in err and str(missing) in err and "model_unavailable, HTTP 503" in err
        assert "skipping the other 1 file(s)" in err
        code, out, _ = run(["status", "--socket", str(d.socket)], capsys)
        assert "state: unavailable" in out and str(missing) in out


# -- issue 14: a daemon that died mid-request, check-config, no systemd as PID 1 ---------------

def test_recognize_a_daemon_that_died_mid_request_exit_5_and_the_next_file_still_goes(clips: list[Path],
                                                                                      capsys) -> None:
    with TinyDaemon(mode="hangup") as d:
        code, out, err = run(["recognize", str(clips[0]), str(clips[1]), "--socket", d.socket], capsys)
        assert code == ExitCode.SERVER and out == ""
        assert err.count("died mid-request") == 2 and "journalctl -u e2vd" in err
        assert len(d.requests) == 2                           # one per file, none resent


def test_check_config_accepts_a_usable_file_and_names_what_is_wrong(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.yaml", "model.pt", "tokens.txt"):
        (model / name).write_text("x")
    good = tmp_path / "good.toml"
    good.write_text(f'model = "{model}"\ninference_timeout = "3m"\n')
    proc = e2vd("check-config", "--config", str(good), env={"E2VD_IDLE_TIMEOUT": "5"})
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"{good}: usable; model {model}, device auto, idle_timeout 300 s, "
                                  "inference_timeout 180 s")
    assert "E2VD_IDLE_TIMEOUT of this shell not applied" in proc.stdout
    typo = tmp_path / "typo.toml"
    typo.write_text("idle_timeot = 30\n")
    one_line(e2vd("check-config", "--config", str(typo)), ExitCode.USAGE,
             f"e2vd: check-config: {typo}: unknown key 'idle_timeot' (did you mean 'idle_timeout'?)")
    gone = tmp_path / "gone.toml"
    gone.write_text(f'model = "{tmp_path / "nowhere"}"\n')
    one_line(e2vd("check-config", "--config", str(gone)), ExitCode.USAGE,
             f"{gone}: key 'model': the model directory {tmp_path / 'nowhere'} does not exist")
    one_line(e2vd("check-config", env={"E2VD_CONFIG": str(typo)}), ExitCode.USAGE, "unknown key 'idle_timeot'")


def test_install_without_systemd_as_pid_1_says_so_in_one_line_with_the_two_ways(monkeypatch, capsys) -> None:
    from e2vd import install, systemd

    monkeypatch.setattr(systemd, "booted", lambda: False)
    monkeypatch.setattr(install.Layout, "detect", lambda: pytest.fail("nothing may be done without systemd"))
    for argv in (["install"], ["uninstall"]):
        code, out, err = run(argv, capsys)
        assert code == ExitCode.USAGE and out == "" and len(err.splitlines()) == 1
        assert err.startswith(f"e2vd: {argv[0]}: systemd is not PID 1 here")
        assert "e2vd serve --socket /run/e2vd/e2vd.sock --model DIR" in err and "podman run --systemd=always" in err


def without_systemd(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` as root in a mount namespace whose /run is empty: to sd_booted(3), and to
    scripts/setup.sh, systemd is not PID 1 there, whatever this machine runs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /run")
    script = 'mount -t tmpfs e2vd-norun /run && exec "$@"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2VD_")}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_setup_sh_and_install_without_systemd_as_pid_1_stop_at_once_with_exit_2() -> None:
    for argv, prefix in ((["bash", "scripts/setup.sh", "tiny-standin"], "setup.sh: "),
                         ([sys.executable, "-m", "e2vd", "install"], "e2vd: install: ")):
        proc = without_systemd(argv)
        assert proc.returncode == ExitCode.USAGE, proc.stderr
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(prefix + "systemd is not PID 1 here (PID 1 is ")
        assert "e2vd serve --socket /run/e2vd/e2vd.sock --model DIR" in proc.stderr
        assert "podman run --systemd=always IMAGE /sbin/init" in proc.stderr


# -- hostile fallback fields in a daemon's answer ---------------------------------------------

def _answer(**extra: object) -> dict:
    return {"labels": list(LABELS), "scores": [1.0 / len(LABELS)] * len(LABELS), "duration_s": 1.0,
            "model": "/srv/m", **extra}


PRIMARY = {"labels": list(LABELS), "scores": [0.2] + [0.1] * (len(LABELS) - 1), "model": "/srv/main"}


@pytest.mark.parametrize("extra", [
    {"decided_by": "fallback\x1b[2J"}, {"decided_by": ["fallback"]}, {"decided_by": {"a": 1}},
    {"decided_by": None}, {"decided_by": 1},
    {"decided_by": "fallback", "primary": "x"}, {"decided_by": "fallback", "primary": []},
    {"decided_by": "fallback", "primary": {**PRIMARY, "labels": []}},
    {"decided_by": "fallback", "primary": {**PRIMARY, "scores": [float("nan")] * len(LABELS)}},
    {"decided_by": "fallback", "primary": {**PRIMARY, "model": ["x"]}},
    {"decided_by": "fallback", "primary": {**PRIMARY, "scores": [10 ** 400] * len(LABELS)}},
    {"fallback_error": {"a": "b"}}, {"fallback_error": ["x"]}, {"fallback_error": 5},
])
def test_hostile_fallback_fields_are_a_malformed_answer(extra: dict, clips: list[Path]) -> None:
    """decided_by, primary and fallback_error of the wrong type or value: exit 5 with the
    malformed-answer message, no traceback (Client: ClientError 502)."""
    with RawPeer(json_answer(_answer(**extra))) as peer:
        proc = e2vd("recognize", str(clips[0]), "--socket", peer.socket)
    assert "Traceback" not in proc.stderr, proc.stderr
    one_line(proc, ExitCode.SERVER, f"{clips[0]}: ", "HTTP 502")


def test_control_characters_in_an_answer_are_escaped_in_the_table(clips: list[Path]) -> None:
    """Every string the daemon sends (labels, model, primary.model, fallback_error) reaches the
    terminal with its control characters escaped; --json keeps them (JSON escapes them itself)."""
    evil = "\x1b]0;owned\x07\x1b[2J\x9b31m\r\u202e\u2028"
    labels = [f"{label}{evil}" for label in LABELS]
    answer = _answer(labels=labels, model=f"/srv/fb{evil}", decided_by="fallback",
                     primary={**PRIMARY, "labels": labels, "model": f"/srv/main{evil}"})
    with RawPeer(json_answer(answer)) as peer:
        proc = e2vd("recognize", str(clips[0]), "--socket", peer.socket)
    assert proc.returncode == 0, proc.stderr
    assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in proc.stdout), ascii(proc.stdout)
    assert "\u202e" not in proc.stdout and "\u2028" not in proc.stdout   # bidi override, line separator
    assert "fallback model /srv/fb\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\r\\u202e\\u2028" in proc.stdout
    assert "the main model /srv/main\\x1b]0;owned" in proc.stdout
    with RawPeer(json_answer(_answer(fallback_error=f"it broke{evil}"))) as peer:
        proc = e2vd("recognize", str(clips[0]), "--socket", peer.socket)
    assert proc.returncode == 0, proc.stderr
    assert "decided by the main model: it broke\\x1b]0;owned" in proc.stdout, proc.stdout
    assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in proc.stdout), ascii(proc.stdout)
    with RawPeer(json_answer(answer)) as peer:
        proc = e2vd("recognize", "--json", str(clips[0]), "--socket", peer.socket)
    assert json.loads(proc.stdout)["primary"]["model"] == f"/srv/main{evil}"


def test_lone_surrogates_in_an_answer_are_printed_escaped(clips: list[Path]) -> None:
    """JSON may carry "\\ud800" (no character): the table and --json print it escaped instead of
    failing with UnicodeEncodeError (stdout's errors are 'surrogateescape' in the C locale)."""
    body = ('{"labels": ["a\\ud800", "b\\udfff"], "scores": [0.5, 0.5], "duration_s": 1.0, "model": "m\\ud800",'
            ' "decided_by": "fallback", "primary": {"labels": ["x\\ud800", "y"], "scores": [0.6, 0.4],'
            ' "model": "p\\udc80"}, "fallback_error": "e\\ud800"}')
    for argv in (["recognize"], ["recognize", "--json"]):
        with RawPeer(http_answer(body)) as peer:
            proc = e2vd(*argv, str(clips[0]), "--socket", peer.socket, env={"LC_ALL": "C", "PYTHONIOENCODING": ""})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "\\ud800" in proc.stdout, proc.stdout


def test_a_daemon_error_message_reaches_stderr_escaped(clips: list[Path]) -> None:
    """An error answer's message (the daemon's words, e.g. a fallback or model error quoting a
    file) is one line on stderr with its control characters escaped."""
    message = "model gone\x1b]0;owned\x07\x1b[2J\nsecond line\u202e"
    answer = http_answer(json.dumps({"error": {"code": "model_unavailable", "message": message}}),
                         "503 Service Unavailable")
    with RawPeer(answer) as peer:
        proc = e2vd("recognize", str(clips[0]), "--socket", peer.socket)
    one_line(proc, ExitCode.SERVER, "model gone\\x1b]0;owned\\x07\\x1b[2J\\nsecond line\\u202e")
    assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in proc.stderr), ascii(proc.stderr)
