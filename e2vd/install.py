"""`e2vd install` / `e2vd uninstall`: put e2vd's systemd units in place for this installation.

The unit templates are the files in the repository's ``systemd/`` directory (installed as data
files under ``<prefix>/share/e2vd/systemd`` by a wheel).  They name ``/usr/local/bin/e2vd``; the
installer writes them with the ``e2vd`` of the Python running it, and when that Python or its
venv lives under /root or /home (pyenv does), it swaps ``ProtectHome=yes`` for
``ProtectHome=tmpfs`` plus ``BindReadOnlyPaths=`` of exactly those directories, because a
``DynamicUser=`` service cannot otherwise reach them (203/EXEC).

Install (idempotent): check an existing /etc/e2vd/e2vd.toml as the daemon will read it (a
setting it would refuse stops the install before anything changes), create the socket's group,
write the four units, write a default /etc/e2vd/e2vd.toml when there is none (never
overwrites), pull the configured ModelScope model (`e2vd pull`, unless ``--no-pull``: the
daemon never downloads), ``daemon-reload``, enable (and start, unless ``--no-start``)
e2vd.socket and e2vd-warmup.timer.  Uninstall: stop and disable, remove the units; the config, the model cache
and the group stay unless ``--purge``.

Instances (``--instance NAME``, e2vd.instances): install writes the templates e2vd@.socket and
e2vd@.service (rendered like e2vd.service, shared by every instance), a new /etc/e2vd/NAME.toml
(never overwritten) with ``model`` from --model and ``cache_dir = "/var/cache/e2vd-NAME"`` (the
instance's own CacheDirectory=, where its pull puts the model), pulls, and enables (and starts)
e2vd@NAME.socket; the default instance's units and files are not touched.
``--warmup-calendar``/``--warmup-until`` with ``--instance`` also write and enable the instance's
own e2vd-warmup@NAME.service/.timer (rendered from e2vd-warmup.*: `e2vd warmup --instance NAME`).
Uninstall ``--instance NAME`` stops and disables only e2vd@NAME.socket/.service (and removes its
warmup units), and removes the templates only when no other instance is left; ``--purge`` removes /etc/e2vd/NAME.toml and the instance's
state and cache.  A plain uninstall leaves instances alone: its ``--purge`` removes only the
default's config and data, and keeps the group while an instance still uses it.

Both need systemd as PID 1 (`e2vd.systemd.booted`); without it (a plain container) they stop
at once with one line naming the two ways that work (`NO_SYSTEMD`), exit 2.
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from e2vd.config import BUSY_POLICIES, FIELDS, MODEL_ID_PATTERN, ConfigError, Settings, check_file
from e2vd.durations import parse_clock
from e2vd.instances import Instance, InstanceNameError, check_name, installed_names
from e2vd.vocabulary import DTYPES, ExitCode

UNITS = ("e2vd.socket", "e2vd.service", "e2vd-warmup.service", "e2vd-warmup.timer")
#: The templates every instance runs from (e2vd.instances).
INSTANCE_UNITS = ("e2vd@.socket", "e2vd@.service")
ENABLE = ("e2vd.socket", "e2vd-warmup.timer")
TEMPLATE_COMMAND = "/usr/local/bin/e2vd"
UNIT_DIR = "etc/systemd/system"
CONFIG_PATH = "etc/e2vd/e2vd.toml"
# StateDirectory=/CacheDirectory= of e2vd.service; with DynamicUser= the data lives in private/.
DATA_DIRS = ("var/cache/e2vd", "var/cache/private/e2vd", "var/lib/e2vd", "var/lib/private/e2vd")
# ProtectHome=yes hides HOME_ROOTS and PrivateTmp=yes hides TMP_ROOTS; anything the service must
# run from below them (pyenv's Python in /root, a checkout in /tmp) needs a read-only bind.
HOME_ROOTS = (Path("/root"), Path("/home"), Path("/run/user"))
TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))

_CONFIG_HEAD = """\
# /etc/e2vd/e2vd.toml - settings of the e2vd daemon (written by `e2vd install`, never overwritten).
# Every key may also be set as E2VD_<KEY> in the service's environment
# (systemctl edit e2vd.service -> [Service] Environment=E2VD_IDLE_TIMEOUT=600).
# The values shown are the defaults; uncomment a line to change it, then: systemctl restart e2vd
"""

#: The default config file's sections: a comment, then each key it shows with a note. The values
#: are those of e2vd.config.Settings; tests/test_install.py checks that every setting is shown.
_CONFIG_SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Model: a ModelScope id (fetched into cache_dir by `sudo e2vd pull`) or an absolute local directory.\n"
     "A local directory must be readable by the service's dynamic user and must not lie under\n"
     "/root or /home (the service cannot see them).",
     (("model", ""),
      ("device", "auto, cpu or cuda:N"),
      ("dtype", f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]} (fp16/bf16 on a GPU only)"),
      ("quantize", "INT8 dynamic quantization of the Linear layers (CPU only)"),
      ("min_free_mb", "auto only picks a GPU with this much free memory"),
      ("busy_policy", f"when no GPU has room: {' or '.join(BUSY_POLICIES)}"))),
    ("Lifecycle (seconds): exit after idle_timeout with nothing to do; `e2vd warmup` may keep the\n"
     "daemon warm for at most max_hold; a silent connection is closed after connection_timeout.",
     (("idle_timeout", ""), ("max_hold", ""), ("connection_timeout", ""), ("drain_timeout", ""),
      ("unavailable_grace", "a model that cannot load: answer 503 this long, then exit"),
      ("inference_timeout", "one model call running longer is stuck: the daemon's process ends"),
      ("load_timeout", "the model not loaded after this long: 503 for unavailable_grace, then exit"))),
    ("Requests",
     (("max_seconds", "longest audio accepted"),
      ("max_body_bytes", ""),
      ("queue_size", ""),
      ("max_batch", "clips per batch; 0 = auto: 8 on a GPU, 1 on the CPU"),
      ("max_connections_per_uid", "connections one user may hold open at once"))),
    ("",
     (("cache_dir", ""),
      ("log_level", ""),
      ("socket", "only for `e2vd serve` run by hand: e2vd.socket decides under systemd"))),
)


def _toml_value(value: object) -> str:
    """`value` (a default of Settings) as TOML: strings quoted, booleans lower case, whole floats
    without a fraction (300.0 -> 300, which the config reads as 300 seconds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # a JSON string is a TOML basic string, but for \ud83d\ude00-style surrogate pairs (TOML
        # refuses them: non-ASCII is written as it is) and a raw DEL (TOML wants it escaped)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def default_config(model: str | None = None, instance: str | None = None) -> str:
    """The text of a new /etc/e2vd/e2vd.toml: every setting as a commented-out line with its
    default from `Settings`; `model`, when given, as the one line in force.  With `instance`
    NAME: the text of /etc/e2vd/NAME.toml, which also sets cache_dir to the instance's own
    cache directory (/var/cache/e2vd-NAME), and whose head names the instance's unit."""
    sections = _config_sections()
    shown = {key: f"# {key} = {_toml_value(getattr(Settings, key))}"
             for _, keys in sections for key, _ in keys}
    if model is not None:
        shown["model"] = f"model = {_toml_value(model)}"
    head = _CONFIG_HEAD
    if instance is not None:
        inst = Instance(check_name(instance))
        shown["cache_dir"] = f"cache_dir = {_toml_value(str(inst.cache_dir))}"
        head = (head.replace("/etc/e2vd/e2vd.toml - settings of the e2vd daemon",
                             f"{inst.config} - settings of e2vd instance {inst.name}")
                .replace("systemctl edit e2vd.service", f"systemctl edit {inst.service_unit}")
                .replace("systemctl restart e2vd\n", f"systemctl restart {inst.service_unit}\n"))
    width = max(len(shown[key]) for _, keys in sections for key, note in keys if note)
    lines = [head.rstrip("\n")]
    for comment, keys in sections:
        lines.append("#")
        lines.extend(f"# {line}" for line in comment.splitlines())
        lines.extend(f"{shown[key]:<{width}}  # {note}" if note else shown[key] for key, note in keys)
    return "\n".join(lines) + "\n"


def _config_sections() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """_CONFIG_SECTIONS limited to the settings that exist, then any setting they do not list
    (a new one), so the file always shows every setting of `Settings`."""
    listed = {key for _, keys in _CONFIG_SECTIONS for key, _ in keys}
    sections = [(comment, tuple((k, n) for k, n in keys if k in FIELDS)) for comment, keys in _CONFIG_SECTIONS]
    rest = tuple((key, "") for key in FIELDS if key not in listed)
    return sections + ([("Other settings (see the README)", rest)] if rest else [])


#: What `e2vd install` says where systemd is not PID 1 (scripts/setup.sh says the same).
NO_SYSTEMD = ("systemd is not PID 1 here (PID 1 is {pid1!r}), so e2vd's socket-activated units cannot be "
              "installed or run; two ways work: run the daemon in the foreground, `e2vd serve --socket "
              "/run/e2vd/e2vd.sock --model DIR` (see the README's containers section), or use a container "
              "with systemd as PID 1, e.g. `podman run --systemd=always IMAGE /sbin/init`")


def pid1_name() -> str:
    """The command name of PID 1 as this process sees it ("?" when it cannot be read)."""
    try:
        return Path("/proc/1/comm").read_text().strip() or "?"
    except OSError:
        return "?"


class InstallError(RuntimeError):
    """Installing or uninstalling failed; the message says what and what to do. A system step
    that failed (groupadd, systemctl, damaged templates) exits 1."""

    exit_code = ExitCode.FAILED


class InstallUsageError(InstallError):
    """The command was given something it cannot use (an option, or not run as root); nothing
    was changed. Exits 2, like every usage error of `e2vd`."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Layout:
    """Where this installation lives: how to run `e2vd` and what a sandboxed unit must see."""

    command: str                                  # absolute path of the `e2vd` script, or "python -m e2vd"
    read_only_paths: tuple[Path, ...] = field(default=())   # under /root, /home or /tmp, to bind read-only
    pythonpath: str | None = None                 # a source checkout that pip never installed

    @classmethod
    def detect(cls, executable: str | None = None) -> "Layout":
        """The layout of the Python running this code; `executable` overrides sys.executable (the
        interpreter of the same installation that the units should run, e.g. a venv's bin/python)."""
        exe = Path(executable or sys.executable)
        script = exe.parent / "e2vd"
        command = str(script) if os.access(script, os.X_OK) else f"{exe} -m e2vd"
        import e2vd

        package = Path(e2vd.__file__).resolve().parent
        needed = [Path(sys.prefix), Path(sys.base_prefix), exe.parent.parent, exe.resolve().parent.parent, package]
        # Run from a checkout without `pip install`: the service (cwd /) must be told where e2vd is.
        found = subprocess.run([str(exe), "-c", "import e2vd"], cwd="/", capture_output=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).returncode == 0
        return cls(command, _outermost([p.resolve() for p in needed if _hidden(p.resolve())]),
                   None if found else str(package.parent))


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _under_home(path: Path) -> bool:
    return _under(path, HOME_ROOTS)


def _hidden(path: Path) -> bool:
    """Whether the service's sandbox hides `path` (ProtectHome=, PrivateTmp=)."""
    return _under(path, HOME_ROOTS + TMP_ROOTS)


def _outermost(paths: list[Path]) -> tuple[Path, ...]:
    """`paths` without duplicates and without those inside another one, sorted."""
    unique = sorted(set(paths))
    return tuple(p for p in unique if not any(q != p and q in p.parents for q in unique))


@dataclass(frozen=True)
class Options:
    """What the operator chose on the command line."""

    group: str = "e2vd"
    warmup_calendar: str = "Mon..Fri 08:55"
    warmup_until: str = "18:00"
    model: str | None = None        # written into a new config file; None keeps the default
    web: str | None = None          # `--web ADDR:PORT`: also install the browser page's units (e2vd.web_install)
    web_public: bool = False        # `--web-public`: allow a non-loopback --web address
    pull: bool = True               # pull the configured ModelScope model before enabling (`--no-pull`: don't)
    instance: str | None = None     # `--instance NAME`: install instance NAME (e2vd@NAME.socket), not the default
    instance_warmup: bool = False   # with `instance`: also its warmup timer (--warmup-calendar/--warmup-until given)


def template_dir(units: tuple[str, ...] = UNITS) -> Path:
    """The directory holding the unit templates `units`: the source tree's systemd/, else the wheel's data."""
    for d in (Path(__file__).resolve().parent.parent / "systemd", Path(sys.prefix) / "share" / "e2vd" / "systemd"):
        if all((d / u).is_file() for u in units):
            return d
    raise InstallError("the unit templates (e2vd.socket, e2vd.service, ...) are not installed; "
                       "reinstall e2vd (pip install e2vd) or run from a source checkout")


def _set_key(text: str, key: str, value: str, unit: str) -> str:
    """Replace the single `key=...` line of a unit's text (the template must have exactly one)."""
    pattern = re.compile(rf"^{re.escape(key)}=.*$", re.M)
    if len(pattern.findall(text)) != 1:
        raise InstallError(f"template {unit} must have exactly one {key}= line; the systemd/ files are damaged")
    return pattern.sub(lambda _m: f"{key}={value}", text)


def validate(options: Options) -> None:
    """Raise InstallUsageError naming the bad option and the fix."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", options.group):
        raise InstallUsageError(f"--group {options.group!r} is not a valid group name (lower case, digits, _ and -)")
    try:
        parse_clock(options.warmup_until)   # what `e2vd warmup --until` will accept at run time
    except ValueError as err:
        raise InstallUsageError(f"--warmup-until: {err}") from None
    if re.search(r"[\x00-\x1f\x7f-\x9f]", options.warmup_calendar):   # checked without systemd-analyze too
        raise InstallUsageError(f"--warmup-calendar {options.warmup_calendar!r} holds control characters (a newline "
                                "would add a line to the timer unit); give one systemd calendar expression, e.g. "
                                "'Mon..Fri 08:55'")
    if shutil.which("systemd-analyze"):
        cp = subprocess.run(["systemd-analyze", "calendar", options.warmup_calendar], capture_output=True, text=True)
        if cp.returncode != 0:
            raise InstallUsageError(f"--warmup-calendar {options.warmup_calendar!r} is not a systemd calendar "
                                    f"expression ({cp.stderr.strip()}); see `man systemd.time`, e.g. 'Mon..Fri 08:55'")
    if options.model is not None:
        validate_model(options.model)
    if options.web_public and not options.web:
        raise InstallUsageError("--web-public goes with --web ADDR:PORT (the page's address)")
    if options.instance is not None:
        try:
            check_name(options.instance)
        except InstanceNameError as err:
            raise InstallUsageError(str(err)) from None
        if options.web:
            raise InstallUsageError("--web goes with the default instance only (the page talks to "
                                    "/run/e2vd/e2vd.sock); install it with `sudo e2vd install --web`")
    if options.web:
        from e2vd.web_install import ListenError, check

        try:
            check(options.web, options.web_public)
        except ListenError as err:
            raise InstallUsageError(f"--web: {err}") from None


def validate_model(model: str) -> None:
    """Raise InstallUsageError unless `model` is a ModelScope id or an absolute directory the service can read."""
    if MODEL_ID_PATTERN.fullmatch(model) and not os.path.exists(model):
        return
    path = Path(model)
    if not path.is_absolute():
        raise InstallUsageError(f"--model {model!r} is neither a ModelScope id (owner/name) nor an absolute directory")
    if not (path / "model.pt").is_file():
        raise InstallUsageError(f"--model {model}: no model.pt in that directory; give the directory that holds "
                                "config.yaml, tokens.txt and model.pt")
    if _hidden(path.resolve()):
        raise InstallUsageError(f"--model {model} lies below /root, /home or /tmp, which the service cannot see; "
                                "move it to e.g. /srv/e2vd-models/")


def check_config(path: Path, model: bool = True) -> None:
    """Raise InstallUsageError when the daemon would refuse the settings file `path` (or, with
    `model`, could not find its model here): e2vd.config.check_file's message and the fix."""
    try:
        check_file(str(path), check_model=model)
    except ConfigError as err:
        raise InstallUsageError(f"{err} Fix {path} first (`e2vd check-config` checks it), then run "
                                "`e2vd install` again; nothing was changed") from None


def config_text(options: Options) -> str:
    """The default /etc/e2vd/e2vd.toml (with --instance, /etc/e2vd/NAME.toml), with `model = ...`
    set when the operator chose one."""
    return default_config(options.model, options.instance)


def render_units(layout: Layout, options: Options, templates: Path | None = None) -> dict[str, str]:
    """The unit files' text for this layout and these options, keyed by unit name: the four
    units of the default instance (and the page's with --web), or with --instance the two
    instance templates e2vd@.socket and e2vd@.service, plus with `instance_warmup` the
    instance's own warmup units (`warmup_units`)."""
    if options.instance is not None:
        d = templates or template_dir(INSTANCE_UNITS)
        units = {u: (d / u).read_text() for u in INSTANCE_UNITS}
        units["e2vd@.service"] = _render_service(units["e2vd@.service"], "e2vd@.service", layout)
        units["e2vd@.socket"] = _set_key(units["e2vd@.socket"], "SocketGroup", options.group, "e2vd@.socket")
        if options.instance_warmup:
            units.update(_instance_warmup(layout, options, d))
        return units
    d = templates or template_dir()
    from e2vd import web_install

    units = {u: (d / u).read_text() for u in UNITS + (web_install.WEB_UNITS if options.web else ())}
    for name in [u for u in units if u.endswith(".service")]:
        units[name] = _render_service(units[name], name, layout)
    units["e2vd-warmup.service"] = re.sub(r" --until \S+$", f" --until {options.warmup_until}",
                                          units["e2vd-warmup.service"], count=1, flags=re.M)
    units["e2vd-warmup.service"] = _set_key(units["e2vd-warmup.service"], "SupplementaryGroups",
                                            options.group, "e2vd-warmup.service")
    units["e2vd.socket"] = _set_key(units["e2vd.socket"], "SocketGroup", options.group, "e2vd.socket")
    units["e2vd-warmup.timer"] = _set_key(units["e2vd-warmup.timer"], "OnCalendar", options.warmup_calendar,
                                          "e2vd-warmup.timer")
    if options.web:
        units = web_install.render(units, web_install.check(options.web, options.web_public), options.web_public,
                                   options.group)
    return units


def warmup_units(name: str) -> tuple[str, str]:
    """The names of instance `name`'s warmup units: e2vd-warmup@NAME.service and .timer."""
    return f"e2vd-warmup@{name}.service", f"e2vd-warmup@{name}.timer"


def _instance_warmup(layout: Layout, options: Options, templates: Path) -> dict[str, str]:
    """Instance NAME's warmup units, e2vd-warmup.service/.timer rendered for it as unit files of
    their own (each instance has its own calendar and end of day): `e2vd warmup --instance NAME
    --until HH:MM` after e2vd@NAME.socket, on the timer's OnCalendar=."""
    inst = Instance(options.instance)
    service, timer = warmup_units(inst.name)
    default = render_units(layout, Options(group=options.group, warmup_calendar=options.warmup_calendar,
                                           warmup_until=options.warmup_until),
                           templates if all((templates / u).is_file() for u in UNITS) else None)
    svc = default["e2vd-warmup.service"]
    for key in ("Requires", "After"):
        svc = _set_key(svc, key, inst.socket_unit, "e2vd-warmup.service")
    svc = _set_key(svc, "Description", f"Prewarm e2vd instance {inst.name} and keep it warm until the end "
                                       "of the working day", "e2vd-warmup.service")
    svc = re.sub(r"^(ExecStart=\S+(?: -m e2vd)? warmup) ", lambda m: f"{m[1]} --instance {inst.name} ", svc,
                 count=1, flags=re.M)
    if f"warmup --instance {inst.name} --until" not in svc:
        raise InstallError("template e2vd-warmup.service must run `e2vd warmup --until HH:MM`; "
                           "the systemd/ files are damaged")
    tim = _set_key(default["e2vd-warmup.timer"], "Unit", service, "e2vd-warmup.timer")
    tim = _set_key(tim, "Description", f"Prewarm e2vd instance {inst.name} on its calendar", "e2vd-warmup.timer")
    head = f"# {{}} - written by `e2vd install --instance {inst.name} --warmup-calendar ...` from {{}}\n"
    return {service: head.format(service, "e2vd-warmup.service") + svc,
            timer: head.format(timer, "e2vd-warmup.timer") + tim}


def _render_service(text: str, name: str, layout: Layout) -> str:
    """A service template's text for `layout`: ExecStart= with this installation's e2vd and,
    where it lives below a directory the sandbox hides, ProtectHome= and BindReadOnlyPaths=."""
    if f"\nExecStart={TEMPLATE_COMMAND} " not in text:
        raise InstallError(f"template {name} must start {TEMPLATE_COMMAND}; the systemd/ files are damaged")
    text = text.replace(f"ExecStart={TEMPLATE_COMMAND} ", f"ExecStart={layout.command} ")
    if layout.read_only_paths:
        binds = " ".join(str(p) for p in layout.read_only_paths)
        home = any(_under_home(p) for p in layout.read_only_paths)
        text = _set_key(text, "ProtectHome", "tmpfs" if home else "yes", name)
        text = re.sub(r"^(ProtectHome=.*\n)", r"\1# this installation lives below a directory the sandbox "
                      f"hides: make exactly that visible\nBindReadOnlyPaths={binds}\n", text, count=1, flags=re.M)
    if layout.pythonpath:
        text = text.replace("\nExecStart=", f"\nEnvironment=PYTHONPATH={layout.pythonpath}\nExecStart=", 1)
    return text


def _write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` to `path` if it differs; return whether it changed."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".e2vd-tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def _run(argv: list[str]) -> None:
    cp = subprocess.run(argv, capture_output=True, text=True)
    if cp.returncode != 0:
        raise InstallError(f"`{' '.join(argv)}` failed (exit {cp.returncode}): {cp.stderr.strip()}")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _write_files(options: Options, config: Path, *, root: Path, layout: Layout | None, say,
                 wrote: str) -> tuple[Layout, set[str]]:
    """The files of `install` and `_install_instance`: check an existing `config` as the daemon
    will read it (nothing is changed if it is refused), create the group (live only), write the
    units, and write `config` unless it exists (`wrote` begins the line that says so). Returns the
    layout and the names of the units whose text changed."""
    live = root == Path("/")
    if config.exists():
        check_config(config, model=live)
    layout = layout or Layout.detect()
    if live and not _group_exists(options.group):
        _run(["groupadd", "--system", options.group])
        say(f"created system group {options.group} (members may use the socket: usermod -aG {options.group} USER)")
    changed = set()
    for name, text in render_units(layout, options).items():
        path = root / UNIT_DIR / name
        if _write(path, text):
            changed.add(name)
        say(f"{'wrote' if name in changed else 'unchanged'} {path}")
    if config.exists():
        say(f"kept existing {config}" + (f" (--model not applied: set model = {json.dumps(options.model)} there)"
                                         if options.model is not None else ""))
    else:
        _write(config, config_text(options))
        say(wrote + (f" with model = {json.dumps(options.model)}" if options.model else ""))
    return layout, changed


def _pull_and_reload(options: Options, config: Path, say) -> None:
    """A live install's steps before its socket is enabled: the pull (with --pull; the daemon
    never downloads, e2vd.pull), then `systemctl daemon-reload`."""
    if options.pull:
        from e2vd.pull_cli import pull_configured

        pulled = pull_configured(config)
        if pulled is not None:
            say(f"model {'already pulled' if pulled.already_present else 'pulled'}: {pulled.directory}")
    _run(["systemctl", "daemon-reload"])


def _note_read_only(layout: Layout, say) -> None:
    """Say which paths the units bind read-only, if any."""
    if layout.read_only_paths:
        say(f"note: the units bind {', '.join(map(str, layout.read_only_paths))} read-only (Python lives there)")


def install(options: Options, *, start: bool = True, root: Path = Path("/"), layout: Layout | None = None,
            say=print) -> None:
    """Install the units (see the module docstring).  With `root` other than /, only files are
    written (an offline image: `systemctl --root` enables, no group, nothing started)."""
    validate(options)
    if options.instance is not None:
        return _install_instance(options, start=start, root=root, layout=layout, say=say)
    live = root == Path("/")
    config = root / CONFIG_PATH
    layout, changed = _write_files(options, config, root=root, layout=layout, say=say,
                                   wrote=f"wrote default {config}")
    if not live:
        enable = ENABLE + (("e2vd-web.socket",) if options.web else ())
        _run(["systemctl", f"--root={root}", "enable", *enable])
        say(f"enabled {', '.join(enable)} in {root}")
        return
    _pull_and_reload(options, config, say)
    if "e2vd.socket" in changed and subprocess.run(["systemctl", "is-active", "--quiet", "e2vd.socket"]).returncode == 0:
        # a new group or mode only applies to a newly created socket; this also stops a running daemon
        _run(["systemctl", "restart", "e2vd.socket"])
        say("restarted e2vd.socket to apply its new settings")
    enable = ENABLE + (("e2vd-web.socket",) if options.web else ())
    if options.web and "e2vd-web.socket" in changed and subprocess.run(
            ["systemctl", "is-active", "--quiet", "e2vd-web.socket"]).returncode == 0:
        _run(["systemctl", "stop", "e2vd-web.service", "e2vd-web.socket"])   # a new address needs a new socket
    _run(["systemctl", "enable", *(["--now"] if start else []), *enable])
    say(f"enabled{' and started' if start else ''} {', '.join(enable)}")
    if options.web:
        from e2vd.web_listen import parse_address

        say(f"the browser page: {parse_address(options.web).url}")
    _note_read_only(layout, say)


def _install_instance(options: Options, *, start: bool, root: Path, layout: Layout | None, say) -> None:
    """`install` for --instance NAME (validated): the templates, /etc/e2vd/NAME.toml, the pull,
    and e2vd@NAME.socket enabled (and started unless not `start`)."""
    inst = Instance(options.instance)
    live = root == Path("/")
    config = root / inst.config.relative_to("/")
    layout, changed = _write_files(options, config, root=root, layout=layout, say=say,
                                   wrote=f"wrote {config} for instance {inst.name}")
    if not live:
        enable = [inst.socket_unit] + ([warmup_units(inst.name)[1]] if options.instance_warmup else [])
        _run(["systemctl", f"--root={root}", "enable", *enable])
        say(f"enabled {', '.join(enable)} in {root}")
        return
    _pull_and_reload(options, config, say)
    if "e2vd@.socket" in changed and subprocess.run(["systemctl", "is-active", "--quiet",
                                                     inst.socket_unit]).returncode == 0:
        _run(["systemctl", "restart", inst.socket_unit])   # a new group applies to a new socket only
        say(f"restarted {inst.socket_unit} to apply its new settings")
    others = [n for n in installed_names(root) if n != inst.name]
    if changed and others:
        say(f"note: the templates changed; instances {', '.join(others)} use them from their next start "
            f"(their sockets keep the old group until `systemctl restart e2vd@NAME.socket`)")
    enable = [inst.socket_unit] + ([warmup_units(inst.name)[1]] if options.instance_warmup else [])
    _run(["systemctl", "enable", *(["--now"] if start else []), *enable])
    say(f"enabled{' and started' if start else ''} {', '.join(enable)}: instance {inst.name} on {inst.socket} "
        f"(e2vd recognize --instance {inst.name} FILE)")
    _note_read_only(layout, say)


def _uninstall_instance(name: str, *, purge: bool, root: Path, say) -> None:
    """`uninstall` for --instance NAME: stop and disable e2vd@NAME.*, remove the templates when no
    other instance is left, with `purge` also NAME's config, state and cache."""
    inst = Instance(name)
    live = root == Path("/")
    warm_service, warm_timer = warmup_units(inst.name)
    if live:
        subprocess.run(["systemctl", "disable", "--now", inst.socket_unit, warm_timer], capture_output=True)
        subprocess.run(["systemctl", "stop", inst.service_unit, warm_service], capture_output=True)
    else:
        subprocess.run(["systemctl", f"--root={root}", "disable", inst.socket_unit, warm_timer], capture_output=True)
    say(f"stopped and disabled {inst.socket_unit} and {inst.service_unit}")
    for unit in (warm_service, warm_timer):
        _remove(root / UNIT_DIR / unit, say)
    if purge:
        for rel in (str(inst.config.relative_to("/")), *inst.data_dirs()):
            _remove(root / rel, say)
    else:
        say(f"kept {root / inst.config.relative_to('/')} and the cache {root / inst.cache_dir.relative_to('/')} "
            "(--purge removes them)")
    others = [n for n in installed_names(root, configs=False) if n != inst.name]   # still enabled
    if others:
        say(f"kept the templates e2vd@.socket and e2vd@.service: still used by instances {', '.join(others)}")
    else:
        _remove_units(root, INSTANCE_UNITS, say)
    if live:
        _reload_and_reset_failed(inst.service_unit, inst.socket_unit, warm_service)


def _remove_units(root: Path, names, say) -> None:
    """Remove the unit files `names` that exist in `root`'s unit directory, and say so."""
    for name in names:
        path = root / UNIT_DIR / name
        if path.exists():
            path.unlink()
            say(f"removed {path}")


def _reload_and_reset_failed(*units: str) -> None:
    """After a live uninstall: `systemctl daemon-reload`, then forget the failed state of `units`."""
    _run(["systemctl", "daemon-reload"])
    subprocess.run(["systemctl", "reset-failed", *units], capture_output=True)


def _remove(path: Path, say) -> None:
    """Remove the file, link or directory tree `path` if it exists, and say so."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        say(f"removed {path}")
    elif path.is_dir():
        shutil.rmtree(path)
        say(f"removed {path}")


def uninstall(*, purge: bool = False, root: Path = Path("/"), say=print, instance: str | None = None) -> None:
    """Stop, disable and remove the units; with `purge` also the config, the model cache and the group.
    With `instance` NAME, only that instance (see the module docstring)."""
    if instance is not None:
        try:
            check_name(instance)
        except InstanceNameError as err:
            raise InstallUsageError(str(err)) from None
        return _uninstall_instance(instance, purge=purge, root=root, say=say)
    live = root == Path("/")
    socket_unit = root / UNIT_DIR / "e2vd.socket"
    group = Options.group   # the group of the installed socket, or the default after a plain uninstall
    if socket_unit.is_file():
        m = re.search(r"^SocketGroup=(\S+)$", socket_unit.read_text(), re.M)
        group = m[1] if m else group
    if live:
        subprocess.run(["systemctl", "disable", "--now", *ENABLE], capture_output=True)
        subprocess.run(["systemctl", "stop", "e2vd.service", "e2vd-warmup.service"], capture_output=True)
        subprocess.run(["systemctl", "disable", "--now", "e2vd-web.socket"], capture_output=True)   # --web
        subprocess.run(["systemctl", "stop", "e2vd-web.service"], capture_output=True)
    else:
        subprocess.run(["systemctl", f"--root={root}", "disable", *ENABLE], capture_output=True)
        subprocess.run(["systemctl", f"--root={root}", "disable", "e2vd-web.socket"], capture_output=True)
    _remove_units(root, UNITS + ("e2vd-web.socket", "e2vd-web.service"), say)
    if live:
        _reload_and_reset_failed(*UNITS, "e2vd-web.service")
    if not purge:
        say(f"kept {root / CONFIG_PATH} and the model cache {root / 'var/cache/e2vd'} (--purge removes them)")
        return
    instances = installed_names(root)                 # their configs live in /etc/e2vd too
    enabled = installed_names(root, configs=False)    # their sockets use the group
    if instances:
        _remove(root / CONFIG_PATH, say)
        say(f"kept {root / 'etc/e2vd'}/ with the configs of instances {', '.join(instances)} "
            "(`e2vd uninstall --instance NAME --purge` removes one)")
    for rel in (() if instances else ("etc/e2vd",)) + DATA_DIRS:
        _remove(root / rel, say)
    if enabled:
        say(f"kept group {group}: the sockets of instances {', '.join(enabled)} use it")
    elif live and _group_exists(group):
        _run(["groupdel", group])
        say(f"removed group {group}")


def main(args: argparse.Namespace) -> ExitCode:
    """Entry point of `e2vd install` and `e2vd uninstall` (args from e2vd.cli's parser).

    Returns ExitCode.OK; raises InstallUsageError without systemd as PID 1, when not run as root,
    or given a bad option or settings file (nothing changed), InstallError when a system step
    failed. `e2vd.cli.main` prints the
    message and exits with the error's `exit_code`."""
    from e2vd import systemd

    if not systemd.booted():
        raise InstallUsageError(NO_SYSTEMD.format(pid1=pid1_name()))
    if os.geteuid() != 0:
        raise InstallUsageError(f"must run as root (it writes /etc/systemd/system and manages the "
                                f"e2vd group); try: sudo {sys.argv[0] if sys.argv else 'e2vd'} {args.command}")
    if args.command == "install":
        calendar, until = getattr(args, "warmup_calendar", None), getattr(args, "warmup_until", None)
        instance = getattr(args, "instance", None)
        install(Options(args.group, calendar or Options.warmup_calendar, until or Options.warmup_until, args.model,
                        getattr(args, "web", None), getattr(args, "web_public", False),
                        not getattr(args, "no_pull", False), instance,
                        instance is not None and (calendar, until) != (None, None)),
                start=not args.no_start)
    else:
        uninstall(purge=args.purge, instance=getattr(args, "instance", None))
    return ExitCode.OK
