"""Daemon settings: defaults < config file < E2VD_* environment < overrides (command-line flags).

The config file is TOML with flat keys (the field names of `Settings`), read from, in order of
preference: the `config_path` argument (`e2vd serve --config`), `$E2VD_CONFIG`, or
`/etc/e2vd/e2vd.toml`. A missing default file is fine (defaults apply); a missing file that was
named explicitly is an error. Example:

    model = "/srv/models/emotion2vec_plus_large"
    device = "cuda:1"
    idle_timeout = "10m"      # or 600
    busy_policy = "cpu"

Every key can also be set as `E2VD_<KEY>` in the environment (E2VD_IDLE_TIMEOUT=600,
E2VD_QUANTIZE=yes); an empty value counts as unset. Overrides are a mapping from key to value,
where None means "not given" (argparse's default) and strings are parsed like environment values.

Value forms: durations (idle_timeout, max_hold, connection_timeout, drain_timeout,
unavailable_grace, inference_timeout, load_timeout, gpu_lock_timeout) are seconds as a number, or a string like "90s", "30m", "9h", "1h30m";
booleans are true/false (TOML) or, in the environment, the spellings of
`e2vd.vocabulary.TRUE_WORDS`/`FALSE_WORDS` (1/0, true/false, yes/no, on/off); log_level is
DEBUG, INFO, WARNING, ERROR or CRITICAL in any case (stored upper-case). max_connections_per_uid
(>= 1) caps the connections one peer uid may hold open at once, root included; the daemon's
overall cap (e2vd.server.MAX_CONNECTIONS, 256) still applies above it.

inference_timeout bounds one model call (a batch of up to max_batch clips): a call running
longer is taken as stuck (a wedged GPU, a driver fault) and the daemon's process ends, so that
the device is handed back (docs/design.md, the lifecycle). The default, 120 s, is far above what
max_seconds (30 s) of audio takes on a CPU (the large model ran 20 s of audio in 7 s on 2 cores)
or a GPU (under 0.1 s); raise it with max_seconds or max_batch on a slow device, never set it
below what max_batch clips of max_seconds take there.

load_timeout bounds the model load (the wait for the GPU lock included): a model not loaded
after that long (a hung disk or network filesystem) is given up on. The daemon then answers 503
model_unavailable, naming where the load waits, for unavailable_grace seconds and exits, like a
model that failed to load; it must be longer than gpu_lock_timeout. While the model loads, the
daemon extends systemd's start timeout (TimeoutStartSec=), so load_timeout is the bound that counts.

gpu_lock is the lock file every daemon holds while it chooses its device and puts the model on
it (e2vd.gpu_lock), so that daemons starting at once cannot all pass the min_free_mb check: an
absolute path, or empty for `<directory of socket>/lock/gpu.lock` (/run/e2vd/lock/gpu.lock).
gpu_lock_timeout (a duration, >= 0) bounds the wait for another daemon holding it; then the GPU
counts as busy (busy_policy decides).

The low-confidence fallback (e2vd.fallback): `fallback_model` is a second model (a directory or
a ModelScope id, like `model`; empty, the default, turns the fallback off) that answers instead
of the main model when the main model's top score is below `fallback_below` (0..1, default 0.7);
it is loaded on first need, on `fallback_device` ("cpu", the default: no GPU memory; or "cuda",
"cuda:N"; never "auto"). A `fallback_model` that is neither an absolute path nor an id is refused
here (a relative or ~ path would name another directory in the daemon, which runs from /); a
missing directory is caught by `check_file` (check-config, install) and, in the daemon, only
turns the fallback off (answers keep the main model's result and say why).

`model_problem(model)` says why a `model` setting cannot work on this machine (a directory that
is missing or lacks the model's files), for `e2vd check-config` and `e2vd install`; the daemon
itself answers such a model with 503 model_unavailable (e2vd.engine says why).

Every problem raises ConfigError (exit status USAGE, 2) at start, naming where the value came from (the file and key,
the environment variable, or the command-line option) and what is accepted. Unknown keys are
errors too (with a "did you mean" hint), so a typo cannot silently leave a default in force.
Environment variables starting with E2VD_ that are not settings are errors as well, except
E2VD_CONFIG, E2VD_INSTANCE (the instance's name, which e2vd@.service sets; it must be a valid
instance name, `e2vd.instances.check_name`, and only names the daemon in its journal entries)
and the harness variables E2VD_SDBOX_*, E2VD_TEST_* and E2VD_BENCH_*.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from e2vd.durations import parse_duration
from e2vd.model_files import MODEL_FILES, ModelError, check_model_files
from e2vd.vocabulary import DTYPES, FALSE_WORDS, TRUE_WORDS, ExitCode, parse_bool_word

DEFAULT_CONFIG_PATH = "/etc/e2vd/e2vd.toml"
CONFIG_ENV = "E2VD_CONFIG"
INSTANCE_ENV = "E2VD_INSTANCE"   # e2vd.instances: which instance (not a setting)
ENV_PREFIX = "E2VD_"
IGNORED_ENV_PREFIXES = ("E2VD_SDBOX_", "E2VD_TEST_", "E2VD_BENCH_")

#: group 1: the GPU index, ASCII digits only (int() would also read "١" or "１"), at most 4 of them
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::([0-9]{1,4}))?")
#: a ModelScope id "owner/name" (fullmatch): ASCII only (no look-alike letters), and a name that
#: is not "." or ".." (the id becomes a path below cache_dir/models)
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/(?!\.\.?$)[A-Za-z0-9_.-]+")
MAX_PATH = 4095   # bytes in a path Linux accepts (PATH_MAX less the NUL)
BUSY_POLICIES = ("refuse", "cpu")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DURATION_KEYS = frozenset({"idle_timeout", "max_hold", "connection_timeout", "drain_timeout",
                           "unavailable_grace", "inference_timeout", "load_timeout", "gpu_lock_timeout"})


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its source and the accepted values."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Settings:
    """Everything the daemon can be configured with. Times are in seconds, sizes in bytes/MB."""

    socket: str = "/run/e2vd/e2vd.sock"          # Unix socket path when not socket-activated
    model: str = "iic/emotion2vec_plus_large"    # ModelScope id or absolute model directory
    device: str = "auto"                         # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"                          # fp32 | fp16 | bf16 (half types on GPU only)
    quantize: bool = False                       # INT8 dynamic quantization (CPU)
    min_free_mb: int = 2048                      # GPU free memory needed to use it, MB
    busy_policy: str = "refuse"                  # GPU below min_free_mb: refuse | cpu
    gpu_lock: str = ""                           # lock file held while choosing/loading; "" = <socket dir>/lock/gpu.lock
    gpu_lock_timeout: float = 60.0               # longest wait for another daemon's GPU lock
    idle_timeout: float = 300.0                  # exit after this long with nothing to do
    max_hold: float = 43200.0                    # cap on a warmup's keep-warm hold
    max_seconds: float = 30.0                    # longest audio accepted
    max_body_bytes: int = 50_000_000             # largest request body accepted
    queue_size: int = 64                         # requests waiting for the worker, then 503 busy
    max_batch: int = 0                           # clips per inference batch; 0 = auto (8 GPU, 1 CPU)
    connection_timeout: float = 30.0             # a silent connection is closed after this
    max_connections_per_uid: int = 32            # open connections one peer uid may hold (root too)
    drain_timeout: float = 60.0                  # SIGTERM: time to finish in-flight work
    unavailable_grace: float = 60.0              # model failed to load: answer 503 this long, then exit
    inference_timeout: float = 120.0             # one model call running longer is stuck: the process ends
    load_timeout: float = 300.0                  # model not loaded after this long: given up on (503, then exit)
    fallback_model: str = ""                     # model answering when the main one is unsure; "" = off
    fallback_device: str = "cpu"                 # cpu | cuda | cuda:N (cpu: no GPU memory)
    fallback_below: float = 0.7                  # main model's top score below this: the fallback answers
    cache_dir: str = "/var/cache/e2vd"           # model download cache
    log_level: str = "INFO"                      # DEBUG | INFO | WARNING | ERROR | CRITICAL


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(key: str) -> str:
    """The environment variable for a setting: `idle_timeout` -> `E2VD_IDLE_TIMEOUT`."""
    return ENV_PREFIX + key.upper()


def config_file_path(config_path: str | None = None, env: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The config file to read and whether it was named explicitly (argument or $E2VD_CONFIG)."""
    env = os.environ if env is None else env
    if config_path:
        return str(config_path), True
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load_settings(overrides: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None,
                  config_path: str | None = None) -> Settings:
    """Settings from defaults < config file < E2VD_* environment (`env`, default os.environ) <
    `overrides`. Raises ConfigError for an unreadable or invalid file, unknown keys and bad values."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    sources: dict[str, str] = {}   # where each value that is not a default came from
    path, explicit = config_file_path(config_path, env)
    for key, raw in read_config_file(path, required=explicit).items():
        sources[key] = f"{path}: key {key!r}"
        values[key] = _convert(key, raw, sources[key], from_text=False)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or name.startswith(IGNORED_ENV_PREFIXES):
            continue
        if name == INSTANCE_ENV:
            _check_instance(raw)
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in FIELDS:
            raise ConfigError(f"Unknown environment variable {name}{_hint(key, env=True)}. "
                              f"Settings are {', '.join(env_name(k) for k in FIELDS)} "
                              f"(and {CONFIG_ENV} for the config file); unset it or fix the name.")
        if raw.strip() == "":
            continue
        sources[key] = f"environment variable {name}"
        values[key] = _convert(key, raw, sources[key], from_text=True)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in FIELDS:
            raise ConfigError(f"Unknown setting {key!r} given on the command line{_hint(key)}; "
                              f"known settings: {', '.join(FIELDS)}.")
        sources[key] = f"command-line option --{key.replace('_', '-')}"
        values[key] = _convert(key, raw, sources[key], from_text=isinstance(raw, str))
    settings = Settings(**values)
    _check_together(settings, sources)
    return settings


def _check_together(s: Settings, sources: Mapping[str, str]) -> None:
    """ConfigError for values that are fine alone but not together, naming where they came from."""
    if s.load_timeout <= s.gpu_lock_timeout:
        def named(key: str) -> str:
            return f"{key} = {getattr(s, key):g} s ({sources.get(key, 'the default')})"

        raise ConfigError(f"{named('load_timeout')} must be longer than {named('gpu_lock_timeout')}: a daemon "
                          "waiting its turn for the GPU lock would be given up on before loading. Raise "
                          "load_timeout or lower gpu_lock_timeout.")


def _check_instance(raw: str) -> None:
    """ConfigError unless $E2VD_INSTANCE is empty or a valid instance name."""
    if raw.strip() == "":
        return
    from e2vd.instances import InstanceNameError, check_name

    try:
        check_name(raw, f"environment variable {INSTANCE_ENV}")
    except InstanceNameError as err:
        raise ConfigError(f"{err}. Unset it or fix it (e2vd@NAME.service sets it to NAME).") from None


def read_config_file(path: str, required: bool = False) -> dict[str, object]:
    """The flat key/value table of a TOML config file; {} when it is absent and not `required`.
    Checks that keys are known and values are not tables; values are converted by load_settings."""
    try:
        table = tomllib.loads(_config_text(path))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"Config file {path} does not exist. Create it, or point "
                              f"--config / ${CONFIG_ENV} at an existing file.") from None
        return {}
    except PermissionError:
        raise ConfigError(f"Config file {path} cannot be read by uid {os.getuid()} (permission "
                          f"denied). Make it readable: chmod 644 {path}.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid TOML: {err}. Fix the syntax "
                          f"(flat `key = value` lines; strings in double quotes).") from None
    except RecursionError:   # arrays or inline tables nested thousands deep
        raise ConfigError(f"Config file {path} nests arrays or tables too deeply to read; the config file "
                          "takes flat `key = value` lines only (no [sections]).") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid UTF-8 text ({err}).") from None
    for key, value in table.items():
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r}{_hint(key)}. Known keys: "
                              f"{', '.join(FIELDS)}.")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: key {key!r} holds a {'table' if isinstance(value, dict) else 'list'}; "
                              f"the config file takes flat `key = value` lines only (no [sections]).")
    return table


#: The largest config file read (a real one is well under 2 KB).
MAX_CONFIG_BYTES = 1 << 20
DEV_NULL = os.makedev(1, 3)   # the null device's numbers on Linux: read as an empty config file


def _config_text(path: str) -> str:
    """The UTF-8 text of the config file `path`. Opened without blocking (a FIFO named as the
    config would wait for a writer for ever) and refused with ConfigError unless it is a regular
    file of at most MAX_CONFIG_BYTES, or /dev/null (no settings). Raises FileNotFoundError, PermissionError and
    UnicodeDecodeError as reading would."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"Config file {path} is a directory; give the path of a TOML file.")
        if stat.S_ISCHR(mode) and info.st_rdev == DEV_NULL:   # E2VD_CONFIG=/dev/null: no settings
            return ""
        if not stat.S_ISREG(mode):
            raise ConfigError(f"Config file {path} is not a regular file (a FIFO, socket or device); "
                              "give the path of a TOML file.")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"Config file {path} is over {MAX_CONFIG_BYTES} bytes; a config file is a few "
                          "flat `key = value` lines: check that the path names the right file.")
    return data.decode("utf-8")


def model_problem(model: str) -> str | None:
    """Why the `model` setting `model` cannot work on this machine, or None when it can.

    A path (absolute, or starting with ./ or ../) must be a directory holding MODEL_FILES, each a
    readable, non-empty regular file (`e2vd.model_files.model_file`, as the daemon checks them:
    the message names a FIFO, a device, a dangling link ...); anything else must be a ModelScope
    id "owner/name", which `sudo e2vd pull` fetches (the daemon never downloads), not checked here."""
    expanded = os.path.expanduser(model)
    if os.path.isabs(expanded) or model.startswith(("./", "../")):
        if not os.path.isdir(expanded):
            return _not_a_directory(model, expanded)
        missing = [name for name in MODEL_FILES if not os.path.lexists(os.path.join(expanded, name))]
        if missing:
            return f"the model directory {model} lacks {', '.join(missing)} (it must hold {', '.join(MODEL_FILES)})"
        try:
            check_model_files(Path(expanded))
        except ModelError as err:
            return str(err)
        return None
    if not MODEL_ID_PATTERN.fullmatch(model):
        return f"{model!r} is neither an absolute model directory nor a ModelScope id 'owner/name'"
    return None


def _not_a_directory(model: str, path: str) -> str:
    """Why `path` (the setting `model`, expanded), which is not a directory, cannot be the model."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"the model directory {model} is a symbolic link loop (or a chain of over 40 links)"
        return f"the model directory {model} does not exist (or is not a directory)"
    return f"the model directory {model} is a file, not a directory"


def check_file(path: str, required: bool = True, check_model: bool = True) -> tuple[Settings, bool]:
    """The settings the file `path` gives over the defaults, and whether it exists (absent and not
    `required`: the defaults). The environment is not applied: a service has its own. Raises
    ConfigError for anything the daemon would refuse and, with `check_model`, for a model the
    daemon could not load from this machine's disks (`model_problem`), naming the file and key."""
    present = os.path.exists(path)
    if not present and not required:
        settings = Settings()
    else:
        settings = load_settings(env={}, config_path=path)
    problem = model_problem(settings.model) if check_model else None
    if problem:
        in_file = present and "model" in read_config_file(path)
        where = f"{path}: key 'model'" if in_file else f"the default model (no `model` in {path})"
        raise ConfigError(f"{where}: {problem}. Set model to an absolute directory holding "
                          f"{', '.join(MODEL_FILES)}, readable by the service, or to a ModelScope id.")
    problem = model_problem(settings.fallback_model) if check_model and settings.fallback_model else None
    if problem:
        raise ConfigError(f"{path}: key 'fallback_model': {problem}. Set fallback_model to an absolute "
                          f"directory holding {', '.join(MODEL_FILES)}, readable by the service, or to a "
                          "ModelScope id, or to \"\" to turn the fallback off.")
    return settings, present


def _hint(key: str, env: bool = False) -> str:
    candidates = [k for k in FIELDS]
    match = difflib.get_close_matches(key.replace("-", "_").lower(), candidates, n=1, cutoff=0.7)
    if not match:
        return ""
    return f" (did you mean {env_name(match[0]) if env else repr(match[0])}?)"


def _convert(key: str, raw: object, source: str, from_text: bool) -> object:
    """Convert and validate one value for `key`; `source` names where it came from for errors."""
    kind = FIELDS[key].type
    try:
        if kind == "bool":
            value: object = _to_bool(raw, from_text)
        elif kind == "int":
            value = _to_int(raw, from_text)
        elif kind == "float":
            value = _to_float(raw, from_text, duration=key in DURATION_KEYS)
        else:
            if not isinstance(raw, str):
                raise ValueError(f"expected a string, got {_show(raw)}")
            value = raw.strip()
        _CHECKS.get(key, lambda v: None)(value)
    except ValueError as err:
        raise ConfigError(f"Bad value for {source}: {err}.") from None
    if key == "log_level":
        value = str(value).upper()
    return value


def _show(raw: object) -> str:
    return f"{type(raw).__name__} {raw!r}"


def _to_bool(raw: object, from_text: bool) -> bool:
    """A TOML boolean as it is; from the environment or a flag, a spelling of parse_bool_word."""
    if isinstance(raw, bool):
        return raw
    if from_text and isinstance(raw, str):
        value = parse_bool_word(raw)
        if value is not None:
            return value
    spellings = ", ".join(f"{yes}/{no}" for yes, no in zip(TRUE_WORDS, FALSE_WORDS))
    accepted = spellings if from_text else "true or false (no quotes)"
    raise ValueError(f"expected a boolean ({accepted}), got {_show(raw)}")


def _to_int(raw: object, from_text: bool) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if from_text and isinstance(raw, str):
        text = raw.strip().replace("_", "")
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    raise ValueError(f"expected a whole number, got {_show(raw)}")


def _to_float(raw: object, from_text: bool, duration: bool) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str) and (from_text or duration):
        text = raw.strip()
        try:
            value = parse_duration(text) if duration else float(text)
        except ValueError:
            forms = "seconds as a number, or a duration like 90s, 30m, 9h, 1h30m" if duration else "a number"
            raise ValueError(f"expected {forms}, got {_show(raw)}") from None
    else:
        forms = "seconds as a number, or a duration string like \"30m\"" if duration else "a number"
        raise ValueError(f"expected {forms}, got {_show(raw)}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {_show(raw)}")
    return value


def _at_least(minimum: float, unit: str = "") -> Callable[[object], None]:
    def check(value: object) -> None:
        if value < minimum:  # type: ignore[operator]
            raise ValueError(f"must be >= {minimum:g}{unit}, got {value!r}")
    return check


def _positive(unit: str = "") -> Callable[[object], None]:
    def check(value: object) -> None:
        if value <= 0:  # type: ignore[operator]
            raise ValueError(f"must be > 0{unit}, got {value!r}")
    return check


def _one_of(choices: tuple[str, ...], fold: bool = False) -> Callable[[object], None]:
    def check(value: object) -> None:
        if (str(value).upper() if fold else value) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
    return check


def _non_empty(value: object) -> None:
    if not value:
        raise ValueError("must not be empty")


def _model(value: object) -> None:
    """An absolute model directory or an "owner/name" id, like fallback_model but never empty
    (run by hand from a checkout, './models/x' would name another directory under systemd)."""
    _non_empty(value)
    _model_path_or_id(str(value), "")


def _fallback_model(value: object) -> None:
    """Empty (off), a path, or an "owner/name" id; whether the directory exists is `check_file`'s."""
    if str(value):
        _model_path_or_id(str(value), ", or \"\" (no fallback)")


def _model_path_or_id(text: str, or_empty: str) -> None:
    """ValueError unless `text` is an absolute path or an ASCII "owner/name" id, in UTF-8, without
    control characters; `or_empty` is appended to the list of what is accepted."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("must not hold control characters")
    _utf8(text)
    if text.startswith(("./", "../", "~")):
        raise ValueError(f"must be an absolute model directory, e.g. {os.path.abspath(os.path.expanduser(text))!r} "
                         f"(under systemd the daemon runs from / as its own user, where {text!r} would name "
                         f"another directory); got {text!r}")
    if not (os.path.isabs(text) or MODEL_ID_PATTERN.fullmatch(text)):
        raise ValueError(f"must be an absolute model directory or a ModelScope id 'owner/name' (ASCII)"
                         f"{or_empty}; got {text!r}")


def _utf8(text: str) -> None:
    """ValueError unless `text` is valid UTF-8 (an environment value with undecodable bytes
    holds surrogates, which the journal and JSON answers cannot carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"is not valid UTF-8 text ({ascii(text)[:200]}); write the path in UTF-8") from None


def _fallback_device(value: object) -> None:
    if value == "auto" or not DEVICE_PATTERN.fullmatch(str(value)):
        raise ValueError(f"must be cpu (the default: the fallback then holds no GPU memory), cuda or "
                         f"cuda:N (N = GPU index, 0 to 9999, ASCII digits); got {value!r}")


def _fraction(value: object) -> None:
    if not 0.0 <= value <= 1.0:  # type: ignore[operator]
        raise ValueError(f"must be a score between 0 and 1 (0 never asks the fallback, 1 almost always); "
                         f"got {value!r}")


def _absolute_or_empty(value: object) -> None:
    """Empty, or an absolute path without control characters of at most MAX_PATH bytes."""
    text = str(value)
    if text and not os.path.isabs(text):
        raise ValueError(f"must be an absolute path (or empty for the default); got {value!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"must not hold control characters; got {value!r}")
    _utf8(text)
    if len(os.fsencode(text)) > MAX_PATH:
        raise ValueError(f"is too long ({len(os.fsencode(text))} bytes, Linux takes {MAX_PATH}): choose a "
                         "shorter path")


def _device(value: object) -> None:
    if not DEVICE_PATTERN.fullmatch(str(value)):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (N = GPU index, 0 to 9999, ASCII digits, "
                         f"e.g. cuda:0); got {value!r}")


_CHECKS: dict[str, Callable[[object], None]] = {
    "socket": _non_empty, "model": _model, "cache_dir": _non_empty,
    "device": _device, "dtype": _one_of(DTYPES), "busy_policy": _one_of(BUSY_POLICIES),
    "log_level": _one_of(LOG_LEVELS, fold=True),
    "min_free_mb": _at_least(0, " MB"),
    "idle_timeout": _at_least(0, " seconds"), "max_hold": _at_least(0, " seconds"),
    "drain_timeout": _at_least(0, " seconds"), "unavailable_grace": _at_least(0, " seconds"),
    "inference_timeout": _positive(" seconds"), "load_timeout": _positive(" seconds"),
    "gpu_lock": _absolute_or_empty, "gpu_lock_timeout": _at_least(0, " seconds"),
    "connection_timeout": _positive(" seconds"), "max_seconds": _positive(" seconds"),
    "max_body_bytes": _positive(" bytes"), "queue_size": _at_least(1), "max_batch": _at_least(0),
    "max_connections_per_uid": _at_least(1, " connections"),
    "fallback_model": _fallback_model, "fallback_device": _fallback_device, "fallback_below": _fraction,
}
