"""e2vd.config with real TOML files in tmp_path and explicit env dicts (never os.environ)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from e2vd.config import (DEFAULT_CONFIG_PATH, ConfigError, Settings, check_file, env_name, load_settings,
                         model_problem)


ROOT = Path(__file__).resolve().parent.parent


def toml(tmp_path: Path, text: str, name: str = "e2vd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def fails(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kw)
    return str(info.value)


def test_defaults_match_the_contract(tmp_path):
    s = load_settings(env={}, config_path=toml(tmp_path, ""))
    assert s == Settings()
    assert (s.socket, s.model, s.device, s.dtype, s.idle_timeout, s.max_seconds) == (
        "/run/e2vd/e2vd.sock", "iic/emotion2vec_plus_large", "auto", "fp32", 300.0, 30.0)
    assert (s.max_body_bytes, s.connection_timeout, s.min_free_mb, s.busy_policy) == (
        50_000_000, 30.0, 2048, "refuse")
    assert s.max_connections_per_uid == 32
    assert s.inference_timeout == 120.0
    assert DEFAULT_CONFIG_PATH == "/etc/e2vd/e2vd.toml"


def test_missing_default_file_is_fine():
    if os.path.exists(DEFAULT_CONFIG_PATH):
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    assert load_settings(env={}) == Settings()


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = toml(tmp_path, 'model = "/m/file"\ndevice = "cpu"\nidle_timeout = 60\nqueue_size = 5\n')
    env = {"E2VD_DEVICE": "cuda:1", "E2VD_IDLE_TIMEOUT": "120", "E2VD_MAX_BATCH": "2"}
    s = load_settings({"idle_timeout": 7.5, "socket": None}, env=env, config_path=path)
    assert s.model == "/m/file"           # file
    assert s.queue_size == 5              # file
    assert s.device == "cuda:1"           # env beats file
    assert s.max_batch == 2               # env
    assert s.idle_timeout == 7.5          # override beats env and file
    assert s.socket == Settings.socket    # None override = not given


def test_config_path_from_env_and_argument(tmp_path):
    a = toml(tmp_path, 'model = "/a"\n', "a.toml")
    b = toml(tmp_path, 'model = "/b"\n', "b.toml")
    assert load_settings(env={"E2VD_CONFIG": a}).model == "/a"
    assert load_settings(env={"E2VD_CONFIG": a}, config_path=b).model == "/b"


def test_missing_explicit_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert missing in fails(env={}, config_path=missing)
    msg = fails(env={"E2VD_CONFIG": missing})
    assert missing in msg and "does not exist" in msg


def test_every_key_settable_from_file_and_env(tmp_path):
    """Round trip: each non-default value written to TOML and to E2VD_<KEY> comes back."""
    changed = dict(socket="/tmp/x.sock", model="/srv/m", device="cuda:0", dtype="bf16", quantize=True,
                   min_free_mb=100, busy_policy="cpu", idle_timeout=1.5, max_hold=2.0, max_seconds=3.0,
                   max_body_bytes=4, queue_size=5, max_batch=6, connection_timeout=7.0, drain_timeout=8.0,
                   unavailable_grace=9.0, cache_dir="/c", log_level="DEBUG", max_connections_per_uid=3,
                   inference_timeout=10.5, fallback_model="/srv/fb", fallback_device="cuda:1",
                   fallback_below=0.5)
    changed.update(gpu_lock="/run/x/gpu.lock", gpu_lock_timeout=11.0, load_timeout=12.5)
    assert set(changed) == {f.name for f in dataclasses.fields(Settings)}
    lines = []
    for k, v in changed.items():
        lines.append(f"{k} = " + ("true" if v is True else f'"{v}"' if isinstance(v, str) else str(v)))
    assert load_settings(env={}, config_path=toml(tmp_path, "\n".join(lines))) == Settings(**changed)
    env = {env_name(k): ("yes" if v is True else str(v)) for k, v in changed.items()}
    assert load_settings(env=env, config_path=toml(tmp_path, "", "empty.toml")) == Settings(**changed)


def test_load_timeout_must_outlast_the_gpu_lock_wait_and_the_error_names_both_sources(tmp_path):
    path = toml(tmp_path, 'load_timeout = "1m"')
    with pytest.raises(ConfigError) as info:
        load_settings(env={"E2VD_GPU_LOCK_TIMEOUT": "90"}, config_path=path)
    message = str(info.value)
    assert f"load_timeout = 60 s ({path}: key 'load_timeout')" in message
    assert "gpu_lock_timeout = 90 s (environment variable E2VD_GPU_LOCK_TIMEOUT)" in message
    assert "Raise load_timeout or lower gpu_lock_timeout" in message
    with pytest.raises(ConfigError, match=r"gpu_lock_timeout = 60 s \(the default\)"):
        load_settings(overrides={"load_timeout": "60"}, env={}, config_path=toml(tmp_path, "", "e.toml"))
    assert load_settings(env={}, config_path=path, overrides={"gpu_lock_timeout": "59"}).load_timeout == 60.0


def test_env_forms(tmp_path):
    empty = toml(tmp_path, "")
    s = load_settings(env={"E2VD_QUANTIZE": "off", "E2VD_IDLE_TIMEOUT": "5m", "E2VD_MAX_HOLD": "9h",
                           "E2VD_LOG_LEVEL": "warning", "E2VD_MAX_BODY_BYTES": "1_000",
                           "E2VD_MODEL": "", "E2VD_SDBOX_ROOT": "/tmp/x"}, config_path=empty)
    assert (s.quantize, s.idle_timeout, s.max_hold, s.log_level, s.max_body_bytes) == (
        False, 300.0, 32400.0, "WARNING", 1000)
    assert s.model == Settings.model  # empty = unset


def test_duration_strings_in_file(tmp_path):
    s = load_settings(env={}, config_path=toml(tmp_path, 'idle_timeout = "10m"\ndrain_timeout = 1.5\n'
                                                         'inference_timeout = "2m"\n'))
    assert (s.idle_timeout, s.drain_timeout, s.inference_timeout) == (600.0, 1.5, 120.0)


def test_cli_string_overrides_are_parsed(tmp_path):
    s = load_settings({"idle_timeout": "90s", "quantize": "true", "device": "cpu"}, env={},
                      config_path=toml(tmp_path, ""))
    assert (s.idle_timeout, s.quantize, s.device) == (90.0, True, "cpu")


@pytest.mark.parametrize("text,needles", [
    ('idle_timout = 5\n', ["unknown key 'idle_timout'", "did you mean 'idle_timeout'"]),
    ('idle-timeout = 5\n', ["unknown key 'idle-timeout'", "did you mean 'idle_timeout'"]),
    ('[e2vd]\nmodel = "x"\n', ["unknown key 'e2vd'"]),
    ('model = ["a"]\n', ["key 'model' holds a list", "flat"]),
    ('idle_timeout = -1\n', ["key 'idle_timeout'", ">= 0 seconds", "-1"]),
    ('idle_timeout = "soon"\n', ["key 'idle_timeout'", "30m"]),
    ('min_free_mb = 1.5\n', ["key 'min_free_mb'", "whole number"]),
    ('min_free_mb = true\n', ["key 'min_free_mb'", "whole number"]),
    ('quantize = "yes"\n', ["key 'quantize'", "true or false"]),
    ('device = "gpu"\n', ["key 'device'", "auto, cpu, cuda or cuda:N"]),
    ('dtype = "fp8"\n', ["key 'dtype'", "fp32, fp16, bf16"]),
    ('busy_policy = "wait"\n', ["key 'busy_policy'", "refuse, cpu"]),
    ('log_level = "LOUD"\n', ["key 'log_level'", "DEBUG, INFO"]),
    ('queue_size = 0\n', ["key 'queue_size'", ">= 1"]),
    ('max_connections_per_uid = 0\n', ["key 'max_connections_per_uid'", ">= 1 connections", "got 0"]),
    ('max_connections_per_uid = 2.5\n', ["key 'max_connections_per_uid'", "whole number"]),
    ('max_seconds = 0\n', ["key 'max_seconds'", "> 0"]),
    ('inference_timeout = 0\n', ["key 'inference_timeout'", "> 0 seconds"]),
    ('inference_timeout = "forever"\n', ["key 'inference_timeout'", "30m"]),
    ('inference_timeot = 5\n', ["unknown key 'inference_timeot'", "did you mean 'inference_timeout'"]),
    ('max_seconds = nan\n', ["key 'max_seconds'", "finite"]),
    ('model = ""\n', ["key 'model'", "empty"]),
    ('model = 5\n', ["key 'model'", "string"]),
    ('model = "x\n', ["not valid TOML", "line 1"]),
])
def test_file_errors_name_file_key_and_accepted_values(tmp_path, text, needles):
    path = toml(tmp_path, text)
    msg = fails(env={}, config_path=path)
    assert path in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("env,needles", [
    ({"E2VD_IDLE_TIMOUT": "5"}, ["did you mean E2VD_IDLE_TIMEOUT?", "Unknown environment variable E2VD_IDLE_TIMOUT "]),
    ({"E2VD_FOO": "1"}, ["E2VD_FOO", "E2VD_SOCKET", "E2VD_CONFIG"]),
    ({"E2VD_QUANTIZE": "maybe"}, ["E2VD_QUANTIZE", "yes/no"]),
    ({"E2VD_QUEUE_SIZE": "ten"}, ["E2VD_QUEUE_SIZE", "whole number", "'ten'"]),
    ({"E2VD_CONNECTION_TIMEOUT": "0"}, ["E2VD_CONNECTION_TIMEOUT", "> 0"]),
    ({"E2VD_DEVICE": "cuda:x"}, ["E2VD_DEVICE", "cuda:N"]),
    ({"E2VD_MAX_SECONDS": "inf"}, ["E2VD_MAX_SECONDS", "finite"]),
    ({"E2VD_MAX_CONNECTIONS_PER_UID": "-1"}, ["E2VD_MAX_CONNECTIONS_PER_UID", ">= 1 connections"]),
])
def test_env_errors_name_the_variable(tmp_path, env, needles):
    msg = fails(env=env, config_path=toml(tmp_path, ""))
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_override_errors_name_the_option(tmp_path):
    msg = fails(overrides={"idle_timeout": -3.0}, env={}, config_path=toml(tmp_path, ""))
    assert "--idle-timeout" in msg and ">= 0" in msg
    msg = fails(overrides={"idel_timeout": 3}, env={}, config_path=toml(tmp_path, ""))
    assert "'idel_timeout'" in msg and "did you mean 'idle_timeout'" in msg
    msg = fails(overrides={"max_connections_per_uid": "none"}, env={}, config_path=toml(tmp_path, ""))
    assert "--max-connections-per-uid" in msg and "whole number" in msg


def test_directory_and_unreadable_file(tmp_path):
    assert "is a directory" in fails(env={}, config_path=str(tmp_path))


def test_hostile_config_files_are_refused_with_a_config_error(tmp_path):
    """Nesting thousands deep (tomllib recursed until RecursionError, a traceback), a FIFO (open()
    waited for a writer for ever), a device and an oversized file: each a ConfigError naming it."""
    deep = toml(tmp_path, "a = " + "[" * 50_000 + "]" * 50_000, "deep.toml")
    assert "nests arrays or tables too deeply" in fails(env={}, config_path=deep)
    tables = toml(tmp_path, "a = " + "{b=" * 5_000 + "1" + "}" * 5_000, "tables.toml")
    assert "too deeply" in fails(env={}, config_path=tables)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert "not a regular file" in fails(env={}, config_path=str(fifo))
    assert "not a regular file" in fails(env={}, config_path="/dev/zero")
    assert load_settings(env={}, config_path="/dev/null") == Settings()   # the usual "no settings"
    big = toml(tmp_path, "# padding\n" * 200_000, "big.toml")
    assert "is over 1048576 bytes" in fails(env={}, config_path=big)
    assert "is over" in fails(env={"E2VD_CONFIG": big})        # the same through $E2VD_CONFIG


def test_unreadable_file_names_uid_and_fix():
    """Real permission denial: as root, read it as uid 65534 (nobody) in a child process."""
    folder = Path(tempfile.mkdtemp(prefix="e2vd-cfg-"))
    try:
        folder.chmod(0o755)
        path = folder / "e2vd.toml"
        path.write_text('model = "x"\n')
        path.chmod(0)
        if os.geteuid() != 0:
            msg = fails(env={}, config_path=str(path))
        else:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv(1) to drop privileges")
            code = ("from e2vd.config import load_settings, ConfigError\n"
                    "try:\n    load_settings(env={}, config_path=%r)\n"
                    "except ConfigError as e:\n    print(e)\n" % str(path))
            proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            msg = proc.stdout
        assert str(path) in msg and "permission denied" in msg and "chmod 644" in msg
    finally:
        shutil.rmtree(folder)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_reference_keys_exist():
    """The README's settings table and docs/design.md name these keys; they must stay."""
    names = {f.name for f in dataclasses.fields(Settings)}
    assert {"model", "device", "dtype", "idle_timeout", "max_hold", "max_seconds", "max_body_bytes",
            "queue_size", "connection_timeout", "socket"} <= names


def model_dir(tmp_path: Path, *files: str) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for name in files:
        (d / name).write_text("x")
    return d


def test_model_problem_names_what_is_missing(tmp_path):
    assert model_problem("iic/emotion2vec_plus_large") is None          # an id: downloaded, not checked here
    assert "does not exist" in model_problem(str(tmp_path / "none"))
    assert "neither" in model_problem("emotion2vec")
    d = model_dir(tmp_path, "model.pt")
    problem = model_problem(str(d))
    assert "lacks config.yaml, tokens.txt" in problem
    for name in ("config.yaml", "tokens.txt"):
        (d / name).write_text("x")
    assert model_problem(str(d)) is None


def test_check_file_reads_the_file_alone_and_checks_the_model(tmp_path, monkeypatch):
    """What `e2vd check-config` and `e2vd install` check: the file as the service will read it
    (this shell's E2VD_* variables are not the service's), and the model it names."""
    monkeypatch.setenv("E2VD_IDLE_TIMEOUT", "not even a duration")
    d = model_dir(tmp_path, "config.yaml", "model.pt", "tokens.txt")
    settings, present = check_file(toml(tmp_path, f'model = "{d}"\nidle_timeout = "5m"\n'))
    assert present and settings.model == str(d) and settings.idle_timeout == 300.0
    msg = str(pytest.raises(ConfigError, check_file, toml(tmp_path, f'model = "{d}/gone"\n', "b.toml")).value)
    assert "b.toml: key 'model'" in msg and "does not exist" in msg and "ModelScope id" in msg
    msg = str(pytest.raises(ConfigError, check_file, toml(tmp_path, "idle_timeot = 3\n", "c.toml")).value)
    assert "c.toml: unknown key 'idle_timeot'" in msg and "did you mean 'idle_timeout'" in msg
    absent = str(tmp_path / "absent.toml")
    assert check_file(absent, required=False) == (Settings(), False)
    assert "does not exist" in str(pytest.raises(ConfigError, check_file, absent).value)


@pytest.mark.parametrize("model, says", [
    ("./models/large", "absolute"),           # the daemon runs from / under systemd
    ("~/models/large", "absolute"),
    ("large", "ModelScope id 'owner/name'"),   # neither a path nor an id
    ("iic/emotion2vec\u0661", "ModelScope id"),
    ("/srv/models/\x1b[31mlarge", "control characters"),
])
def test_model_is_an_absolute_directory_or_an_id(tmp_path, model, says):
    message = fails(env={"E2VD_MODEL": model}, config_path=toml(tmp_path, ""))
    assert "E2VD_MODEL" in message and says in message, message
    assert load_settings(env={"E2VD_MODEL": "/srv/models/large"}, config_path=toml(tmp_path, "")).model == "/srv/models/large"
    assert load_settings(env={"E2VD_MODEL": "iic/emotion2vec_plus_large"},
                         config_path=toml(tmp_path, "")).model == "iic/emotion2vec_plus_large"
