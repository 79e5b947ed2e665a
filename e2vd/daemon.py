"""The daemon: its socket, the main loop, what it tells systemd, and its one way out.

`main(overrides, config_path)` is `e2vd serve`. In order:
1. settings (defaults < toml < E2VD_* < flags), then logging — before anything imports funasr;
2. the listening socket: the one systemd passes (`e2vd.systemd.listen_socket`), else `socket`
   bound by us (mode 0660; a stale socket file nobody answers on is replaced, a live one refused);
3. accept at once while the worker thread loads the model (EXTEND_TIMEOUT_USEC every
   EXTEND_EVERY_S meanwhile). The load-finished event itself — the scheduler's `on_state`
   callback, on the worker thread, before the worker takes any job — sends READY=1 and waits
   until systemd has read it, so no answer that needs the model leaves before `systemctl
   is-active e2vd` says active. STATUS= lines follow what the daemon does;
4. when to exit is the `e2vd.lifecycle.LifecycleClock`'s decision. The main loop tells it what
   holds the daemon awake — jobs queued or running, and connections inside a request or used
   within connection_timeout (`Server.holding`) — and sleeps until its deadline or an event;
5. one shutdown path for every reason (idle, SIGTERM/SIGINT, unavailable model): stop accepting,
   close our fd (from systemd: never unlink, never shutdown()), STOPPING=1, close idle
   connections and let requests in flight finish within drain_timeout (a second signal cuts
   that short), one journal event naming the reason (idle_exit, stopped, exit_unavailable).

The main thread waits on one selector holding the listening socket and a wake-up socket written
to by the signal handlers (signal.set_wakeup_fd), the worker thread (model loaded or failed) and
connection threads (a request ended, a connection closed); with nothing happening it sleeps until
the clock's deadline, at most STATUS_EVERY_S. The design is in docs/design.md.

Exit codes (`e2vd.vocabulary.ExitCode`): 0 idle exit or stopped by a signal; 2 bad configuration
(ConfigError, which `main` lets through to `e2vd.cli.main` like every command's errors); 5 cannot
listen on the socket (SocketError's own code, after its journal event) or the model is unavailable.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import selectors
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from e2vd import __version__, systemd
from e2vd.lifecycle import LifecycleClock, Reason
from e2vd.log import event
from e2vd.scheduler import Scheduler
from e2vd.server import Server
from e2vd.systemd import SocketError
from e2vd.vocabulary import ExitCode, State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.config import Settings
    from e2vd.engine import Engine

__all__ = ["Daemon", "Listener", "SocketError", "bind_socket", "main", "open_listener"]

STATUS_EVERY_S = 1.0    # longest sleep of the main loop: STATUS= countdowns; jobs that end without an event
EXTEND_EVERY_S = 5.0    # EXTEND_TIMEOUT_USEC cadence while the model loads ...
EXTEND_BY_S = 30.0      # ... each one: the start timeout ends no sooner than this from now
DRAIN_POLL_S = 0.1      # while draining: how often queued jobs are looked at (requests wake us)
SOCKET_MODE = 0o660


# --- the socket ---------------------------------------------------------------------------------

def bind_socket(path: str) -> socket.socket:
    """Bind and listen on `path` (mode 0660). A stale socket file is replaced; a live one is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketError(f"{path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            event("socket_stale", f"removing stale socket {path} (nothing answers on it)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise SocketError(f"cannot tell whether {path} is in use ({exc}); remove it if no daemon runs") from None
        else:
            raise SocketError(f"another process is already listening on {path}; stop it "
                              "(e.g. `systemctl stop e2vd.socket e2vd.service`) or choose another --socket")
        finally:
            probe.close()
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SocketError(f"the socket's directory {parent} does not exist; create it or choose another --socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot listen on {path}: {exc.strerror or exc}; check the directory's "
                          "permissions or choose another --socket") from None
    return sock


@dataclass
class Listener:
    """The listening socket and where it came from."""

    sock: socket.socket
    path: str
    from_systemd: bool
    inode: int | None = None

    def accept_waiting(self) -> Iterator[socket.socket]:
        """The connections waiting in the backlog now (blocking sockets); never blocks itself."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving what we have
                event("accept_failed", f"accept() failed: {exc}")
                return
            conn.setblocking(True)
            yield conn

    def last_call(self) -> list[socket.socket]:
        """Before an idle exit: the connections that came at the last moment, which must be served
        instead when we bound the socket ourselves (nobody keeps it after we close it). From
        systemd: none (they wait in its backlog and start the next daemon)."""
        return [] if self.from_systemd else list(self.accept_waiting())

    def close(self) -> None:
        """Close our fd. From systemd: only that (the socket stays in systemd's hands, never
        unlinked, never shutdown()). Bound by us: also remove the file if it is still ours."""
        self.sock.close()
        if self.from_systemd or self.inode is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def open_listener(path: str) -> Listener:
    """The socket from systemd when passed, else `path` bound by us."""
    sock = systemd.listen_socket()
    if sock is not None:
        name = sock.getsockname()
        return Listener(sock, name if isinstance(name, str) and name else path, from_systemd=True)
    sock = bind_socket(path)
    return Listener(sock, path, from_systemd=False, inode=os.lstat(path).st_ino)


class Waiter:
    """What the main thread sleeps on: the listening socket, and a wake-up socket pair that
    signals (through set_wakeup_fd) and other threads (`wake`) write to. It also counts the main
    loop's looks at its clocks, so another thread can wait for the next one (`look`)."""

    def __init__(self, listening: socket.socket) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        listening.setblocking(False)
        self._listening = listening
        self._sel = selectors.DefaultSelector()
        self._sel.register(listening, selectors.EVENT_READ)
        self._sel.register(self._r, selectors.EVENT_READ)
        self._looks = threading.Condition()
        self._begun = self._done = 0

    def wait(self, timeout: float) -> bool:
        """Sleep until woken, until a connection waits, or `timeout` seconds; True when a
        connection waits to be accepted."""
        ready = [key.fileobj for key, _ in self._sel.select(max(0.0, timeout))]
        if self._r in ready:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while self._r.recv(512):
                    pass
        return self._listening in ready

    def stop_accepting(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listening)

    def wake(self) -> None:
        """Wake the main thread (any thread)."""
        with contextlib.suppress(OSError):   # full (a wake-up is pending anyway) or closed
            self._w.send(b"\0")

    @contextlib.contextmanager
    def signals_to(self, handler: Callable[[int, object], None]) -> Iterator[None]:
        """SIGTERM and SIGINT go to `handler` and wake us; the previous handlers and wake-up fd
        are restored after (main thread only)."""
        old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, previous in old.items():
                signal.signal(signum, previous)
            signal.set_wakeup_fd(old_fd)

    @contextlib.contextmanager
    def looking(self) -> Iterator[None]:
        """Around one look of the main loop at its clocks."""
        with self._looks:
            self._begun += 1
            mine = self._begun
        try:
            yield
        finally:
            with self._looks:
                self._done = max(self._done, mine)
                self._looks.notify_all()

    def look(self, timeout: float) -> bool:
        """Wake the main thread and wait until a look that began after this call has ended;
        False after `timeout` seconds."""
        with self._looks:
            target = self._begun + 1
        self.wake()
        with self._looks:
            return self._looks.wait_for(lambda: self._done >= target, timeout)

    def close(self) -> None:
        self._sel.close()
        self._r.close()
        self._w.close()


# --- the daemon ---------------------------------------------------------------------------------

def load_engine(settings: "Settings") -> "Engine":
    """The model as the settings ask for it (runs on the worker thread)."""
    from e2vd.engine import Engine

    s = settings
    return Engine.load(s.model, device=s.device, dtype=s.dtype, quantize=s.quantize,
                       min_free_mb=s.min_free_mb, busy_policy=s.busy_policy, cache_dir=s.cache_dir)


class Daemon:
    """The main loop; implements the `Control` the HTTP layer asks (status, keep-warm hold).

    `load` (default `load_engine`) runs on the worker thread and returns the engine. `clock` is the
    monotonic clock of every lifecycle decision; tests pass one they move by hand, then `look()`.
    `run()` must be called on the main thread (it installs signal handlers)."""

    def __init__(self, settings: "Settings", listener: Listener, *,
                 load: Callable[[], "Engine"] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.listener, self.clock = settings, listener, clock
        self.started = clock()
        self.lifecycle = LifecycleClock(settings.idle_timeout, settings.max_hold, settings.unavailable_grace)
        self.exiting: Reason | None = None   # set by the look that decides to exit
        self._signals: list[int] = []
        self._waiter = Waiter(listener.sock)
        self._next_extend = -math.inf
        self._last_status = ""
        self.scheduler = Scheduler(load or functools.partial(load_engine, settings), queue_size=settings.queue_size,
                                   max_batch=settings.max_batch, on_state=self._on_state)
        self.server = Server(self.scheduler, self, max_body_bytes=settings.max_body_bytes,
                             max_seconds=settings.max_seconds, connection_timeout=settings.connection_timeout,
                             max_connections_per_uid=settings.max_connections_per_uid, clock=clock,
                             on_change=self.wake)
        self.report = Report(self)

    # --- Control (connection threads) ---
    def hold(self, seconds: float) -> tuple[float, float | None]:
        """Keep warm at least `seconds` from now (capped by max_hold, never shortening a longer
        hold); returns (granted seconds, keep-warm deadline as a Unix time or None)."""
        h = self.lifecycle.hold(seconds, self.clock())
        if h.granted > 0:
            event("keep_warm", f"keeping the model warm for {h.granted:g} s", hold_seconds=h.granted,
                  capped=h.capped)
        self.wake()
        return h.granted, None if h.until is None else self.report.wall(h.until)

    def status(self) -> dict[str, Any]:
        """The JSON of GET /v1/status."""
        return self.report.document(self.clock())

    # --- any thread ---
    def wake(self) -> None:
        """Make the main loop look at its clocks now."""
        self._waiter.wake()

    def look(self, timeout: float = 30.0) -> bool:
        """Wake the main loop and wait until it has looked at its clocks once after this call
        (for tests and tools that move an injected clock); `exiting` then says whether it decided
        to exit. False after `timeout` seconds."""
        return self._waiter.look(timeout)

    def _on_state(self, state: str) -> None:
        """The scheduler's on_state (worker thread, before it takes any job): READY=1 once
        systemd has it, or the start of the unavailable grace; then wake the main loop."""
        now = self.clock()
        if state == State.READY:
            self.lifecycle.loaded(now)
            self.report.model_loaded()
            self._last_status = self.report.line(now)
            systemd.ready(self._last_status)
        elif state == State.UNAVAILABLE:
            self.report.model_unavailable(loading=self.lifecycle.phase is State.LOADING)
            self.lifecycle.failed(now)
        self.wake()   # the main loop sends the STATUS= line and runs the grace clock

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    # --- main thread ---
    def run(self) -> int:
        """Serve until idle exit, a signal, or the end of the unavailable grace; returns the exit code."""
        try:
            with self._waiter.signals_to(self._on_signal):
                self.report.start()
                self.scheduler.start()
                while True:
                    if self._waiter.wait(self._sleep_for()):
                        for conn in self.listener.accept_waiting():
                            self.server.add(conn)
                    reason = self._look()
                    if reason is not None:
                        return self._shutdown(reason)
        finally:
            self._waiter.close()

    def _sleep_for(self) -> float:
        now = self.clock()
        at = self.lifecycle.deadline(now)
        wait = min(STATUS_EVERY_S, math.inf if at is None else at - now)
        if self.lifecycle.phase is State.LOADING:
            wait = min(wait, self._next_extend - now)
        return max(0.0, wait)

    def _look(self) -> Reason | None:
        """Look at the clocks once: tell the lifecycle clock what holds the daemon awake, keep
        systemd informed, and return the reason to exit now, if any."""
        with self._waiter.looking():
            now = self.clock()
            if self._signals:
                self.exiting = Reason.SIGNAL
                return Reason.SIGNAL
            holding = self.server.holding(now)
            if self.scheduler.pending:
                self.lifecycle.busy(now)
            elif holding.until is not None:
                self.lifecycle.busy(now, holding.until)
            else:
                self.lifecycle.idle(now)
            if self.lifecycle.phase is State.LOADING and now >= self._next_extend:
                self._next_extend = now + EXTEND_EVERY_S
                systemd.extend_timeout(EXTEND_BY_S)
            reason = self.lifecycle.expired(now)
            if reason is Reason.IDLE:
                late = self.listener.last_call()
                for conn in late:
                    self.server.add(conn)
                if late:
                    return None
            self.exiting = reason
            line = self.report.line(now)
            if reason is None and line != self._last_status:
                self._last_status = line
                systemd.status(line)
            return reason

    def _shutdown(self, reason: Reason) -> int:
        """The one way out, for every reason: stop accepting and close our fd, STOPPING=1, close
        idle connections and let requests in flight finish within drain_timeout (a further signal
        cuts that short), one journal event naming the reason, stop the worker."""
        deadline = self.clock() + self.settings.drain_timeout
        signame = signal.Signals(self._signals[0]).name if reason is Reason.SIGNAL else None
        self._waiter.stop_accepting()
        self.listener.close()
        self.server.drain()
        systemd.stopping(self.report.farewell(reason))
        if signame is not None:
            event("stopping", f"{signame}: finishing {self.server.active} request(s) in flight "
                              f"(at most {self.settings.drain_timeout:g} s)", signal=signame,
                  in_flight=self.server.active, queued=self.scheduler.pending)
        handled = 1 if reason is Reason.SIGNAL else 0   # any signal beyond that one: stop at once
        while self.server.active or self.scheduler.pending:
            if self.clock() >= deadline or len(self._signals) > handled:
                event("drain_abandoned", f"stopping with {self.server.active} request(s) unfinished",
                      logging.WARNING, in_flight=self.server.active, queued=self.scheduler.pending)
                break
            self._waiter.wait(DRAIN_POLL_S)
        self.report.exit_event(reason, signame)
        self.scheduler.stop(timeout=1.0)
        return ExitCode.SERVER if reason is Reason.UNAVAILABLE else ExitCode.OK


class Report:
    """What the daemon says about itself: GET /v1/status, STATUS= lines, its journal events."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def wall(self, mono: float) -> float:
        """A time on the daemon's monotonic clock as a Unix time (rounded to ms)."""
        return round(time.time() + (mono - self.d.clock()), 3)

    def document(self, now: float) -> dict[str, Any]:
        """The JSON of GET /v1/status (deadlines as Unix times, *_in_s as seconds from now). The
        idle deadline is the one that holds if the request asking (and all other work) ended now."""
        d, s, sch, lc = self.d, self.d.settings, self.d.scheduler, self.d.lifecycle
        engine = sch.engine
        memory: dict[str, int] = {}
        if engine is not None:
            try:
                memory = dict(engine.memory())
            except Exception as exc:  # status must answer even if the probe fails
                event("memory_probe_failed", f"engine.memory() failed: {exc}")
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
            "error": sch.error,
            "socket": d.listener.path,
            "socket_activated": d.listener.from_systemd,
            "pid": os.getpid(),
            "version": __version__,
        }

    def line(self, now: float) -> str:
        """The STATUS= line: what the daemon is doing now."""
        d, s, sch, lc = self.d, self.d.settings, self.d.scheduler, self.d.lifecycle
        if d.exiting:
            return f"Stopping: finishing {d.server.active} request(s)"
        if lc.phase is State.LOADING:
            return f"Loading model {s.model} (device {s.device})"
        at = lc.deadline(now)
        if lc.phase is State.UNAVAILABLE:
            return f"Model unavailable: {sch.error}; exiting in {max(0, math.ceil((at or now) - now))} s"
        head = f"Ready on {getattr(sch.engine, 'device', '?')}: {d.server.requests_served} request(s) served"
        keep = lc.keep_warm_until(now)
        if lc.held(now):
            return f"{head}; busy ({sch.pending} in progress, {d.server.holding(now).count} connection(s))"
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
        return f"Stopping: finishing {self.d.server.active} request(s)"

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
        """The one journal event that says why the daemon exits: idle_exit, stopped or exit_unavailable."""
        s, served = self.d.settings, self.d.server.requests_served
        alive = round(self.d.clock() - self.d.started, 3)
        if reason is Reason.IDLE:
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


def main(overrides: Mapping[str, object], config_path: str | None = None) -> ExitCode:
    """`e2vd serve`: run the daemon in the foreground; returns the process exit code.

    Raises ConfigError (its exit_code: USAGE) for settings that cannot be used: `e2vd.cli.main`
    prints it and exits with that code. A socket that cannot be listened on is logged as the
    journal event socket_error and ends the daemon with SocketError's exit_code."""
    from e2vd.config import load_settings

    settings = load_settings(dict(overrides), config_path=config_path)
    from e2vd.log import setup_logging

    setup_logging(settings.log_level)   # before anything imports funasr (it calls basicConfig)
    # CPU inference runs on one worker thread beside the connection threads. With OpenMP's default
    # spin-waiting, torch's idle pool threads keep the cores busy after every op, which delays the
    # connection threads and, on a shared machine, slowed the tiny model ~5x here (load 6 on 2
    # cores). Sleep instead; must be set before torch loads libgomp. An operator's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        listener = open_listener(settings.socket)
    except SocketError as exc:
        event("socket_error", str(exc), logging.ERROR, socket=settings.socket)
        return exc.exit_code
    return Daemon(settings, listener).run()
