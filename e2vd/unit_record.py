"""What systemd records about e2vd's units, for people: `systemctl show`, the journal's last error,
and why requests cannot reach the daemon, in words with the commands that fix it.

Only reads: nothing here starts, stops or connects to anything, so asking never wakes the
daemon. Used by `e2vd status` and by every command that finds the daemon unreachable
(e2vd.cli). A failed e2vd.socket (e.g. `trigger-limit-hit`: its service failed each time it was
started, too often in a row) is explained from its own Result, the service's Result and exit
status, and the service's last error line in the journal, instead of a generic "not listening".
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Sequence

SERVICE, SOCKET_UNIT = "e2vd.service", "e2vd.socket"
SHOW_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "MainPID", "StatusText",
              "ActiveEnterTimestamp", "Result", "Listen", "ExecMainCode", "ExecMainStatus", "InvocationID")
#: Longest journal line quoted in a message (characters).
MAX_QUOTE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: systemd's Result= values in words: what happened to the unit.
RESULT_WORDS: dict[str, str] = {
    "exit-code": "its process exited with an error",
    "signal": "its process was killed by a signal",
    "core-dump": "its process crashed (core dump)",
    "watchdog": "its watchdog ended it (a stuck inference past inference_timeout, or the daemon stopped "
                "answering systemd)",
    "timeout": "it did not start (or stop) in time",
    "resources": "systemd could not set it up (a missing executable, directory or user)",
    "start-limit-hit": "it was started too often in a row",
    "trigger-limit-hit": "its service failed each time it was started, too often in a row, so systemd "
                         "stopped activating it",
    "protocol": "it broke systemd's start-up protocol",
    "exec-condition": "its ExecCondition= failed",
    "oom-kill": "the kernel's out-of-memory killer ended it",
    "service-start-limit-hit": "its service was started too often in a row",
}


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

    @property
    def failed(self) -> bool:
        """The unit is in the failed state, or its last run ended with a Result other than success."""
        return self.get("ActiveState") == "failed" or self.get("Result") not in ("", "success")

    def listens_on(self, path: str) -> bool:
        """Whether a Listen= entry of this (socket) unit is `path` ("PATH (Stream)")."""
        return any(entry.rsplit(" (", 1)[0] == path for entry in self.listen)


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
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10)
    except FileNotFoundError:
        return "systemctl is not installed here"
    except subprocess.TimeoutExpired:
        return "systemctl did not answer within 10 s"
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split()) or f"systemctl exited {proc.returncode}"
        return f"systemd cannot be asked ({why})"
    return parse_systemctl_show(proc.stdout)


def last_error(unit: UnitState, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """The last line at priority err or worse that the journal holds for `unit`'s last run (its
    own processes' and systemd's about it, without systemd's "Failed to start" job line), cut to
    MAX_QUOTE characters with control characters escaped; None when there is none or the
    journal cannot be read (not root, nor in group systemd-journal or adm)."""
    inv = unit.get("InvocationID")
    match = [f"_SYSTEMD_INVOCATION_ID={inv}", "+", f"INVOCATION_ID={inv}"] if inv else ["-u", unit.id]
    cmd = ["journalctl", "--no-pager", "-q", "-o", "json", "-p", "err", "-n", "50", *match]
    try:
        proc = run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in reversed(proc.stdout.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or "JOB_RESULT" in entry:
            continue
        message = entry.get("MESSAGE")
        if isinstance(message, list):   # journalctl writes non-UTF-8 messages as byte arrays
            message = bytes(b for b in message if isinstance(b, int) and 0 <= b < 256).decode("utf-8", "replace")
        if isinstance(message, str) and message.strip():
            text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(message.split()))
            return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE - 1] + "…"
    return None


def how_it_ended(unit: UnitState) -> str:
    """The unit's last Result in words, with the exit status or signal when systemd has one."""
    result = unit.get("Result")
    words = f"{result}: {RESULT_WORDS.get(result, 'it failed')}"
    code, status = unit.get("ExecMainCode"), unit.get("ExecMainStatus")
    if status not in ("", "0") and code == "1":                  # CLD_EXITED
        words += f" (exit status {status})"
    elif status not in ("", "0") and code in ("2", "3"):         # CLD_KILLED, CLD_DUMPED
        try:
            words += f" ({signal.Signals(int(status)).name})"
        except ValueError:
            words += f" (signal {status})"
    return words


def service_trouble(svc: UnitState, error: str | None) -> str:
    """One line on a failed e2vd.service: how it ended and its last error line."""
    line = f"last run failed, {how_it_ended(svc)}"
    return line + (f"; its last error: {error!r}" if error else "; see `journalctl -u e2vd`")


def socket_fix(sock: UnitState) -> str:
    """What to run for an e2vd.socket that is not active: reset and start it when it failed, else
    enable and start it."""
    if sock.failed:
        return (f"fix the cause (`e2vd check-config` checks the settings), then run `sudo systemctl "
                f"reset-failed {SOCKET_UNIT} {SERVICE} && sudo systemctl start {SOCKET_UNIT}`")
    return f"start it: `sudo systemctl enable --now {SOCKET_UNIT}`"


def unreachable_reason(units: dict[str, UnitState], socket_path: str,
                       error_of: Callable[[UnitState], str | None] = last_error) -> str | None:
    """Why a client cannot reach the daemon on `socket_path` as systemd records it, with what to
    run; None when e2vd.socket is not installed, listens elsewhere, or is active (then systemd has
    nothing to say and the client's own message stands)."""
    sock, svc = units.get(SOCKET_UNIT), units.get(SERVICE)
    if sock is None or not sock.loaded or sock.active or (sock.listen and not sock.listens_on(socket_path)):
        return None
    if not sock.failed:
        return (f"{SOCKET_UNIT} is {sock.get('ActiveState')} ({sock.get('SubState')}), so nothing listens "
                f"on {socket_path}; {socket_fix(sock)}")
    text = f"{SOCKET_UNIT} has failed, {how_it_ended(sock)}"
    if svc is not None and svc.loaded and svc.failed:
        text += f". {SERVICE}: {service_trouble(svc, error_of(svc))}"
    return f"{text}. Requests cannot reach the daemon until it listens again: {socket_fix(sock)}"
