"""Instances (issue 11): names, paths, the unit templates, choosing an instance from the CLI, the
Client and the environment, its journal field, installing offline into a scratch root; and for
real in a throw-away systemd (tests/sdbox.py): two instances with different stand-ins activate
independently, a request to one never starts the other, each exits on its own idle timeout, both
are listed by `e2vd status` while asleep, and uninstalling one leaves the other working."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import sdbox
from conftest import CACHE, ROOT, standin_dir, unit_starts, wait_for, wav_clip
from e2vd import config, install, instances, log
from e2vd.client import Client
from e2vd.instances import Instance, InstanceNameError, check_name, socket_for
from e2vd.vocabulary import ExitCode

PY = str(Path(sys.executable))
ENV = {"PYTHONPATH": str(ROOT)}
E2VD = [PY, "-m", "e2vd"]
TEMPLATES = ROOT / "systemd"


# ------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["small", "a", "0", "large-2", "fall_back", "x" * 24, "gpu0"])
def test_good_names_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name, problem", [
    ("", "is empty"),
    ("../etc", "path separator or '..'"),
    ("a/b", "path separator or '..'"),
    ("..", "path separator or '..'"),
    ("a\\x2db", "path separator or '..'"),        # a backslash: what systemd-escape writes
    ("a.b", "holds '.'"),
    ("Small", "holds 'S'"),
    ("a b", "holds ' '"),
    ("a@b", "holds '@'"),
    ("a:b", "holds ':'"),
    ("smäll", "holds '\\xe4'"),
    ("a\nb", "holds '\\n'"),
    ("-a", "starts with '_' or '-'"),
    ("_a", "starts with '_' or '-'"),
    ("x" * 25, "25 characters long, more than 24"),
    ("e2vd", "reserved: it is the default instance's own name"),
    ("web", "reserved"),
    ("daemon", "reserved"),
    ("warmup", "reserved"),
    ("lock", "reserved: /run/e2vd/lock is the GPU lock's directory"),
    ("ѕmall", "holds '\\u0455'"),                 # Cyrillic dze, looks like an s
    ("small\u200b", "holds '\\u200b'"),           # a zero-width space
    ("ｓｍａｌｌ", "holds '\\uff41'"),              # full-width letters
    ("１", "holds '\\uff11'"),                      # a full-width digit
    (" small", "holds ' '"),
    ("small\t", "holds '\\t'"),
    ("-", "starts with '_' or '-'"),
    ("x" * 10_000, "10000 characters long"),
])
def test_bad_names_are_refused_with_the_reason_and_the_rule(name: str, problem: str) -> None:
    with pytest.raises(InstanceNameError) as info:
        check_name(name)
    message = str(info.value)
    assert message.startswith("--instance") and problem in message, message
    assert info.value.exit_code == ExitCode.USAGE and isinstance(info.value, ValueError)
    if "reserved" not in problem:
        assert "lower-case letters, digits, '_' and '-'" in message


@pytest.mark.parametrize("name", ["x" * 1_000_000, "\u202e" * 100_000, "a/" * 100_000, "Ä" * 100_000])
def test_a_huge_name_is_quoted_short(name: str) -> None:
    """A name of a million characters (a command line or an environment is hostile) gives a
    message of a line, not a megabyte."""
    with pytest.raises(InstanceNameError) as info:
        check_name(name, "$E2VD_INSTANCE")
    assert len(str(info.value)) < 400 and "characters" in str(info.value), str(info.value)[:600]


def test_every_accepted_name_is_a_literal_systemd_instance_and_user_name() -> None:
    """What check_name lets through needs no escaping in a unit name (%i is the name itself) and
    gives a dynamic user e2vd-NAME within systemd's 31 characters."""
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed")
    for name in ("small", "x" * 24, "a_b", "g0"):
        check_name(name)
        out = subprocess.run(["systemd-escape", "--template=e2vd@.service", name], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == f"e2vd@{name}.service"
        assert len(f"e2vd-{name}") <= 31


# ------------------------------------------------------------------------------ paths
def test_paths_of_an_instance_and_of_the_default() -> None:
    small = Instance("small")
    assert (small.socket_unit, small.service_unit) == ("e2vd@small.socket", "e2vd@small.service")
    assert (str(small.config), str(small.socket)) == ("/etc/e2vd/small.toml", "/run/e2vd/small.sock")
    assert str(small.cache_dir) == "/var/cache/e2vd-small"
    assert small.data_dirs() == ("var/cache/e2vd-small", "var/cache/private/e2vd-small",
                                 "var/lib/e2vd-small", "var/lib/private/e2vd-small")
    default = instances.instance(None)
    assert default.default and (default.socket_unit, default.service_unit) == ("e2vd.socket", "e2vd.service")
    assert str(default.config) == config.DEFAULT_CONFIG_PATH and str(default.socket) == config.Settings.socket
    assert default.data_dirs() == install.DATA_DIRS


def test_of_socket_names_the_instance_of_a_socket_path() -> None:
    assert instances.of_socket("/run/e2vd/small.sock") == Instance("small")
    for path in ("/run/e2vd/e2vd.sock", "/tmp/small.sock", "/run/e2vd/Bad.sock", "/run/e2vd/web.sock",
                 "/run/e2vd/x/small.sock", "/run/e2vd/small.socket"):
        assert instances.of_socket(path).default, path


def test_socket_for_order_socket_instance_env_socket_env_instance_default() -> None:
    env = {"E2VD_SOCKET": "/srv/s.sock", "E2VD_INSTANCE": "big"}
    assert socket_for("/x.sock", None, env) == "/x.sock"
    assert socket_for(Path("/x.sock"), None, env) == "/x.sock"
    assert socket_for(None, "small", env) == "/run/e2vd/small.sock"
    assert socket_for(None, None, env) == "/srv/s.sock"
    assert socket_for(None, None, {"E2VD_INSTANCE": "big"}) == "/run/e2vd/big.sock"
    assert socket_for(None, None, {"E2VD_INSTANCE": " ", "E2VD_SOCKET": ""}) == "/run/e2vd/e2vd.sock"
    assert socket_for(None, None, {}) == "/run/e2vd/e2vd.sock"
    with pytest.raises(InstanceNameError, match="not both"):
        socket_for("/x.sock", "small", {})
    with pytest.raises(InstanceNameError, match=r"^\$E2VD_INSTANCE '\.\./\.\./tmp/evil' holds a path separator"):
        socket_for(None, None, {"E2VD_INSTANCE": "../../tmp/evil"})
    with pytest.raises(InstanceNameError, match=r"^--instance 'e2vd' is reserved"):
        socket_for(None, "e2vd", {})


def test_installed_names_from_configs_enabled_sockets_and_systemd(tmp_path: Path) -> None:
    conf = tmp_path / "etc/e2vd"
    conf.mkdir(parents=True)
    for f in ("e2vd.toml", "small.toml", "Bad.toml", "web.toml", "notes.txt", "a.b.toml"):
        (conf / f).write_text("")
    wants = tmp_path / "etc/systemd/system/sockets.target.wants"
    wants.mkdir(parents=True)
    for f in ("e2vd.socket", "e2vd@big.socket", "e2vd@UP.socket", "e2vd-web.socket"):
        (wants / f).symlink_to("/dev/null")
    listed = ("e2vd@gpu.socket  loaded active listening e2vd socket, instance gpu\n"
              "e2vd@gpu.service loaded inactive dead e2vd daemon, instance gpu\n"
              "e2vd@x.y.service loaded inactive dead junk\n")
    assert instances.installed_names(tmp_path) == ["big", "small"]
    assert instances.installed_names(tmp_path, listed) == ["big", "gpu", "small"]
    assert instances.installed_names(tmp_path, configs=False) == ["big"]
    assert instances.installed_names(tmp_path / "nothing") == []


def test_list_instances_reads_systemd_and_never_connects(tmp_path: Path) -> None:
    """list_instances with systemctl answering as it does (recorded output), in a scratch root
    where instance small's socket path is a listening socket nobody accepts on: it is never
    connected to (the backlog stays empty)."""
    import socket as s

    (tmp_path / "etc/e2vd").mkdir(parents=True)
    (tmp_path / "etc/e2vd/small.toml").write_text('model = "/srv/m"\n')
    (tmp_path / "run/e2vd").mkdir(parents=True)
    listener = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    listener.bind(str(tmp_path / "run/e2vd/small.sock"))
    listener.listen(4)
    calls: list[list[str]] = []

    def systemctl(argv, **_kw):
        calls.append(argv)
        if argv[1] == "list-units":
            return subprocess.CompletedProcess(argv, 0, "", "")
        shown = {"e2vd.service": ("inactive", "dead", "0"), "e2vd.socket": ("active", "listening", "0"),
                 "e2vd@small.service": ("active", "running", "4242"),
                 "e2vd@small.socket": ("active", "running", "0")}
        out = "\n\n".join(f"Id={u}\nLoadState=loaded\nActiveState={a}\nSubState={b}\nMainPID={p}"
                          for u, (a, b, p) in shown.items())
        return subprocess.CompletedProcess(argv, 0, out + "\n", "")

    try:
        got = instances.list_instances(run=systemctl, root=tmp_path)
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert [i.name for i in got] == ["e2vd", "small"]
    default, small = got
    assert not default.running and default.socket_state == "active (listening)" and not default.config_present
    assert "asleep, the next request starts it" in default.line()
    assert small.running and small.main_pid == 4242 and small.socket_file and small.config_present
    assert small.line() == ("instance small: e2vd@small.service active (running), PID 4242; "
                            "e2vd@small.socket active (running) on /run/e2vd/small.sock")
    stopped = dataclasses.replace(small, socket_state="inactive (dead)", running=False, main_pid=None)
    assert stopped.line().endswith("; nothing listens, requests fail: `sudo systemctl enable --now e2vd@small.socket`")
    assert small.to_dict()["units"] == {"e2vd@small.socket": "active (running)",
                                        "e2vd@small.service": "active (running)"}
    assert all(argv[0] == "systemctl" and argv[1] in ("list-units", "show") for argv in calls)

    def no_systemctl(argv, **_kw):
        raise FileNotFoundError("systemctl")

    [alone] = instances.list_instances(run=no_systemctl, root=tmp_path / "empty")
    assert (alone.name, alone.service_state, alone.running) == ("e2vd", "unknown", False)


def _systemctl_printing(show: bytes, listed: bytes = b""):
    """A `run` for list_instances that runs a real process (printf) printing `listed` for
    `systemctl list-units` and `show` for `systemctl show`, with list_instances' own options."""
    def run(argv, **kw):
        out = listed if argv[1] == "list-units" else show
        return subprocess.run(["printf", "%s", out], **kw)
    return run


def test_list_instances_survives_odd_systemctl_output_and_escapes_it(tmp_path: Path) -> None:
    """systemctl output that is not UTF-8, with control characters in a state, a MainPID of
    non-ASCII digits or of 5000 digits, and odd unit names in list-units: no exception, nothing
    raw on the terminal, odd names never listed."""
    show = (b"Id=e2vd.service\nLoadState=loaded\nActiveState=active\x1b[2J\nSubState=run\xffning\n"
            b"MainPID=\xc2\xb2\n\n"
            b"Id=e2vd.socket\nLoadState=loaded\nActiveState=act\x07ive\nSubState=listening\nMainPID=0\n\n"
            b"Id=e2vd@gpu.service\nLoadState=loaded\nActiveState=active\nSubState=running\nMainPID="
            + b"9" * 5000 + b"\n\n"
            b"Id=e2vd@gpu.socket\nLoadState=loaded\nActiveState=active\nSubState=running\nMainPID=0\n")
    listed = (b"e2vd@gpu.socket loaded active running x\n"
              b"e2vd@\x1b[31mred.service loaded active running x\n"
              b"e2vd@lock.service loaded active running x\n"
              b"e2vd@\xff.service loaded active running x\n")
    got = instances.list_instances(run=_systemctl_printing(show, listed), root=tmp_path)
    assert [i.name for i in got] == ["e2vd", "gpu"]
    default, gpu = got
    assert default.main_pid is None and gpu.main_pid is None
    assert not default.running and gpu.running
    for line in (default.line(), gpu.line()):
        assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in line), ascii(line)
    assert "active\\x1b[2J" in default.line() and "act\\x07ive" in default.line()


# ------------------------------------------------------------------------------ units
def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_service_template_is_e2vd_service_with_only_the_instance_lines_changed() -> None:
    """e2vd@.service keeps every setting of e2vd.service (its sandbox above all); only the
    lines that name the instance's socket, files and user differ."""
    plain, tpl = _lines(TEMPLATES / "e2vd.service"), _lines(TEMPLATES / "e2vd@.service")
    removed = [line for line in plain if line not in tpl]
    added = [line for line in tpl if line not in plain]
    assert removed == ["Description=e2vd speech emotion recognition daemon (Emotion2Vec+)",
                       "Requires=e2vd.socket", "After=e2vd.socket",
                       "Environment=HOME=%S/e2vd XDG_CACHE_HOME=%C/e2vd CUDA_CACHE_PATH=%C/e2vd/cuda",
                       "User=e2vd-daemon", "StateDirectory=e2vd", "CacheDirectory=e2vd",
                       "ReadOnlyPaths=-%C/private/e2vd/models"]
    assert added == ["Description=e2vd speech emotion recognition daemon (Emotion2Vec+), instance %i",
                     "Requires=e2vd@%i.socket", "After=e2vd@%i.socket",
                     "Environment=HOME=%S/e2vd-%i XDG_CACHE_HOME=%C/e2vd-%i CUDA_CACHE_PATH=%C/e2vd-%i/cuda",
                     "Environment=E2VD_INSTANCE=%i E2VD_CONFIG=/etc/e2vd/%i.toml",
                     "User=e2vd-%i", "StateDirectory=e2vd-%i", "CacheDirectory=e2vd-%i",
                     "ReadOnlyPaths=-%C/private/e2vd-%i/models"]
    assert [line for line in plain if line in tpl] == [line for line in tpl if line in plain], "same order"


def test_socket_template_is_e2vd_socket_on_the_instance_path() -> None:
    plain, tpl = _lines(TEMPLATES / "e2vd.socket"), _lines(TEMPLATES / "e2vd@.socket")
    assert [line for line in plain if line not in tpl] == [
        "Description=e2vd speech emotion recognition socket", "ListenStream=/run/e2vd/e2vd.sock"]
    assert [line for line in tpl if line not in plain] == [
        "Description=e2vd speech emotion recognition socket, instance %i", "ListenStream=/run/e2vd/%i.sock"]


def test_templates_are_in_the_wheel_data_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert {f"systemd/{u}" for u in install.INSTANCE_UNITS} <= set(data["share/e2vd/systemd"])


@pytest.fixture(scope="module")
def rendered_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The instance templates as `e2vd install --instance` writes them, plus an instance's copies
    (e2vd@small.*) for systemd-analyze, which checks instances, not templates."""
    d = tmp_path_factory.mktemp("instance-units")
    units = install.render_units(install.Layout.detect(), install.Options(instance="small", group="speech"))
    assert sorted(units) == sorted(install.INSTANCE_UNITS)
    for name, text in units.items():
        (d / name).write_text(text)
        (d / name.replace("@.", "@small.")).write_text(text)
    return d


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_rendered_instance_units_verify_silently_and_keep_the_sandbox(rendered_instance: Path) -> None:
    assert "SocketGroup=speech" in (rendered_instance / "e2vd@.socket").read_text()
    cp = subprocess.run(["systemd-analyze", "verify", str(rendered_instance / "e2vd@small.service"),
                         str(rendered_instance / "e2vd@small.socket")], capture_output=True, text=True)
    assert (cp.returncode, (cp.stdout + cp.stderr).strip()) == (0, "")
    levels = {}
    for unit in ("e2vd@small.service",):
        sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(rendered_instance / unit)],
                             capture_output=True, text=True)
        levels[unit] = float(sec.stdout.rsplit(f"Overall exposure level for {unit}:", 1)[1].split()[0])
    plain = install.render_units(install.Layout.detect(), install.Options())["e2vd.service"]
    (rendered_instance / "e2vd.service").write_text(plain)
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(rendered_instance / "e2vd.service")],
                         capture_output=True, text=True)
    default = float(sec.stdout.rsplit("Overall exposure level for e2vd.service:", 1)[1].split()[0])
    print(f"\nexposure: e2vd.service {default}, e2vd@small.service {levels['e2vd@small.service']}")
    assert levels["e2vd@small.service"] == default


def test_instance_warmup_units_are_the_default_ones_for_the_instance(tmp_path: Path) -> None:
    """--warmup-calendar with --instance: e2vd-warmup@NAME.service/.timer, rendered from the
    default's warmup units, wake that instance only, on its own calendar and end of day."""
    opts = install.Options(instance="small", instance_warmup=True, warmup_calendar="Mon..Sat 07:00",
                           warmup_until="17:30", group="speech")
    units = install.render_units(install.Layout.detect(), opts)
    assert sorted(units) == ["e2vd-warmup@small.service", "e2vd-warmup@small.timer", "e2vd@.service", "e2vd@.socket"]
    svc, timer = units["e2vd-warmup@small.service"], units["e2vd-warmup@small.timer"]
    assert "\nRequires=e2vd@small.socket\nAfter=e2vd@small.socket\n" in svc and "SupplementaryGroups=speech\n" in svc
    assert " warmup --instance small --until 17:30\n" in svc
    assert "\nOnCalendar=Mon..Sat 07:00\n" in timer and "\nUnit=e2vd-warmup@small.service\n" in timer
    default = install.render_units(install.Layout.detect(), install.Options(
        group="speech", warmup_calendar="Mon..Sat 07:00", warmup_until="17:30"))
    changed = (set(_lines_of(svc)) ^ set(_lines_of(default["e2vd-warmup.service"]))) | \
              (set(_lines_of(timer)) ^ set(_lines_of(default["e2vd-warmup.timer"])))
    assert {line.split("=", 1)[0] for line in changed} == {"Description", "Requires", "After", "ExecStart", "Unit"}
    assert sorted(install.render_units(install.Layout.detect(), install.Options(instance="small"))) == \
        ["e2vd@.service", "e2vd@.socket"], "no warmup unless asked for"
    if shutil.which("systemd-analyze"):
        for name, text in units.items():
            (tmp_path / name.replace("@.", "@small.")).write_text(text)
        cp = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(tmp_path.iterdir()))],
                            capture_output=True, text=True)
        assert (cp.returncode, (cp.stdout + cp.stderr).strip()) == (0, "")


def _lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# ------------------------------------------------------------------------------ settings and journal
def test_config_knows_e2vd_instance_and_checks_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for value in ("small", "", " "):
        assert config.load_settings(env={"E2VD_INSTANCE": value}, config_path=str(empty)) == config.Settings()
    with pytest.raises(config.ConfigError) as info:
        config.load_settings(env={"E2VD_INSTANCE": "../x"})
    assert "environment variable E2VD_INSTANCE '../x' holds a path separator" in str(info.value)
    with pytest.raises(config.ConfigError, match="Unknown environment variable E2VD_INSTANCES"):
        config.load_settings(env={"E2VD_INSTANCES": "small"})


def test_every_journal_entry_of_an_instance_carries_its_name() -> None:
    """Events and plain lines alike get E2VD_INSTANCE through the real handler (an observing
    sender in place of journal.send); the default instance's entries have none."""
    sent: list[tuple[str, dict]] = []
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = (logger.level, logger.propagate)
    small = log.JournaldHandler(sender=lambda message, **fields: sent.append((message, fields)), instance="small")
    default = log.JournaldHandler(sender=lambda message, **fields: sent.append((message, fields)), instance="")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.addHandler(small)
        logger.info("plain line")
        log.event("idle_exit", "idle", alive_seconds=1.5)
        logger.removeHandler(small)
        logger.addHandler(default)
        log.event("idle_exit", "idle, the default instance", alive_seconds=2.5)
    finally:
        logger.removeHandler(small)
        logger.removeHandler(default)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    assert [f.get("E2VD_INSTANCE") for _, f in sent] == ["small", "small", None]
    assert sent[1][1]["E2VD_EVENT"] == "idle_exit" and sent[1][1]["E2VD_ALIVE_SECONDS"] == "1.5"


def test_journald_handler_reads_the_instance_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("E2VD_INSTANCE", "big")
    assert log.JournaldHandler(sender=lambda *a, **k: None).instance == "big"
    monkeypatch.setenv("E2VD_INSTANCE", "")
    assert log.JournaldHandler(sender=lambda *a, **k: None).instance is None


# ------------------------------------------------------------------------------ Client and CLI
def test_client_picks_the_instance_socket(monkeypatch) -> None:
    monkeypatch.delenv("E2VD_SOCKET", raising=False)
    monkeypatch.delenv("E2VD_INSTANCE", raising=False)
    assert Client(instance="small").socket == "/run/e2vd/small.sock"
    assert Client().socket == "/run/e2vd/e2vd.sock"
    monkeypatch.setenv("E2VD_INSTANCE", "big")
    assert Client().socket == "/run/e2vd/big.sock"
    assert Client("/x.sock").socket == "/x.sock"
    with pytest.raises(InstanceNameError, match="not both"):
        Client("/x.sock", instance="small")
    with pytest.raises(ValueError, match="holds 'A'"):
        Client(instance="A")


def _e2vd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("E2VD_") or k.startswith("E2VD_SDBOX_")}
    return subprocess.run(E2VD + list(argv), capture_output=True, text=True, cwd=ROOT,
                          env={**base, **ENV, **(env or {})}, timeout=120)


def test_cli_sends_to_the_instance_socket_and_names_its_units(tmp_path: Path) -> None:
    """`--instance NAME` and $E2VD_INSTANCE reach /run/e2vd/NAME.sock (here: no such socket, so
    the answer is the unreachable message naming that path and e2vd@NAME.socket)."""
    clip = tmp_path / "a.wav"
    clip.write_bytes(wav_clip(0.5))
    name = f"t{os.getpid()}"
    for argv, env in ((["recognize", "--instance", name, str(clip)], None),
                      (["recognize", str(clip)], {"E2VD_INSTANCE": name}),
                      (["warmup", "--instance", name, "--timeout", "5"], None)):
        cp = _e2vd(*argv, env=env)
        assert cp.returncode == ExitCode.UNREACHABLE, cp.stderr
        assert f"no daemon socket at /run/e2vd/{name}.sock: e2vd@{name}.socket is not listening" in cp.stderr
        assert f"sudo e2vd install --instance {name} --model MODEL" in cp.stderr


@pytest.mark.parametrize("argv, said", [
    (["recognize", "--instance", "../x", "f.wav"], "argument --instance: '../x' holds a path separator"),
    (["recognize", "--instance", "e2vd", "f.wav"], "'e2vd' is reserved"),
    (["recognize", "--instance", "a", "--socket", "/x.sock", "f.wav"], "not allowed with argument"),
    (["status", "--instance", "a", "--socket", "/x.sock"], "not allowed with argument"),
    (["warmup", "--instance", "Big"], "'Big' holds 'B'"),
    (["check-config", "--instance", "a", "--config", "/x.toml"], "not allowed with argument"),
    (["install", "--instance", "a/b"], "holds a path separator"),
    (["uninstall", "--instance", ".."], "holds a path separator"),
])
def test_cli_refuses_a_bad_instance_before_doing_anything(argv: list[str], said: str) -> None:
    cp = _e2vd(*argv)
    assert cp.returncode == ExitCode.USAGE and said in cp.stderr, cp.stderr
    assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr


def test_cli_refuses_a_bad_e2vd_instance_from_the_environment(tmp_path: Path) -> None:
    clip = tmp_path / "a.wav"
    clip.write_bytes(wav_clip(0.5))
    cp = _e2vd("recognize", str(clip), env={"E2VD_INSTANCE": "../../tmp/x"})
    assert cp.returncode == ExitCode.USAGE
    assert "$E2VD_INSTANCE '../../tmp/x' holds a path separator" in cp.stderr and "Traceback" not in cp.stderr


def test_status_escapes_what_systemctl_says(tmp_path: Path) -> None:
    """`e2vd status` with a systemctl that answers odd states (control characters, bytes that
    are not UTF-8, a MainPID in other digits): exit without a traceback, nothing raw on stdout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = list-units ]; then printf 'e2vd@gpu.socket loaded active running x\\n'; exit 0; fi\n"
                    "for u in \"$@\"; do case \"$u\" in *.service|*.socket)\n"
                    "printf 'Id=%s\\nLoadState=loaded\\nActiveState=active\\033[2J\\nSubState=run\\377\\nMainPID=\\302\\262\\n"
                    "StatusText=\\033]0;owned\\007\\nResult=success\\n\\n' \"$u\";; esac; done\n")
    fake.chmod(0o755)
    cp = _e2vd("status", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert "Traceback" not in cp.stderr, cp.stderr
    assert "instance gpu: e2vd@gpu.service active\\x1b[2J" in cp.stdout, cp.stdout
    assert "\\x1b]0;owned\\x07" in cp.stdout, cp.stdout
    assert not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) <= 0x9f for c in cp.stdout), ascii(cp.stdout)


def test_check_config_with_instance_reads_its_file(tmp_path: Path) -> None:
    cp = _e2vd("check-config", "--instance", f"t{os.getpid()}")
    assert cp.returncode == ExitCode.USAGE
    assert f"Config file /etc/e2vd/t{os.getpid()}.toml does not exist" in cp.stderr


def test_check_config_follows_e2vd_instance_like_the_other_commands() -> None:
    """$E2VD_INSTANCE picks the instance for recognize, warmup and status: check-config too
    (it checked the default's file and called $E2VD_INSTANCE "not applied"); blank is unset."""
    name = f"t{os.getpid()}"
    cp = _e2vd("check-config", env={"E2VD_INSTANCE": name})
    assert cp.returncode == ExitCode.USAGE, cp.stderr
    assert f"Config file /etc/e2vd/{name}.toml does not exist" in cp.stderr
    cp = _e2vd("check-config", env={"E2VD_INSTANCE": "../x"})
    assert cp.returncode == ExitCode.USAGE and "$E2VD_INSTANCE '../x' holds a path separator" in cp.stderr
    cp = _e2vd("check-config", "--config", "/dev/null", env={"E2VD_INSTANCE": name})
    assert cp.returncode == 0 and "/dev/null: usable" in cp.stdout, cp.stderr
    cp = _e2vd("check-config", "--config", "/dev/null", env={"E2VD_INSTANCE": " "})
    assert cp.returncode == 0 and "E2VD_INSTANCE" not in cp.stdout, cp.stdout


# ------------------------------------------------------------------------------ install, offline
def _install(root: Path, **opts) -> list[str]:
    lines: list[str] = []
    install.install(install.Options(**opts), root=root, say=lines.append)
    return lines


@pytest.mark.parametrize("model", ["/srv/models/😀", "/srv/m\x7f\x1b\"\\'x", "/srv/é\u2028"])
def test_an_instance_config_keeps_any_model_path_as_it_is(model: str) -> None:
    """The model path written into NAME.toml reads back unchanged (json.dumps wrote an emoji as
    a surrogate pair, which TOML refuses: the file was unreadable)."""
    assert tomllib.loads(install.default_config(model, "small"))["model"] == model


def test_instance_config_sets_its_model_and_its_own_cache(tmp_path: Path) -> None:
    text = install.default_config("/srv/models/small", "small")
    assert tomllib.loads(text) == {"model": "/srv/models/small", "cache_dir": "/var/cache/e2vd-small"}
    assert text.startswith("# /etc/e2vd/small.toml - settings of e2vd instance small")
    assert "systemctl restart e2vd@small.service" in text and "e2vd.service" not in text
    path = tmp_path / "small.toml"
    path.write_text(text)
    assert config.load_settings(env={}, config_path=str(path)).cache_dir == "/var/cache/e2vd-small"


def test_offline_install_of_instances_beside_the_default(tmp_path: Path, srv_model: Path) -> None:
    units = tmp_path / "etc/systemd/system"
    _install(tmp_path)
    default_files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = _install(tmp_path, instance="small", model=str(srv_model), group="e2vd")
    assert (units / "e2vd@.socket").is_file() and (units / "e2vd@.service").is_file()
    assert (units / "sockets.target.wants/e2vd@small.socket").is_symlink()
    assert tomllib.loads((tmp_path / "etc/e2vd/small.toml").read_text()) == {
        "model": str(srv_model), "cache_dir": "/var/cache/e2vd-small"}
    assert {p: p.read_bytes() for p in default_files} == default_files, "the default instance is untouched"
    assert f"wrote {tmp_path}/etc/e2vd/small.toml for instance small with model = \"{srv_model}\"" in out
    out = _install(tmp_path, instance="big", model="iic/emotion2vec_plus_large", instance_warmup=True,
                   warmup_calendar="Sat 10:00")
    assert [l for l in out if l.startswith(("wrote", "unchanged"))][:2] == [
        f"unchanged {units}/e2vd@.socket", f"unchanged {units}/e2vd@.service"]
    assert (units / "timers.target.wants/e2vd-warmup@big.timer").is_symlink()
    assert "OnCalendar=Sat 10:00\n" in (units / "e2vd-warmup@big.timer").read_text()
    assert not (units / "e2vd-warmup@small.timer").exists()
    assert instances.installed_names(tmp_path) == ["big", "small"]

    said: list[str] = []
    install.uninstall(root=tmp_path, instance="small", say=said.append)
    assert not (units / "sockets.target.wants/e2vd@small.socket").exists()
    assert (units / "e2vd@.service").is_file() and any("still used by instances big" in l for l in said)
    assert (tmp_path / "etc/e2vd/small.toml").is_file(), "kept without --purge"
    install.uninstall(root=tmp_path, instance="small", purge=True, say=said.append)
    assert not (tmp_path / "etc/e2vd/small.toml").exists()

    install.uninstall(root=tmp_path, purge=True, say=said.append)   # the default: big's config stays
    assert not (units / "e2vd.socket").exists() and not (tmp_path / "etc/e2vd/e2vd.toml").exists()
    assert (tmp_path / "etc/e2vd/big.toml").is_file() and (units / "sockets.target.wants/e2vd@big.socket").is_symlink()
    install.uninstall(root=tmp_path, instance="big", purge=True, say=said.append)
    assert not (units / "timers.target.wants/e2vd-warmup@big.timer").is_symlink()
    assert not list(units.rglob("e2vd*")) and not (tmp_path / "etc/e2vd/big.toml").exists()


@pytest.mark.parametrize("opts, said", [({"instance": "../x"}, "path separator"),
                                        ({"instance": "e2vd"}, "reserved"),
                                        ({"instance": "small", "web": "127.0.0.1:7860"}, "--web goes with the default")])
def test_install_refuses_a_bad_instance_and_writes_nothing(tmp_path: Path, opts: dict, said: str) -> None:
    with pytest.raises(install.InstallUsageError, match=said):
        _install(tmp_path, **opts)
    assert not (tmp_path / "etc").exists()
    with pytest.raises(install.InstallUsageError, match="path separator"):
        install.uninstall(root=tmp_path, instance="a/../../b", say=lambda _l: None)


@pytest.mark.parametrize("calendar", ["Mon 08:55\nExecStart=/bin/sh -c evil", "Mon 08:55\r", "Mon\x1b[2J 08:55"])
def test_install_refuses_a_warmup_calendar_with_control_characters_without_systemd_analyze(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calendar: str) -> None:
    """Where systemd-analyze is missing the calendar was written unchecked into OnCalendar=: a
    newline added any line to the timer unit. Control characters are refused first."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(install.InstallUsageError, match="control characters"):
        _install(tmp_path / "root", instance="small", warmup_calendar=calendar, instance_warmup=True)
    assert not (tmp_path / "root/etc").exists()


# ------------------------------------------------------------------------------ for real, in a box
MODELS = "/srv/e2vd-models"


def seeded_tiny(seed: int) -> Path:
    """The tiny stand-in built by e2vd.standin with another seed (other weights, other scores),
    cached like conftest.standin_dir's."""
    digest = hashlib.sha256((ROOT / "e2vd" / "standin.py").read_bytes()).hexdigest()[:12]
    out = CACHE / f"tiny-seed{seed}-{digest}"
    if not (out / "model.pt").exists():
        tmp = out.with_name(out.name + ".partial")
        subprocess.run([sys.executable, "-c", "import sys, e2vd.standin as s; s.SEED = int(sys.argv[1]); "
                        "s.build('tiny', sys.argv[2])", str(seed), str(tmp)], check=True, cwd=ROOT)
        tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def box():
    reason = sdbox.unavailable_reason()
    if reason:
        pytest.skip(f"no throw-away systemd: {reason}")
    b = sdbox.Box.start(f"instances-{os.getpid()}", binds_ro=[f"{standin_dir('tiny')}:{MODELS}/tiny",
                                                               f"{seeded_tiny(2)}:{MODELS}/tiny2"])
    try:
        yield b
    finally:
        b.stop()


def show(box: sdbox.Box, unit: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, "-p", "ActiveState,SubState,MainPID,Result,LoadState"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def events(box: sdbox.Box, *match: str) -> list[dict]:
    out = box.run(["journalctl", "--no-pager", "-o", "json", *match], check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.systemd
@pytest.mark.slow
def test_two_instances_activate_idle_and_uninstall_independently(box: sdbox.Box) -> None:
    box.run(E2VD + ["install", "--no-pull"], env=ENV)              # the default instance, never woken here
    for name, model, warm in (("a", f"{MODELS}/tiny", ["--warmup-calendar", "*-*-* 04:00", "--warmup-until",
                                                        "23:59:59"]),
                              ("b", f"{MODELS}/tiny2", [])):
        out = box.run(E2VD + ["install", "--instance", name, "--model", model, "--no-pull", *warm], env=ENV).stdout
        assert f"enabled and started e2vd@{name}.socket" in out
    assert box.run(["systemctl", "is-enabled", "e2vd-warmup@a.timer"]).stdout.strip() == "enabled"
    assert box.run(["systemctl", "is-active", "e2vd-warmup@a.timer"]).stdout.strip() == "active"
    assert box.run(["systemctl", "is-enabled", "e2vd-warmup@b.timer"], check=False).returncode != 0
    # CPU, and idle timeouts far apart: a exits long before b
    box.write("/etc/e2vd/a.toml", f'model = "{MODELS}/tiny"\ndevice = "cpu"\nidle_timeout = 2\n')
    box.write("/etc/e2vd/b.toml", f'model = "{MODELS}/tiny2"\ndevice = "cpu"\nidle_timeout = 30\n')
    for name in ("a", "b"):
        assert box.run(["stat", "-c", "%a %U %G %F", f"/run/e2vd/{name}.sock"]).stdout.strip() == "660 root e2vd socket"
    assert box.run(["systemctl", "is-active", "e2vd.socket"]).stdout.strip() == "active"

    security = box.run(["systemd-analyze", "security", "e2vd@a.service", "--no-pager"]).stdout
    exposure = float(security.rsplit("Overall exposure level for e2vd@a.service:", 1)[1].split()[0])
    print(f"\nsystemd-analyze security e2vd@a.service (live manager): exposure {exposure}")
    assert exposure <= 3.0

    # both listed while asleep, and listing woke neither
    report = json.loads(box.run(E2VD + ["status", "--json"], env=ENV).stdout)
    listed = {i["name"]: i for i in report["instances"]}
    assert sorted(listed) == ["a", "b", "e2vd"]
    for name in ("a", "b"):
        assert listed[name]["running"] is False and listed[name]["socket_file"] is True
        assert listed[name]["units"] == {f"e2vd@{name}.socket": "active (listening)",
                                         f"e2vd@{name}.service": "inactive (dead)"}
    text = box.run(E2VD + ["status"], env=ENV).stdout
    assert "instance a: e2vd@a.service inactive (dead); e2vd@a.socket active (listening) on /run/e2vd/a.sock; " \
           "asleep, the next request starts it" in text
    one = box.run(E2VD + ["status", "--instance", "b"], env=ENV).stdout
    assert "e2vd@b.service: inactive (dead)" in one and "e2vd@b.socket: active (listening)" in one
    time.sleep(0.5)
    assert [unit_starts(box, u) for u in ("e2vd@a.service", "e2vd@b.service", "e2vd.service")] == [0, 0, 0]

    # b first (long idle), then a: each answers from its own model; neither request starts the other
    box.write("/var/tmp/c.wav", wav_clip(1.0, seed=3))
    got_b = json.loads(box.run(E2VD + ["recognize", "--json", "/var/tmp/c.wav"], env={**ENV, "E2VD_INSTANCE": "b"},
                               timeout=180).stdout)
    assert show(box, "e2vd@b.service")["ActiveState"] == "active"
    assert show(box, "e2vd@a.service")["ActiveState"] == "inactive" and unit_starts(box, "e2vd@a.service") == 0
    got_a = json.loads(box.run(E2VD + ["recognize", "--json", "--instance", "a", "/var/tmp/c.wav"], env=ENV,
                               timeout=180).stdout)
    assert (got_a["model"], got_b["model"]) == (f"{MODELS}/tiny", f"{MODELS}/tiny2")
    assert got_a["scores"] != got_b["scores"], "two different stand-ins answered the same"
    assert [unit_starts(box, u) for u in ("e2vd@a.service", "e2vd@b.service", "e2vd.service")] == [1, 1, 0]

    # a exits on its own 2 s idle timeout while b (30 s) keeps serving; then b on its own
    wait_for("a's idle exit", lambda: show(box, "e2vd@a.service")["ActiveState"] == "inactive", 60)
    assert show(box, "e2vd@b.service")["ActiveState"] == "active", "b must outlive a's idle exit"
    wait_for("b's idle exit", lambda: show(box, "e2vd@b.service")["ActiveState"] == "inactive", 90)
    for name, idle in (("a", "2.0"), ("b", "30.0")):
        st = show(box, f"e2vd@{name}.service")
        assert (st["Result"], st["MainPID"]) == ("success", "0")
        [exit_event] = events(box, f"E2VD_INSTANCE={name}", "E2VD_EVENT=idle_exit")
        assert exit_event["E2VD_IDLE_TIMEOUT_SECONDS"] == idle and exit_event["_SYSTEMD_UNIT"] == f"e2vd@{name}.service"
        every = events(box, f"_SYSTEMD_UNIT=e2vd@{name}.service", "SYSLOG_IDENTIFIER=e2vd")
        assert every and all(e.get("E2VD_INSTANCE") == name for e in every), "every entry names its instance"
        assert {"start", "model_loaded", "request", "idle_exit"} <= {e.get("E2VD_EVENT") for e in every}
        assert "gpu_lock_unavailable" not in {e.get("E2VD_EVENT") for e in every}, "the instance shares the GPU lock"
    assert unit_starts(box, "e2vd.service") == 0, "the default instance was never started"

    # a's warmup (its timer's service, started now) wakes a and holds it; b is not touched
    cp = box.run(["systemctl", "start", "e2vd-warmup@a.service"], timeout=180, check=False)
    assert cp.returncode == 0, box.run(["journalctl", "--no-pager", "-o", "cat", "-u", "e2vd-warmup@a.service",
                                        "-u", "e2vd@a.service"], check=False).stdout[-3000:]
    assert show(box, "e2vd@a.service")["ActiveState"] == "active"
    assert [unit_starts(box, u) for u in ("e2vd@a.service", "e2vd@b.service", "e2vd.service")] == [2, 1, 0]
    [hold] = events(box, "E2VD_INSTANCE=a", "E2VD_EVENT=keep_warm")
    assert float(hold["E2VD_HOLD_SECONDS"]) > 0

    # uninstalling a (warm, held) leaves b (and the default) working
    out = box.run(E2VD + ["uninstall", "--instance", "a", "--purge"], env=ENV).stdout
    assert "still used by instances b" in out
    assert show(box, "e2vd@a.service")["ActiveState"] == "inactive"
    assert not box.root.joinpath("etc/systemd/system/e2vd-warmup@a.timer").exists()
    assert not box.root.joinpath("run/e2vd/a.sock").exists() and not box.root.joinpath("etc/e2vd/a.toml").exists()
    assert show(box, "e2vd@a.socket")["ActiveState"] == "inactive"
    assert box.run(["systemctl", "is-enabled", "e2vd@a.socket"], check=False).returncode != 0
    report = json.loads(box.run(E2VD + ["status", "--json"], env=ENV).stdout)
    assert [i["name"] for i in report["instances"]] == ["e2vd", "b"]
    again = json.loads(box.run(E2VD + ["recognize", "--json", "--instance", "b", "/var/tmp/c.wav"], env=ENV,
                               timeout=180).stdout)
    assert again["scores"] == got_b["scores"]
    assert box.run(["systemctl", "is-active", "e2vd.socket"]).stdout.strip() == "active"
    cp = box.run(E2VD + ["recognize", "--instance", "a", "/var/tmp/c.wav"], env=ENV, check=False)
    assert cp.returncode == ExitCode.UNREACHABLE and "e2vd@a.socket" in cp.stderr

    box.run(["systemctl", "stop", "e2vd@b.service"])
    out = box.run(E2VD + ["uninstall", "--instance", "b", "--purge"], env=ENV).stdout
    assert "removed /etc/systemd/system/e2vd@.service" in out
    assert box.run(["systemctl", "is-active", "e2vd.socket"]).stdout.strip() == "active"


def test_status_listing_as_a_user_who_may_not_look_into_the_directories(tmp_path: Path) -> None:
    """list_instances run by an unprivileged user where /etc/e2vd, the unit wants directory and
    /run/e2vd are closed to it: a listing (it crashed with PermissionError), never "no config"
    for a file it cannot see."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="e2vd-status-"))
    try:
        top.chmod(0o755)
        for d in ("etc/e2vd", "etc/systemd/system/sockets.target.wants", "run/e2vd"):
            (top / d).mkdir(parents=True)
        (top / "etc/e2vd/small.toml").write_text("")
        (top / "etc/systemd/system/sockets.target.wants/e2vd@big.socket").symlink_to("/dev/null")
        for d in ("etc/e2vd", "etc/systemd/system/sockets.target.wants", "run/e2vd"):
            (top / d).chmod(0o700)
        code = ("import os, sys, pathlib\nfrom e2vd import instances, unit_record, log\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "def run(argv, **kw):\n    raise FileNotFoundError('systemctl')\n"
                "for s in instances.list_instances(run=run, root=pathlib.Path(sys.argv[1])):\n    print(s.line())\n")
        cp = subprocess.run([PY, "-c", code, str(top)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        shutil.rmtree(top)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("default instance e2vd: e2vd.service unknown"), cp.stdout
    assert "no /etc/e2vd/e2vd.toml" not in cp.stdout, cp.stdout
