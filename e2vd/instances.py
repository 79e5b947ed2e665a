"""Instances: several e2vd daemons on one machine, each with its own model, socket and settings.

The default instance is the plain `e2vd.socket` / `e2vd.service` pair (config
/etc/e2vd/e2vd.toml, socket /run/e2vd/e2vd.sock), named ``e2vd`` here.  Every other instance
NAME runs from the templates `e2vd@.socket` / `e2vd@.service` as `e2vd@NAME.socket` /
`e2vd@NAME.service`, with config /etc/e2vd/NAME.toml, socket /run/e2vd/NAME.sock, state and
cache directories /var/lib/e2vd-NAME and /var/cache/e2vd-NAME (its pulled models live in
/var/cache/e2vd-NAME/models), the dynamic user e2vd-NAME, and E2VD_INSTANCE=NAME in its
environment, which the daemon's log records as the journal field E2VD_INSTANCE on every entry.

An instance name comes from a command line or the environment, so it is hostile input: it must
match ``[a-z0-9][a-z0-9_-]{0,23}`` (no path separator, no "..", no character systemd would escape
in a unit name; at most 24 characters, so that the dynamic user e2vd-NAME is a valid user name),
and must not be one of RESERVED: ``e2vd`` (the default instance's config and socket), ``web``,
``daemon``, ``warmup`` (the dynamic users and directories of e2vd's other units), ``lock`` (the
GPU lock's directory /run/e2vd/lock).
`check_name` says exactly what is wrong and what to do.

`list_instances` names the default and every installed instance and what systemd records about
each, from `systemctl` and the file system only: it never connects to a socket, so listing never
starts a daemon.  This module starts, stops and connects to nothing.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from e2vd.config import INSTANCE_ENV
from e2vd.vocabulary import ExitCode

#: INSTANCE_ENV (E2VD_INSTANCE): picks an instance (clients) and names it (the daemon's log).
#: The default instance's name: its units are e2vd.socket/e2vd.service, its files e2vd.toml/e2vd.sock.
DEFAULT = "e2vd"
#: 24 characters at most: the dynamic user e2vd-NAME must stay within systemd's 31 for user names.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,23}")
MAX_NAME = 24
#: Names an instance cannot take, and why: their files or dynamic user (e2vd-NAME) are taken.
RESERVED = {DEFAULT: "it is the default instance's own name (/etc/e2vd/e2vd.toml, /run/e2vd/e2vd.sock): "
                     "use the default instance without --instance, or choose another name",
            "web": "/var/lib/e2vd-web and the user e2vd-web belong to the browser front (e2vd-web.service): "
                   "choose another name",
            "daemon": "its dynamic user e2vd-daemon is the default instance's: choose another name",
            "warmup": "its dynamic user e2vd-warmup is e2vd-warmup.service's: choose another name",
            "lock": "/run/e2vd/lock is the GPU lock's directory, which every daemon shares (beside "
                    "/run/e2vd/lock.sock it would only confuse): choose another name"}
CONFIG_DIR = Path("/etc/e2vd")
RUN_DIR = Path("/run/e2vd")
UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE_SOCKET, TEMPLATE_SERVICE = "e2vd@.socket", "e2vd@.service"


class InstanceNameError(ValueError):
    """An instance name that cannot be used; the message says why and what is accepted.
    Exits 2 (usage) from the `e2vd` command."""

    exit_code = ExitCode.USAGE


def check_name(name: str, source: str = "--instance") -> str:
    """Return `name` when it can name an instance; raise InstanceNameError naming `source` (where
    the name came from, e.g. "--instance" or "$E2VD_INSTANCE"), the problem and the rule."""
    rule = ("an instance name is 1 to 24 characters: lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit, e.g. --instance small")
    if not isinstance(name, str) or name == "":
        raise InstanceNameError(f"{source} is empty; {rule}")
    # quoted with escapes, and cut: a name from a command line or the environment may be huge
    shown = ascii(name) if len(name) <= MAX_NAME else f"{ascii(name[:MAX_NAME])[:-1]}...'"
    if "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise InstanceNameError(f"{source} {shown} holds a path separator or '..'; {rule}")
    if len(name) > MAX_NAME:
        raise InstanceNameError(f"{source} {shown} is {len(name)} characters long, more than {MAX_NAME}; {rule}")
    if not NAME_PATTERN.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[a-z0-9_-]", c)})
        what = (f"holds {', '.join(ascii(c) for c in bad)}" if bad
                else "starts with '_' or '-'")
        raise InstanceNameError(f"{source} {shown} {what}; {rule}")
    if name in RESERVED:
        raise InstanceNameError(f"{source} {name!r} is reserved: {RESERVED[name]}")
    return name


@dataclass(frozen=True)
class Instance:
    """Where one instance lives.  `name` is DEFAULT for the default instance."""

    name: str

    @property
    def default(self) -> bool:
        return self.name == DEFAULT

    @property
    def socket_unit(self) -> str:
        return "e2vd.socket" if self.default else f"e2vd@{self.name}.socket"

    @property
    def service_unit(self) -> str:
        return "e2vd.service" if self.default else f"e2vd@{self.name}.service"

    @property
    def config(self) -> Path:
        """Its settings file: /etc/e2vd/NAME.toml (the default: /etc/e2vd/e2vd.toml)."""
        return CONFIG_DIR / f"{self.name}.toml"

    @property
    def socket(self) -> Path:
        """Its listening socket: /run/e2vd/NAME.sock (the default: /run/e2vd/e2vd.sock)."""
        return RUN_DIR / f"{self.name}.sock"

    @property
    def data_name(self) -> str:
        """The name of its StateDirectory=/CacheDirectory=: e2vd (default) or e2vd-NAME."""
        return DEFAULT if self.default else f"{DEFAULT}-{self.name}"

    @property
    def cache_dir(self) -> Path:
        """Its cache_dir setting in a config `e2vd install --instance` writes: /var/cache/e2vd-NAME."""
        return Path("/var/cache") / self.data_name

    def data_dirs(self) -> tuple[str, ...]:
        """Its state and cache directories relative to /, public and private (DynamicUser=)."""
        d = self.data_name
        return (f"var/cache/{d}", f"var/cache/private/{d}", f"var/lib/{d}", f"var/lib/private/{d}")


def of_socket(path: str) -> Instance:
    """The instance whose socket is `path` (/run/e2vd/NAME.sock with NAME a valid instance name),
    else the default instance (for messages that name its units: any other path is the
    default's or a daemon started by hand)."""
    p = Path(path)
    if p.parent == RUN_DIR and p.suffix == ".sock" and NAME_PATTERN.fullmatch(p.stem) and p.stem not in RESERVED:
        return Instance(p.stem)
    return Instance(DEFAULT)


def instance(name: str | None, source: str = "--instance") -> Instance:
    """The Instance `name` names (checked with `check_name`), or the default for None."""
    return Instance(DEFAULT) if name is None else Instance(check_name(name, source))


def socket_for(socket: str | os.PathLike[str] | None = None, name: str | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """The socket a client talks to: `socket` when given, else instance `name`'s socket, else
    $E2VD_SOCKET, else $E2VD_INSTANCE's socket, else the default /run/e2vd/e2vd.sock.

    Giving both `socket` and `name` is a ValueError (they would disagree).  A bad name, given or
    from the environment, raises InstanceNameError naming where it came from.  An empty
    environment value counts as unset."""
    env = os.environ if env is None else env
    if socket is not None and name is not None:
        raise InstanceNameError(f"give a socket path or an instance name, not both "
                                f"(instance {name!r} listens on {RUN_DIR}/{name}.sock)")
    if socket is not None:
        return os.fspath(socket)
    if name is not None:
        return str(instance(name).socket)
    from e2vd import config   # light: the socket setting's variable name is the daemon's own

    if env.get(config.env_name("socket"), "").strip():
        return env[config.env_name("socket")]
    named = env.get(INSTANCE_ENV, "")
    if named.strip():
        return str(instance(named, f"${INSTANCE_ENV}").socket)
    return config.Settings.socket


def installed_names(root: Path = Path("/"), listed: str | None = None, configs: bool = True) -> list[str]:
    """The names of the non-default instances installed under `root`, sorted: those enabled
    (sockets.target.wants/e2vd@NAME.socket), with `configs` those with a config
    /etc/e2vd/NAME.toml (also one kept by `e2vd uninstall --instance NAME` without --purge) and,
    from `listed` (the output of `systemctl list-units --all --plain --no-legend 'e2vd@*'`),
    those systemd has loaded.  Files with other names (not valid instance names, or reserved)
    are ignored, never an error."""
    names: set[str] = set()
    conf = root / CONFIG_DIR.relative_to("/")
    if configs and os.path.isdir(conf):
        names.update(p.stem for p in conf.glob("*.toml"))
    wants = root / UNIT_DIR.relative_to("/") / "sockets.target.wants"
    try:
        names.update(m[1] for name in os.listdir(wants) if (m := re.fullmatch(r"e2vd@(.+)\.socket", name)))
    except OSError:   # absent, or closed to this user: systemd's list still names what it loaded
        pass
    for line in (listed or "").splitlines():
        m = re.match(r"\s*e2vd@(\S+)\.(?:socket|service)\s", line + " ")
        if m:
            names.add(m[1])
    return sorted(n for n in names if NAME_PATTERN.fullmatch(n) and n not in RESERVED)


@dataclass(frozen=True)
class InstanceState:
    """One instance as systemd and the file system record it, read without waking it.

    service/socket: systemd's ActiveState (SubState), "not installed" when the unit is not
    loaded, or "unknown" when systemd cannot be asked; running: its daemon process exists
    (service active or activating), so asking its socket cannot start it."""

    name: str
    socket_path: str
    config: str
    config_present: bool
    socket_unit: str
    service_unit: str
    socket_state: str
    service_state: str
    socket_file: bool
    running: bool
    main_pid: int | None

    def line(self) -> str:
        """One line for `e2vd status`, control characters (from systemd's answers) written as
        backslash escapes."""
        from e2vd.log import escape_controls

        what = "default instance" if self.name == DEFAULT else "instance"
        text = (f"{what} {self.name}: {self.service_unit} {self.service_state}"
                + (f", PID {self.main_pid}" if self.main_pid else "")
                + f"; {self.socket_unit} {self.socket_state} on {self.socket_path}")
        if not self.running and self.socket_state.startswith("active"):
            text += "; asleep, the next request starts it"
        elif self.socket_state not in ("unknown", "not installed") and not self.socket_state.startswith("active"):
            text += f"; nothing listens, requests fail: `sudo systemctl enable --now {self.socket_unit}`"
        if not self.config_present:
            text += f"; no {self.config} (the defaults apply)"
        return escape_controls(text)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "default": self.name == DEFAULT, "socket": self.socket_path,
                "config": self.config, "config_present": self.config_present,
                "units": {self.socket_unit: self.socket_state, self.service_unit: self.service_state},
                "socket_file": self.socket_file, "running": self.running, "main_pid": self.main_pid}


def _state(props: Mapping[str, str] | None) -> str:
    if props is None:
        return "unknown"
    if props.get("LoadState") != "loaded":
        return "not installed"
    return f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})"


def list_instances(run=subprocess.run, root: Path = Path("/")) -> list[InstanceState]:
    """The default instance and every installed one (`installed_names`), with systemd's record
    of their units (`systemctl show`, one call) and whether their socket file exists.  Never
    connects to a socket; without systemd the unit states read "unknown". systemctl's output is
    read as UTF-8 with undecodable bytes replaced; a MainPID that is not 1 to 10 ASCII digits is
    none."""
    from e2vd.unit_record import parse_systemctl_show

    listed = None
    try:
        cp = run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager", "e2vd@*"],
                 capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10)
        listed = cp.stdout if cp.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    all_ = [Instance(DEFAULT)] + [Instance(n) for n in installed_names(root, listed)]
    units = [u for i in all_ for u in (i.service_unit, i.socket_unit)]
    shown: dict[str, dict[str, str]] | None = None
    try:
        cp = run(["systemctl", "show", *units, "-p", "Id,LoadState,ActiveState,SubState,MainPID", "--no-pager"],
                 capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10)
        if cp.returncode == 0:
            shown = {k: u.props for k, u in parse_systemctl_show(cp.stdout).items()}
    except (OSError, subprocess.TimeoutExpired):
        pass
    states = []
    for i in all_:
        svc = None if shown is None else shown.get(i.service_unit, {})
        sock = None if shown is None else shown.get(i.socket_unit, {})
        running = svc is not None and svc.get("ActiveState") in ("active", "activating", "deactivating")
        pid = int(svc["MainPID"]) if svc and re.fullmatch(r"[1-9][0-9]{0,9}", svc.get("MainPID", "")) else None
        states.append(InstanceState(
            i.name, str(i.socket), str(i.config), _present(root / i.config.relative_to("/"), os.path.isfile),
            i.socket_unit, i.service_unit, _state(sock), _state(svc),
            _present(root / i.socket.relative_to("/"), os.path.lexists), running, pid))
    return states


def _present(path: Path, test) -> bool:
    """`test(path)` (os.path.isfile, os.path.lexists), and True when this user may not look into
    the directory (`e2vd status` run by a user for whom /etc/e2vd is closed must not crash, nor
    say a file is absent that it cannot see)."""
    if test(path):
        return True
    try:
        os.lstat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return False
