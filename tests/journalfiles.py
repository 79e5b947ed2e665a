"""Real journal files with chosen contents, for the tests and the benchmark of `e2vd report`.

`Journal` collects entries (field -> value) at chosen times and writes them, sorted by time, in
journal export format to `systemd-journal-remote --output=FILE.journal -`: the result is a real
journal file that sd-journal (and so `journal.Reader`, `journalctl --file`) reads like any other.

`Machine` writes what systemd 252 and e2vd write on one machine, with the fields seen in a real
box (tests/sdbox.py): boots, and runs of e2vd.service — systemd's "Starting" record when a
connection (or the warmup timer) asks for the daemon, e2vd's start / device_chosen / model_loaded
/ request / keep_warm / idle_exit / stopped events, systemd's "Started", "Deactivated
successfully", "Main process exited, code=killed", "Failed with result" records. A run's timing
follows the daemon's rules (e2vd/lifecycle.py): it exits idle_timeout after the latest of ready,
the keep-warm deadline and the end of its last request. `Machine.serve` groups arrivals into runs
by those rules, the way socket activation would.

Times are Unix seconds (floats, at most 6 decimals); the journal stores microseconds.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

JOURNAL_REMOTE = shutil.which("systemd-journal-remote") or "/lib/systemd/systemd-journal-remote"

MESSAGE_IDS = {
    "starting": "7d4958e842da4a758f6c1cdc7b36dcc5",
    "started": "39f53479d3a045ac8e11786248231fbf",
    "stopping": "de5b426a63be47a7b6ac3eaac82e2f6f",
    "stopped": "9d1aaa27d60140bd96365438aad20286",
    "exited": "98e322203f7a4ed290d09fe03c09fe15",
    "deactivated": "7ad2d189f7e94e70a38c781354912448",
    "failed": "d9b373ed55a64feb8242e02dbe79a49c",
    "resources": "ae8f7b866b0347b9af31fe1c80b127c0",
}


def unavailable_reason() -> str | None:
    """Why journal files cannot be written here, or None."""
    if not os.access(JOURNAL_REMOTE, os.X_OK):
        return "systemd-journal-remote is missing (apt-get install systemd-journal-remote)"
    return None


def us(t: float) -> int:
    """Unix seconds -> integer microseconds (the journal's resolution)."""
    return round(t * 1_000_000)


def _encode(fields: Mapping[str, object]) -> bytes:
    """One entry in journal export format (binary-safe form for values with a newline)."""
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out + b"\n")


@dataclass
class Boot:
    """One boot of a machine: its id and when it began (Unix seconds)."""

    id: str
    at: float


class Journal:
    """Entries in memory, written as one real journal file by `write`."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, t: float, boot: Boot, fields: Mapping[str, object]) -> None:
        """An entry at Unix time `t` during `boot` (realtime, monotonic and boot id are set here)."""
        head = {"__REALTIME_TIMESTAMP": us(t), "__MONOTONIC_TIMESTAMP": max(0, us(t) - us(boot.at)),
                "_BOOT_ID": boot.id}
        self._entries.append((us(t), len(self._entries), _encode({**head, **fields})))

    def drop(self, contains: bytes) -> int:
        """Remove the entries whose export text contains `contains` (e.g. b"E2VD_EVENT=start\n",
        as if rotated away); returns how many."""
        before = len(self._entries)
        self._entries = [e for e in self._entries if contains not in e[2]]
        return before - len(self._entries)

    def export(self) -> bytes:
        """All entries in journal export format, oldest first."""
        return b"".join(e[2] for e in sorted(self._entries))

    def write(self, path: str | Path) -> Path:
        """Write the entries as the journal file `path` (must end in .journal; replaced if present).
        Like journald, systemd-journal-remote rotates a full file: the older entries then lie in
        files `STEM@....journal` beside it, and a reader wants the whole directory (-D)."""
        path = Path(path)
        path.unlink(missing_ok=True)
        for old in path.parent.glob(path.stem + "@*.journal"):
            old.unlink()
        cp = subprocess.run([JOURNAL_REMOTE, f"--output={path}", "-"], input=self.export(),
                            capture_output=True)
        if cp.returncode != 0 or not path.exists():
            raise RuntimeError(f"systemd-journal-remote failed ({cp.returncode}): {cp.stderr.decode()[-2000:]}")
        return path


@dataclass
class Req:
    """A request as a client makes it: arrives at `at` (connect), the daemon works `service`
    seconds on it once the model is ready. `infer` is the inference part (default: all of it)."""

    at: float
    service: float = 1.8
    audio: float = 3.0
    status: int = 200
    uid: int = 1000
    path: str = "/v1/recognize"
    infer: float | None = None
    batch: int = 1
    hold: float | None = None      # a warmup (POST /v1/warmup?hold=...): seconds to keep warm


def warmup(at: float, hold: float, uid: int = 0) -> Req:
    """The warmup timer's request at `at`, asking to stay warm `hold` seconds."""
    return Req(at, 0.0, audio=0.0, uid=uid, path="/v1/warmup", hold=hold)


@dataclass
class SimRun:
    """What one simulated run did (Unix seconds), for the tests' own checks."""

    connect: float
    start: float
    ready: float | None
    end: float | None          # the e2vd exit event, or systemd's record; None when lost
    pid: int
    boot: Boot
    invocation: str
    requests: list[Req] = field(default_factory=list)
    keep_until: float | None = None

    @property
    def alive(self) -> float | None:
        return None if self.end is None else self.end - self.start


class Machine:
    """One machine's journal as systemd 252 and e2vd write it (see the module docstring)."""

    def __init__(self, journal: Journal | None = None, unit: str = "e2vd.service",
                 instance: str | None = None, hostname: str = "gpu1") -> None:
        self.journal = journal if journal is not None else Journal()
        self.unit, self.instance, self.hostname = unit, instance, hostname
        self.machine_id = uuid.uuid4().hex
        self.current: Boot | None = None
        self._pid = 300

    # --- records ---
    def _common(self) -> dict[str, object]:
        return {"_MACHINE_ID": self.machine_id, "_HOSTNAME": self.hostname, "_RUNTIME_SCOPE": "system"}

    def systemd(self, t: float, kind: str, message: str, invocation: str | None, unit: str | None = None,
                **extra: object) -> None:
        """A record of PID 1 about the unit: `kind` is a key of MESSAGE_IDS."""
        assert self.current is not None, "boot() first"
        unit = unit or self.unit
        fields: dict[str, object] = {
            **self._common(), "PRIORITY": 4 if kind in ("exited", "failed") else 6, "SYSLOG_FACILITY": 3,
            "SYSLOG_IDENTIFIER": "systemd", "_PID": 1, "_UID": 0, "_GID": 0, "_COMM": "systemd",
            "_EXE": "/usr/lib/systemd/systemd", "_CMDLINE": "/sbin/init", "_TRANSPORT": "journal",
            "_SYSTEMD_CGROUP": "/init.scope", "_SYSTEMD_UNIT": "init.scope", "_SYSTEMD_SLICE": "-.slice",
            "CODE_FILE": "src/core/unit.c", "CODE_LINE": 5553, "CODE_FUNC": "unit_log_success",
            "MESSAGE_ID": MESSAGE_IDS[kind], "UNIT": unit, "MESSAGE": message, **extra}
        if invocation:
            fields["INVOCATION_ID"] = invocation
        self.journal.add(t, self.current, fields)

    def e2vd(self, t: float, proc: int, invocation: str, event: str | None, message: str,
             unit: str | None = None, **fields: object) -> None:
        """A record of the e2vd daemon with pid `proc` (an event when `event` is given)."""
        assert self.current is not None, "boot() first"
        unit = unit or self.unit
        rec: dict[str, object] = {
            **self._common(), "PRIORITY": 6, "SYSLOG_IDENTIFIER": "e2vd", "LOGGER": "e2vd",
            "THREAD_NAME": "MainThread", "CODE_FILE": "/opt/e2vd/lib/e2vd/daemon.py", "CODE_LINE": 501,
            "CODE_FUNC": "exit_event", "MESSAGE": message, "_PID": proc, "_UID": 61234, "_GID": 61234,
            "_COMM": "e2vd", "_EXE": "/usr/bin/python3.11", "_CMDLINE": "/opt/e2vd/bin/python3 /opt/e2vd/bin/e2vd serve",
            "_CAP_EFFECTIVE": 0, "_SYSTEMD_CGROUP": f"/system.slice/{unit}", "_SYSTEMD_UNIT": unit,
            "_SYSTEMD_SLICE": "system.slice", "_SYSTEMD_INVOCATION_ID": invocation, "_TRANSPORT": "journal",
            "_SOURCE_REALTIME_TIMESTAMP": us(t)}
        if event is not None:
            rec["E2VD_EVENT"] = event
        if self.instance is not None:
            rec["E2VD_INSTANCE"] = self.instance
        for key, value in fields.items():
            if value is not None:
                rec["E2VD_" + key.upper()] = value
        self.journal.add(t, self.current, rec)

    def note(self, t: float, message: str = "cron: session opened") -> None:
        """An unrelated record (another program), e.g. to show the machine was alive at `t`."""
        assert self.current is not None, "boot() first"
        self.journal.add(t, self.current, {**self._common(), "SYSLOG_IDENTIFIER": "CRON", "_PID": 999,
                                           "_COMM": "cron", "_TRANSPORT": "syslog", "MESSAGE": message,
                                           "_SYSTEMD_UNIT": "cron.service"})

    def boot(self, at: float) -> Boot:
        """A new boot beginning at `at`; later records belong to it."""
        self.current = Boot(uuid.uuid4().hex, at)
        self.journal.add(at, self.current, {**self._common(), "SYSLOG_IDENTIFIER": "kernel", "_TRANSPORT": "kernel",
                                            "MESSAGE": "Linux version 6.1.0-28-amd64"})
        self._pid = 300
        return self.current

    # --- one run ---
    def run(self, connect: float, requests: Sequence[Req] = (), *, warmup_hold: float | None = None,
            device: str = "cuda:0", idle_timeout: float = 300.0, start_delay: float = 0.5, load: float = 3.5,
            end: str = "idle", end_at: float | None = None, grace: float = 60.0,
            systemd_records: bool = True, fallback_device: str | None = None) -> SimRun:
        """One activation: asked for at `connect` (systemd's "Starting"), e2vd's start event
        `start_delay` later, the model ready `load` after that. `warmup_hold`: the activation is
        a warmup asking to stay warm that many seconds. `end`: "idle" (idle_exit when the rules
        say), "stopped" (SIGTERM just before end_at, the stopped event at end_at), "killed" (SIGKILL at end_at: only systemd's records),
        "lost" (nothing more: power loss), "unavailable" (the model fails; exit after `grace`).
        `systemd_records=False` leaves out PID 1's records (e.g. a journal that lost them).
        `fallback_device`: the fallback model is loaded there right after the main one (its own
        device_chosen event, then fallback_loaded)."""
        assert self.current is not None, "boot() first"
        self._pid += 17
        pid, inv = self._pid, uuid.uuid4().hex
        sd = self.systemd if systemd_records else (lambda *a, **k: None)
        start = connect + start_delay
        ready = start + load if end != "unavailable" else None
        sd(connect, "starting", "Starting e2vd.service - e2vd speech emotion recognition daemon...", inv)
        self.e2vd(start, pid, inv, "start", f"e2vd 0.1.0 listening on /run/e2vd/e2vd.sock (from systemd)",
                  pid=pid, socket="/run/e2vd/e2vd.sock", socket_activated="true", model="iic/emotion2vec_plus_large",
                  device="auto", idle_timeout_seconds=float(idle_timeout))
        self.e2vd(start + 0.25, pid, inv, "device_chosen", f"Using {device}", device=device,
                  reason="most free memory", min_free_mb=2048)
        run = SimRun(connect, start, ready, None, pid, self.current, inv)
        if ready is None:
            fail = start + load
            self.e2vd(fail, pid, inv, "model_unavailable", "the model could not be loaded", error="boom",
                      grace_seconds=grace)
            run.end = fail + grace
            self.e2vd(run.end, pid, inv, "exit_unavailable", "exiting: the model is unavailable", error="boom",
                      grace_seconds=grace)
            sd(run.end + 0.2, "exited", "e2vd.service: Main process exited, code=exited, status=5/NOTINSTALLED",
               inv, EXIT_CODE="exited", EXIT_STATUS=5, COMMAND="ExecStart")
            sd(run.end + 0.2, "failed", "e2vd.service: Failed with result 'exit-code'.", inv)
            return run
        self.e2vd(ready, pid, inv, "model_loaded", f"model loaded on {device}", model="iic/emotion2vec_plus_large",
                  device=device, dtype="fp32", load_seconds=load, memory_bytes=1_450_000_000)
        sd(ready + 0.0005, "started", "Started e2vd.service - e2vd speech emotion recognition daemon.", inv)
        if fallback_device is not None:
            self.e2vd(ready + 0.1, pid, inv, "device_chosen", f"Using {fallback_device}", device=fallback_device,
                      reason="fallback_device", min_free_mb=2048)
            self.e2vd(ready + 0.2, pid, inv, "fallback_loaded", f"fallback model loaded on {fallback_device}",
                      model="/srv/models/base", device=fallback_device, load_seconds=0.1)
        busy = -1.0
        reqs = sorted(([warmup(connect, warmup_hold)] if warmup_hold is not None else []) + list(requests),
                      key=lambda r: r.at)
        for r in reqs:
            begin = max(r.at, start)
            served = max(begin, ready)
            if r.hold is not None:             # hold() is called when the request is read
                run.keep_until = max(run.keep_until or -1.0, begin + r.hold)
                self.e2vd(begin, pid, inv, "keep_warm", f"keeping the model warm for {r.hold:g} s",
                          hold_seconds=float(r.hold), capped="false")
                done = served + 0.001           # answered once the model is ready
            else:
                done = served + r.service
            self._request(pid, inv, done, begin, served, r)
            run.requests.append(r)
            busy = max(busy, done)
        if end == "idle":
            run.end = max(ready, run.keep_until or -1.0, busy) + idle_timeout
            self.e2vd(run.end, pid, inv, "idle_exit", "idle: exiting", alive_seconds=round(run.end - start, 6),
                      requests_served=len(run.requests), idle_timeout_seconds=float(idle_timeout))
            sd(run.end + 0.3, "deactivated", "e2vd.service: Deactivated successfully.", inv)
            sd(run.end + 0.3, "resources", "e2vd.service: Consumed 4.2s CPU time.", inv)
        elif end == "stopped":
            assert end_at is not None
            sd(end_at - 0.05, "stopping", "Stopping e2vd.service - e2vd speech emotion recognition daemon...", inv)
            self.e2vd(end_at - 0.049, pid, inv, "stopping", "SIGTERM: finishing 0 request(s) in flight",
                      signal="SIGTERM", in_flight=0, queued=0)
            run.end = end_at
            self.e2vd(run.end, pid, inv, "stopped", "stopped by SIGTERM", signal="SIGTERM",
                      alive_seconds=round(run.end - start, 6), requests_served=len(run.requests))
            sd(run.end + 0.3, "deactivated", "e2vd.service: Deactivated successfully.", inv)
            sd(run.end + 0.3, "stopped", "Stopped e2vd.service - e2vd speech emotion recognition daemon.", inv)
        elif end == "killed":
            assert end_at is not None
            run.end = end_at
            sd(end_at, "exited", "e2vd.service: Main process exited, code=killed, status=9/KILL", inv,
               EXIT_CODE="killed", EXIT_STATUS=9, COMMAND="ExecStart")
            sd(end_at + 0.0001, "failed", "e2vd.service: Failed with result 'signal'.", inv)
        elif end != "lost":
            raise ValueError(f"unknown end {end!r}")
        return run

    def _request(self, pid: int, inv: str, done: float, begin: float, served: float, r: Req) -> None:
        total_ms = round((done - begin) * 1000, 6)
        queue_ms = round((served - begin) * 1000, 6)
        infer = r.service if r.infer is None else r.infer
        recognize = r.path == "/v1/recognize" and r.status == 200
        self.e2vd(done, pid, inv, "request", f"POST {r.path} -> {r.status}", request_id=f"{us(done):x}",
                  client_uid=r.uid, client_pid=4242, method="POST", path=r.path, status=r.status,
                  total_ms=total_ms, body_bytes=96044 if recognize else None, read_ms=0.2 if recognize else None,
                  audio_seconds=r.audio if recognize else None, decode_ms=0.7 if recognize else None,
                  wait_ms=queue_ms if recognize else None, queue_ms=queue_ms if recognize else None,
                  infer_ms=round(infer * 1000, 6) if recognize else None, batch_size=r.batch if recognize else None,
                  top_label="neutral" if recognize else None, top_score=0.61 if recognize else None,
                  hold_seconds=r.hold)

    # --- many runs ---
    def serve(self, arrivals: Iterable[Req], *, idle_timeout: float = 300.0, start_delay: float = 0.5,
              load: float = 3.5, device: str = "cuda:0") -> list[SimRun]:
        """Group `arrivals` (requests and warmups) into runs by the daemon's rules and write them:
        a connection at or after the running daemon's exit starts a new one."""
        groups: list[list[Req]] = []
        exit_at = -1.0
        for r in sorted(arrivals, key=lambda r: r.at):
            if not groups or r.at >= exit_at:
                groups.append([])
                start = r.at + start_delay
                ready = start + load
                keep = busy = -1.0
            groups[-1].append(r)
            begin = max(r.at, start)
            if r.hold is not None:
                keep = max(keep, begin + r.hold)
                busy = max(busy, max(begin, ready) + 0.001)
            else:
                busy = max(busy, max(begin, ready) + r.service)
            exit_at = max(ready, keep, busy) + idle_timeout
        return [self.run(g[0].at, g, device=device, idle_timeout=idle_timeout, start_delay=start_delay,
                         load=load) for g in groups]
