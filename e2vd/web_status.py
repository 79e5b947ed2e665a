"""The page's status badge: what the daemon is doing, found out without waking it.

Source one is systemd (`systemctl show`, which asks over D-Bus as `e2vd status` does, parsed by
`e2vd.cli.parse_systemctl_show`): whether e2vd.service runs, since when, and how long its last
start took (process start to READY=1: ExecMainStartTimestampMonotonic to
ActiveEnterTimestampMonotonic, on the CLOCK_MONOTONIC this process shares). Source two is the
daemon's own GET /v1/status, asked only while systemd says its process exists.

Where systemd cannot be asked over D-Bus although it runs (dbus-daemon cannot resolve a
DynamicUser= uid: systemd gives it SYSTEMD_NSS_DYNAMIC_BYPASS=1, and it drops such connections
during Hello; seen with systemd 252 and dbus-daemon 1.14 on Debian 12), the badge reads what
systemd keeps on the file system instead: the unit's cgroup exists and is populated exactly while
its process runs (cgroup.events), and e2vd.socket's socket file exists while it listens. Then the
expected start time is the daemon's own load_seconds, as its status reports it.

The daemon is asked over one kept-open connection: the daemon counts a new connection as use
(docs/design.md, the idle rule) but never a status request, so a page polling the badge does not
keep the daemon awake; only a reconnection (after the daemon closed a connection left silent for
connection_timeout) holds it, for at most connection_timeout.

The last start's duration is kept in memory and, when systemd gives the front a state directory
($STATE_DIRECTORY), in `last_load.json` there, so a new front process still knows what to expect.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from e2vd.cli import SERVICE, SOCKET_UNIT, UnitState, parse_systemctl_show

#: The properties asked from systemd for the badge.
PROPS = ("Id", "LoadState", "ActiveState", "SubState", "MainPID", "StatusText", "Result", "Listen",
         "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
MIN_INTERVAL_S = 0.5     # answers within this of each other share one look (many tabs, one question)
DAEMON_TIMEOUT_S = 2.0   # a running daemon answers /v1/status at once, also while it loads
LOAD_FILE = "last_load.json"
SYSTEMD_RUNTIME = Path("/run/systemd/system")   # exists when systemd is PID 1 (sd_booted(3))
CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))

#: The badge's states; the page words each one.
STATES = ("asleep", "starting", "ready", "warm", "stopping", "unavailable", "down", "not_installed", "unknown")


@dataclass(frozen=True)
class Badge:
    """What the page shows about the daemon. Times in seconds; deadlines are Unix times.

    `state` is one of STATES; `text` the same in words (the server's local time); `elapsed_s`
    how long the current start has run; `expected_load_s` how long the last start took;
    `limits` the daemon's max_body_bytes and max_seconds as configured on this machine."""

    state: str
    text: str
    device: str | None = None
    elapsed_s: float | None = None
    expected_load_s: float | None = None
    idle_exit_in_s: float | None = None
    keep_warm_deadline: float | None = None
    error: str | None = None
    status_text: str = ""
    limits: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def systemctl_show(units: tuple[str, ...] = (SERVICE, SOCKET_UNIT), props: tuple[str, ...] = PROPS,
                   ) -> dict[str, UnitState] | str:
    """`systemctl show` of `units` (it reads, never starts anything); a str says why systemd
    cannot be asked. (e2vd.cli.systemd_units asks for a fixed set of properties.)"""
    try:
        proc = subprocess.run(["systemctl", "show", *units, "-p", ",".join(props), "--no-pager"],
                              capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return "systemctl is not installed here"
    except subprocess.TimeoutExpired:
        return "systemctl did not answer within 5 s"
    if proc.returncode != 0:
        return " ".join(proc.stderr.split())[:300] or f"systemctl exited {proc.returncode}"
    return parse_systemctl_show(proc.stdout)


def unit_running(unit: str, roots: tuple[Path, ...] = CGROUP_ROOTS) -> bool | None:
    """Whether `unit` (a system service) has processes, from its cgroup (systemd creates
    system.slice/UNIT while the unit runs): True/False, or None when no cgroup tree tells."""
    for root in roots:
        if not (root / "system.slice").is_dir():
            continue
        events = root / "system.slice" / unit / "cgroup.events"
        try:
            return "populated 1" in events.read_text().splitlines()
        except FileNotFoundError:
            procs = root / "system.slice" / unit / "cgroup.procs"   # cgroup v1: no cgroup.events
            try:
                return bool(procs.read_text().split())
            except OSError:
                return False
        except OSError:
            return None
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("e2vd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonStatus:
    """GET /v1/status over one kept-open connection (see the module docstring); never connects
    unless told the daemon's process exists."""

    def __init__(self, socket_path: str, timeout: float = DAEMON_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def ask(self) -> dict[str, Any] | None:
        """The daemon's status document, or None when it cannot be had (the connection is
        dropped; the next call opens a new one)."""
        for attempt in (1, 2):   # a kept connection the daemon has closed fails once, quietly
            fresh = self._conn is None
            if fresh:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            try:
                self._conn.request("GET", "/v1/status", headers={"Accept": "application/json"})
                resp = self._conn.getresponse()
                data = resp.read(1 << 20)
                doc = json.loads(data) if resp.status == 200 else None
                if resp.will_close:
                    self.close()
                return doc if isinstance(doc, dict) else None
            except (OSError, http.client.HTTPException, ValueError):
                self.close()
                if fresh:
                    return None
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class StatusSource:
    """Builds the Badge; `show` (systemd) and `clock` (CLOCK_MONOTONIC, seconds) can be replaced in tests."""

    def __init__(self, socket_path: str, limits: dict[str, float] | None = None, state_dir: str | None = None,
                 show: Callable[[], dict[str, UnitState] | str] = systemctl_show,
                 clock: Callable[[], float] = time.monotonic,
                 running: Callable[[str], bool | None] = unit_running, booted: Callable[[], bool] | None = None) -> None:
        self.socket_path = socket_path
        self.daemon = DaemonStatus(socket_path)
        self.running = running
        self.booted = booted or SYSTEMD_RUNTIME.is_dir
        self.limits = dict(limits or {})
        self.show = show
        self.clock = clock
        self.state_file = Path(state_dir) / LOAD_FILE if state_dir else None
        self.expected_load_s = self._read_load()
        self._lock = threading.Lock()
        self._cached: tuple[float, Badge] | None = None

    def badge(self) -> Badge:
        """The badge now (shared by callers within MIN_INTERVAL_S)."""
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= MIN_INTERVAL_S:
                self._cached = (now, self._look(now))
            return self._cached[1]

    def close(self) -> None:
        self.daemon.close()

    # ------------------------------------------------------------------ the look
    def _look(self, now: float) -> Badge:
        units = self.show()
        if isinstance(units, str):
            return self._look_without_bus(units)
        svc, sock = units.get(SERVICE), units.get(SOCKET_UNIT)
        if svc is None or not svc.loaded:
            return self._badge("not_installed", "e2vd is not installed: run `sudo e2vd install`")
        self._learn_load(svc)
        extra = {"status_text": svc.get("StatusText")}
        if sock is None or not sock.loaded or not sock.active:
            state = sock.get("ActiveState") if sock else "missing"
            return self._badge("down", f"e2vd.socket is {state}: requests cannot wake the daemon "
                                       "(sudo systemctl enable --now e2vd.socket)", **extra)
        active, sub = svc.get("ActiveState"), svc.get("SubState")
        if active == "deactivating":
            return self._badge("stopping", "stopping (idle exit or systemctl stop); the next request starts it again",
                               **extra)
        if active not in ("active", "activating") or svc.get("MainPID", "0") in ("", "0"):
            why = svc.get("Result")
            text = "asleep: no daemon process; the first Recognize starts it"
            if why not in ("", "success"):
                text += f" (its last run ended: {why}; see journalctl -u e2vd)"
            return self._badge("asleep", text, **extra)
        elapsed = self._since(svc.get("ExecMainStartTimestampMonotonic"), now)
        doc = self.daemon.ask()
        if doc is None:
            if active == "activating":
                return self._badge("starting", "starting: loading the model", elapsed_s=elapsed, **extra)
            return self._badge("ready", "running (its status could not be read)", **extra)
        return self._from_daemon(doc, elapsed, extra)

    def _look_without_bus(self, why: str) -> Badge:
        """The badge from systemd's file-system state (module docstring), when D-Bus refused."""
        running = self.running(SERVICE) if self.booted() else None
        if running is None:
            return self._badge("unknown", f"systemd cannot be asked ({why}); Recognize still works "
                                          "and starts the daemon when it sleeps")
        if not os.path.exists(self.socket_path):
            return self._badge("down", f"no daemon socket at {self.socket_path}: requests cannot wake the daemon "
                                       "(sudo systemctl enable --now e2vd.socket)")
        if not running:
            return self._badge("asleep", "asleep: no daemon process; the first Recognize starts it")
        doc = self.daemon.ask()
        if doc is None:
            return self._badge("starting", "starting: the daemon's process runs, its status does not answer yet")
        if doc.get("state") == "ready" and (load := _number(doc.get("load_seconds"))) is not None:
            self._remember(round(load, 1))
        return self._from_daemon(doc, _number(doc.get("uptime_s")), {})

    def _from_daemon(self, doc: dict[str, Any], elapsed: float | None, extra: dict[str, Any]) -> Badge:
        state, device = doc.get("state"), doc.get("device")
        device = device if isinstance(device, str) else None
        if state == "loading":
            return self._badge("starting", "starting: loading the model", elapsed_s=elapsed, **extra)
        if state == "unavailable":
            error = str(doc.get("error") or "the model could not be loaded")
            return self._badge("unavailable", f"unavailable: {error}", error=error, **extra)
        if state == "stopping":
            return self._badge("stopping", "stopping", **extra)
        keep = _number(doc.get("keep_warm_deadline"))
        if keep is not None and keep > time.time():
            return self._badge("warm", f"ready on {device}, warm until {time.strftime('%H:%M', time.localtime(keep))}",
                               device=device, keep_warm_deadline=keep, **extra)
        idle = _number(doc.get("idle_exit_in_s"))
        text = f"ready on {device}" + (f", idle exit in {math.ceil(idle)} s" if idle is not None else "")
        return self._badge("ready", text, device=device, idle_exit_in_s=idle, **extra)

    def _badge(self, state: str, text: str, **fields: Any) -> Badge:
        if state not in ("ready", "warm", "starting"):
            self.daemon.close()   # nothing to ask until the daemon runs again
        return Badge(state, text, expected_load_s=self.expected_load_s, limits=self.limits, **fields)

    # ------------------------------------------------------------------ the expected load time
    @staticmethod
    def _since(usec: str, now: float) -> float | None:
        start = _number(usec)
        return None if not start else round(max(0.0, now - start / 1e6), 1)

    def _learn_load(self, svc: UnitState) -> None:
        """Remember how long the last start took, once systemd shows it finished (READY=1)."""
        start = _number(svc.get("ExecMainStartTimestampMonotonic"))
        ready = _number(svc.get("ActiveEnterTimestampMonotonic"))
        if not start or not ready or ready < start:
            return
        self._remember(round((ready - start) / 1e6, 1))

    def _remember(self, seconds: float) -> None:
        if seconds != self.expected_load_s:
            self.expected_load_s = seconds
            self._write_load(seconds)

    def _read_load(self) -> float | None:
        if self.state_file is None:
            return None
        try:
            value = json.loads(self.state_file.read_text()).get("seconds")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else None

    def _write_load(self, seconds: float) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"seconds": seconds, "at": round(time.time(), 3)}))
            os.replace(tmp, self.state_file)
        except OSError:
            pass   # only a hint for the page


def _number(value: Any) -> float | None:
    """A finite number from a JSON value or a systemd property string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
