"""What the daemon says about itself (docs/design.md, the lifecycle): `Report` answers
GET /v1/status and writes the STATUS= lines systemd shows; `Events` writes its journal events
(start, model_loaded, model_unavailable, keep_warm, and the one event that says why it exits:
idle_exit, stopped, exit_unavailable, inference_stuck). Both read a `e2vd.daemon.Daemon`'s state
and change nothing.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from e2vd import __version__, systemd
from e2vd.lifecycle import Hold, Reason
from e2vd.log import event
from e2vd.vocabulary import State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.daemon import Daemon


def engine_memory(engine: Any, on_error: Callable[[Exception], object]) -> dict[str, int]:
    """The `memory` of GET /v1/status (the daemon's, and a Ray Serve replica's): engine.memory()
    as a dict, {} before there is an engine. Status must answer even if the probe fails: then {},
    and the exception goes to `on_error` (each says it its own way)."""
    if engine is None:
        return {}
    try:
        return dict(engine.memory())
    except Exception as exc:
        on_error(exc)
        return {}


class Report:
    """What the daemon says about itself to those who ask: GET /v1/status and STATUS= lines."""

    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon
        self._last_line = ""

    def wall(self, mono: float) -> float:
        """A time on the daemon's monotonic clock as a Unix time (rounded to ms)."""
        return round(time.time() + (mono - self.d.clock()), 3)

    def document(self, now: float) -> dict[str, Any]:
        """The JSON of GET /v1/status (deadlines as Unix times, *_in_s as seconds from now). The
        idle deadline is the one that holds if the request asking (and all other work) ended now."""
        d, s, sch, lc = self.d, self.d.settings, self.d.scheduler, self.d.lifecycle
        engine = sch.engine
        memory = engine_memory(engine, lambda exc: event("memory_probe_failed", f"engine.memory() failed: {exc}"))
        idle_at = lc.deadline(now, if_idle_now=True) if lc.phase is State.READY else None
        keep = lc.keep_warm_until(now)
        return {
            "state": "stopping" if d.exiting else sch.state,
            "model": getattr(engine, "model_id", None) or s.model,
            "device": getattr(engine, "device", None),
            "dtype": getattr(engine, "dtype", None) or s.dtype,
            "memory": memory,
            "queue_depth": sch.pending,
            "queue_size": sch.queue_size,
            "connections": d.server.connections,
            "requests_served": d.server.requests_served,
            "uptime_s": round(now - d.started, 3),
            "load_seconds": getattr(engine, "load_seconds", None),
            "idle_timeout_s": s.idle_timeout,
            "idle_deadline": None if idle_at is None else self.wall(idle_at),
            "idle_exit_in_s": None if idle_at is None else round(max(0.0, idle_at - now), 3),
            "keep_warm_deadline": None if keep is None else self.wall(keep),
            "inference_running_s": self.inference_age(now),
            "inference_timeout_s": s.inference_timeout,
            "error": sch.error,
            "fallback": self.fallback(),
            "socket": d.listener.path,
            "socket_activated": d.listener.from_systemd,
            "pid": os.getpid(),
            "version": __version__,
        }

    def fallback(self) -> dict[str, Any] | None:
        """The fallback model's part of GET /v1/status: None when no fallback_model is set; its
        state is None until a request first needs it, then loading, ready or unavailable."""
        fb = self.d.deciding.fallback
        if fb is None:
            return None
        state = fb.state
        return {"model": fb.model, "below": fb.below, "state": None if state is None else State(state).value,
                "error": fb.error}

    def inference_age(self, now: float) -> float | None:
        """Seconds the model call in progress has run (ms precision), or None when there is none:
        the call the watchdog watches (the main model's or the fallback's, the older one)."""
        age = self.d.watchdog.age(now, getattr(self.d.deciding.running, "started", None))
        return None if age is None else round(age, 3)

    def new_line(self, now: float, *, always: bool = False) -> str | None:
        """The STATUS= line at `now` when it differs from the last one returned here (or
        `always`), else None: systemd is told only what changed."""
        line = self.line(now)
        if line == self._last_line and not always:
            return None
        self._last_line = line
        return line

    def line(self, now: float) -> str:
        """The STATUS= line: what the daemon is doing now."""
        d, s, sch, lc = self.d, self.d.settings, self.d.scheduler, self.d.lifecycle
        if d.exiting:
            return f"Stopping: finishing {d.server.active} request(s)"
        if lc.phase is State.LOADING:
            return (f"Loading model {s.model} (device {s.device}) for {math.floor(now - d.started)} s "
                    f"(load_timeout {s.load_timeout:g} s)")
        at = lc.deadline(now)
        if lc.phase is State.UNAVAILABLE:
            return f"Model unavailable: {sch.error}; exiting in {max(0, math.ceil((at or now) - now))} s"
        head = f"Ready on {getattr(sch.engine, 'device', '?')}: {d.server.requests_served} request(s) served"
        keep = lc.keep_warm_until(now)
        if lc.held(now):
            busy = f"{head}; busy ({sch.pending} in progress, {d.server.holding(now).count} connection(s))"
            age = self.inference_age(now)
            if age is not None:
                busy += f"; inference running {math.floor(age)} s (inference_timeout {s.inference_timeout:g} s)"
            return busy
        if keep is not None:
            return f"{head}; kept warm until {time.strftime('%H:%M:%S', time.localtime(self.wall(keep)))}"
        if at is not None:
            return f"{head}; idle exit in {max(0, math.ceil(at - now))} s"
        return head

    def farewell(self, reason: Reason) -> str:
        """The STATUS= line sent with STOPPING=1."""
        served = self.d.server.requests_served
        if reason is Reason.IDLE:
            return f"Idle exit after {served} request(s)"
        if reason is Reason.UNAVAILABLE:
            return f"Model unavailable: {self.d.scheduler.error}"
        if reason is Reason.STUCK:
            return f"Stuck: {self.stuck_text()}; ending the process"
        return f"Stopping: finishing {self.d.server.active} request(s)"

    def stuck_text(self) -> str:
        """What the stuck model call is, where, and how long it has run."""
        d, call = self.d, self.d.stuck
        if call is None:
            return "no model call is running"
        age = d.watchdog.age(d.clock(), call.started) or 0.0
        return (f"inference of {call.describe()} on {call.device} has run {age:.1f} s, past "
                f"inference_timeout = {d.settings.inference_timeout:g} s")


class Events:
    """The daemon's journal events (e2vd.log.event), each with its fields (README "Journal fields")."""

    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon

    def stopping(self, signame: str | None) -> None:
        """stopping, when a signal asked the daemon to stop (none for other reasons)."""
        d = self.d
        if signame is not None:
            event("stopping", f"{signame}: finishing {d.server.active} request(s) in flight "
                              f"(at most {d.settings.drain_timeout:g} s)", signal=signame,
                  in_flight=d.server.active, queued=d.scheduler.pending)

    def drain_abandoned(self) -> None:
        d = self.d
        event("drain_abandoned", f"stopping with {d.server.active} request(s) unfinished",
              logging.WARNING, in_flight=d.server.active, queued=d.scheduler.pending)

    def keep_warm(self, hold: Hold) -> None:
        """keep_warm, for a hold that was granted (none for 0 s)."""
        if hold.granted > 0:
            event("keep_warm", f"keeping the model warm for {hold.granted:g} s", hold_seconds=hold.granted,
                  capped=hold.capped)

    def start(self) -> None:
        d, s = self.d, self.d.settings
        event("start", f"e2vd {__version__} listening on {d.listener.path}"
                       f"{' (from systemd)' if d.listener.from_systemd else ''}; loading {s.model}",
              socket=d.listener.path, socket_activated=d.listener.from_systemd, model=s.model,
              device=s.device, pid=os.getpid(), idle_timeout_seconds=s.idle_timeout)

    def model_loaded(self) -> None:
        """The model_loaded event: everything about the load in one record (worker thread)."""
        engine, s = self.d.scheduler.engine, self.d.settings
        memory: dict[str, int] = {}
        try:
            memory = dict(engine.memory()) if engine is not None else {}
        except Exception:  # the event must not fail the load
            pass
        model = getattr(engine, "model_id", s.model)
        source = getattr(engine, "model_dir", None)
        how = getattr(engine, "dtype", "?") + (" (int8-quantized)" if getattr(engine, "quantized", False) else "")
        event("model_loaded", f"model {model}{f' from {source}' if source and str(source) != model else ''} "
                              f"loaded on {getattr(engine, 'device', '?')} as {how} in "
                              f"{getattr(engine, 'load_seconds', 0.0):.1f} s",
              model=model, device=getattr(engine, "device", None), dtype=getattr(engine, "dtype", None),
              load_seconds=getattr(engine, "load_seconds", None),
              memory_bytes=memory.get("cuda_allocated_bytes", memory.get("param_bytes")),
              **{f"memory_{k}": v for k, v in memory.items()})

    def model_unavailable(self, loading: bool) -> None:
        s, error = self.d.settings, self.d.scheduler.error
        what = "could not be loaded" if loading else "is no longer usable"
        event("model_unavailable", f"the model {s.model} {what}: {error}; answering 503 for "
                                   f"{s.unavailable_grace:g} s, then exiting", logging.ERROR,
              model=s.model, error=error, grace_seconds=s.unavailable_grace)

    def exit_event(self, reason: Reason, signame: str | None) -> None:
        """The one journal event that says why the daemon exits: idle_exit, stopped, exit_unavailable
        or inference_stuck."""
        s, served = self.d.settings, self.d.server.requests_served
        alive = round(self.d.clock() - self.d.started, 3)
        if reason is Reason.STUCK:
            self.stuck(alive, served)
        elif reason is Reason.IDLE:
            event("idle_exit", f"idle for {s.idle_timeout:g} s: exiting after {alive:.0f} s alive, "
                               f"{served} request(s) served",
                  alive_seconds=alive, requests_served=served, idle_timeout_seconds=s.idle_timeout)
        elif reason is Reason.SIGNAL:
            event("stopped", f"stopped by {signame} after {alive:.0f} s alive, {served} request(s) served",
                  signal=signame, alive_seconds=alive, requests_served=served)
        else:
            error = self.d.scheduler.error
            event("exit_unavailable", f"exiting after {s.unavailable_grace:g} s: the model is unavailable "
                                      f"({error})", logging.ERROR,
                  model=s.model, error=error, grace_seconds=s.unavailable_grace)

    def stuck(self, alive: float, served: int) -> None:
        """inference_stuck: which model call, on which device, for how long; what is left waiting."""
        d, call = self.d, self.d.stuck
        age = None if call is None else d.watchdog.age(d.clock(), call.started)
        how = ("systemd's watchdog ends the process (WATCHDOG=trigger); the next connection starts a fresh daemon"
               if systemd.notifying() else "the process ends with exit code 5")
        event("inference_stuck", f"{self.d.report.stuck_text()}: the inference worker is stuck (a wedged GPU or driver, "
                                 f"or a call far slower than expected); {how}. Clients waiting on it see their "
                                 f"connection close.", logging.CRITICAL,
              jobs=None if call is None else ",".join(map(str, call.jobs)),
              clips=None if call is None else len(call.jobs),
              audio_seconds=None if call is None else round(sum(call.audio_seconds), 3),
              granularity=None if call is None else call.granularity,
              device=None if call is None else call.device,
              running_seconds=None if age is None else round(age, 3),
              inference_timeout_seconds=d.settings.inference_timeout,
              in_flight=d.server.active, queued=max(0, d.scheduler.pending - (len(call.jobs) if call else 0)),
              alive_seconds=alive, requests_served=served)
