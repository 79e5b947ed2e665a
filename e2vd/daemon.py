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
5. the watchdog (`e2vd.watchdog.Watchdog`): at every look, WATCHDOG=1 goes to systemd only while
   the inference worker is healthy (idle, or in a model call younger than inference_timeout);
   a call that reaches inference_timeout is stuck and the daemon leaves with Reason.STUCK;
6. one shutdown path for every reason (idle, SIGTERM/SIGINT, unavailable model, stuck): stop
   accepting, close our fd (from systemd: never unlink, never shutdown()), STOPPING=1, close idle
   connections and let requests in flight finish within drain_timeout (a second signal cuts
   that short), one journal event naming the reason (idle_exit, stopped, exit_unavailable).
   Stuck is the exception: nothing can be drained, as the worker never comes back. After its
   event (inference_stuck) the daemon sends WATCHDOG=trigger instead of STOPPING=1, so systemd
   kills it at once (SIGABRT; Python's faulthandler writes every thread's stack to the journal)
   and records Result=watchdog; outside systemd, or if no signal comes, `main` ends the process
   itself (os._exit: a thread stuck in a C call would keep a normal exit waiting), exit 5.
   Clients of the stuck call see their connection close without an answer (e2vd.client:
   DaemonDied).

Settings that cannot be used (ConfigError) end a daemon started by hand at once (exit 2). Under
socket activation that would make systemd start it again for the waiting connection, in a loop
that fails e2vd.socket; instead `e2vd.misconfigured` answers every request 503 config_invalid
for unavailable_grace seconds, and hands over to a fresh daemon as soon as the file is fixed.

The main thread waits on one selector holding the listening socket and a wake-up socket written
to by the signal handlers (signal.set_wakeup_fd), the worker thread (model loaded or failed) and
connection threads (a request ended, a connection closed); with nothing happening it sleeps until
the clock's deadline, at most STATUS_EVERY_S. The design is in docs/design.md.

Exit codes (`e2vd.vocabulary.ExitCode`): 0 idle exit or stopped by a signal; 2 bad configuration
(ConfigError, which `main` lets through to `e2vd.cli.main` like every command's errors; under
socket activation after the grace); 5 cannot listen on the socket (SocketError's own code, after
its journal event), the model is unavailable, or a model call was stuck.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import logging
import math
import os
import select
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NoReturn

from e2vd import systemd
from e2vd.daemon_report import Events, Report
from e2vd.fallback import Deciding, Fallback
from e2vd.lifecycle import LifecycleClock, Reason
from e2vd.log import event
from e2vd.scheduler import Running, Scheduler
from e2vd.server import Server
from e2vd.systemd import SocketError
from e2vd.vocabulary import ExitCode, State
from e2vd.watchdog import Watchdog

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.config import Settings
    from e2vd.engine import Engine

__all__ = ["Daemon", "Listener", "SocketError", "bind_socket", "main", "open_listener"]

STATUS_EVERY_S = 1.0    # longest sleep of the main loop: STATUS= countdowns; jobs that end without an event
EXTEND_EVERY_S = 5.0    # EXTEND_TIMEOUT_USEC cadence while the model loads ...
EXTEND_BY_S = 30.0      # ... each one: the start timeout ends no sooner than this from now
DRAIN_POLL_S = 0.1      # while draining: how often queued jobs are looked at (requests wake us)
KILL_WAIT_S = 5.0       # stuck, after WATCHDOG=trigger: how long systemd's signal may take before we exit
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

    def pending(self) -> bool:
        """Whether a connection waits in the backlog now (never blocks)."""
        return bool(select.select([self.sock], [], [], 0)[0])

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


def systemd_listener(path: str) -> Listener | None:
    """The socket systemd passed (named by its address, else `path`), or None without one."""
    sock = systemd.listen_socket()
    if sock is None:
        return None
    name = sock.getsockname()
    return Listener(sock, name if isinstance(name, str) and name else path, from_systemd=True)


def open_listener(path: str) -> Listener:
    """The socket from systemd when passed, else `path` bound by us."""
    listener = systemd_listener(path)
    if listener is not None:
        return listener
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

    def sleep_until(self, clock: Callable[[], float], until: float, at_most: float) -> None:
        """Sleep until `clock()` reaches `until` (woken to look again by `wake`), at most
        `at_most` real seconds."""
        real_until = time.monotonic() + at_most
        while clock() < until and time.monotonic() < real_until:
            self.wait(min(until - clock(), real_until - time.monotonic()))

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

class Loading:
    """The main loop's duties while the model loads: keep systemd's start timeout from ending a
    load that is still allowed to run (EXTEND_TIMEOUT_USEC every EXTEND_EVERY_S), and give up on
    one that has run load_timeout seconds (`e2vd.lifecycle.LifecycleClock.load_overdue` decides;
    `Scheduler.give_up_loading` makes the model unavailable, so the grace and the exit follow)."""

    def __init__(self, settings: "Settings", lifecycle: LifecycleClock, scheduler: Scheduler) -> None:
        self.settings, self.lifecycle, self.scheduler = settings, lifecycle, scheduler
        self._next_extend = -math.inf

    def look(self, now: float) -> None:
        """One look of the main loop at `now` (does nothing once the load has ended)."""
        if self.lifecycle.load_overdue(now):   # a hung disk or filesystem: unavailable from now on
            self.scheduler.give_up_loading(f"the model did not finish loading within load_timeout = "
                                           f"{self.settings.load_timeout:g} s (a hung disk or network "
                                           "filesystem?); raise load_timeout if it really takes that long")
        elif self.lifecycle.phase is State.LOADING and now >= self._next_extend:
            self._next_extend = now + EXTEND_EVERY_S
            systemd.extend_timeout(EXTEND_BY_S)

    def next_look(self) -> float:
        """When `look` has something to do next (math.inf once the load has ended)."""
        if self.lifecycle.phase is not State.LOADING:
            return math.inf
        overdue_at = self.lifecycle.load_deadline()
        return min(self._next_extend, math.inf if overdue_at is None else overdue_at)

    def failed(self) -> None:
        """The model became unavailable; if it was still loading (the load failed or was given up
        on), the unit is still `activating`: extend the start timeout past the unavailable grace
        and the drain, which must not be cut short. Call it before the lifecycle clock hears of it."""
        if self.lifecycle.phase is State.LOADING:
            systemd.extend_timeout(self.settings.unavailable_grace + self.settings.drain_timeout + EXTEND_BY_S)


def load_engine(settings: "Settings") -> "Engine":
    """The model as the settings ask for it (runs on the worker thread), its device chosen and
    its weights placed while holding the machine's GPU lock (e2vd.gpu_lock: gpu_lock,
    gpu_lock_timeout), which every e2vd daemon shares."""
    from e2vd.engine import Engine
    from e2vd.gpu_lock import daemon_gpu_lock

    s = settings
    return Engine.load(s.model, device=s.device, dtype=s.dtype, quantize=s.quantize,
                       min_free_mb=s.min_free_mb, busy_policy=s.busy_policy, cache_dir=s.cache_dir,
                       gpu_lock=daemon_gpu_lock(s))


class Daemon:
    """The main loop; implements the `Control` the HTTP layer asks (status, keep-warm hold).

    `load` (default `load_engine`) runs on the worker thread and returns the engine. `clock` is the
    monotonic clock of every lifecycle decision; tests pass one they move by hand, then `look()`.
    `run()` must be called on the main thread (it installs signal handlers)."""

    def __init__(self, settings: "Settings", listener: Listener, *,
                 load: Callable[[], "Engine"] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.listener, self.clock = settings, listener, clock
        self.started = clock()
        self.lifecycle = LifecycleClock(settings.idle_timeout, settings.max_hold, settings.unavailable_grace,
                                        settings.load_timeout, loading_since=self.started)
        self.exiting: Reason | None = None   # set by the look that decides to exit
        self.watchdog = Watchdog(settings.inference_timeout, systemd.watchdog_interval())
        self.stuck: Running | None = None    # the model call found stuck, once it is
        self._signals: list[int] = []
        self._waiter = Waiter(listener.sock)
        self.scheduler = Scheduler(load or functools.partial(load_engine, settings), queue_size=settings.queue_size,
                                   max_batch=settings.max_batch, on_state=self._on_state, on_running=self.wake,
                                   clock=clock)
        self.loading = Loading(settings, self.lifecycle, self.scheduler)
        # the low-confidence fallback (e2vd.fallback): nothing is loaded until a request needs it
        self.deciding = Deciding(self.scheduler, Fallback.from_settings(settings, clock=clock))
        self.server = Server(self.deciding, self, max_body_bytes=settings.max_body_bytes,
                             max_seconds=settings.max_seconds, connection_timeout=settings.connection_timeout,
                             max_connections_per_uid=settings.max_connections_per_uid, clock=clock,
                             on_change=self.wake)
        self.report, self.events = Report(self), Events(self)

    # --- Control (connection threads) ---
    def hold(self, seconds: float) -> tuple[float, float | None]:
        """Keep warm at least `seconds` from now (capped by max_hold, never shortening a longer
        hold); returns (granted seconds, keep-warm deadline as a Unix time or None)."""
        h = self.lifecycle.hold(seconds, self.clock())
        self.events.keep_warm(h)
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
        """Wake the main loop and wait until it has looked at its clocks once after this call (for
        tests that move an injected clock; `exiting` then says what it decided); False after `timeout` s."""
        return self._waiter.look(timeout)

    def _on_state(self, state: str) -> None:
        """The scheduler's on_state (worker thread, before any job): READY=1 once systemd has it,
        or the start of the unavailable grace; then wake the main loop."""
        now = self.clock()
        if state == State.READY:
            self.lifecycle.loaded(now)
            self.events.model_loaded()
            systemd.ready(self.report.new_line(now, always=True))
        elif state == State.UNAVAILABLE:
            self.events.model_unavailable(loading=self.lifecycle.phase is State.LOADING)
            self.loading.failed()   # before the clock hears of it (it acts only on a failed load)
            self.lifecycle.failed(now)
        self.wake()   # the main loop sends the STATUS= line and runs the grace clock

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    # --- main thread ---
    def run(self) -> int:
        """Serve until idle exit, a signal, or the end of the unavailable grace; returns the exit code."""
        try:
            with self._waiter.signals_to(self._on_signal):
                self.events.start()
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
        look = self.watchdog.next_look(now, getattr(self.deciding.running, "started", None))
        wait = min(STATUS_EVERY_S, math.inf if at is None else at - now, math.inf if look is None else look - now,
                   self.loading.next_look() - now)
        return max(0.0, wait)

    def _look(self) -> Reason | None:
        """Look at the clocks once: tell the lifecycle clock what holds the daemon awake, keep
        systemd informed, and return the reason to exit now, if any."""
        with self._waiter.looking():
            now = self.clock()
            if self._signals:
                self.exiting = Reason.SIGNAL
                return Reason.SIGNAL
            running = self.deciding.running           # the watchdog: stuck, or a ping while healthy
            if self.watchdog.stuck(now, getattr(running, "started", None)):
                self.stuck, self.exiting = running, Reason.STUCK
                return Reason.STUCK
            if self.watchdog.ping(now, getattr(running, "started", None)):
                systemd.watchdog_ping()
            self.lifecycle.observe(now, self.scheduler.pending > 0, self.server.holding(now).until)
            self.loading.look(now)
            reason = self.lifecycle.expired(now)
            if reason is Reason.IDLE and (late := self.listener.last_call()):
                for conn in late:   # connections that came at the last moment: not idle after all
                    self.server.add(conn)
                return None
            self.exiting = reason
            if reason is None and (line := self.report.new_line(now)):
                systemd.status(line)
            return reason

    def _shutdown(self, reason: Reason) -> int:
        """The one way out, for every reason: stop accepting and close our fd, STOPPING=1, close
        idle connections and let requests in flight finish within drain_timeout (a further signal
        cuts that short), one journal event naming the reason, stop the worker. Stuck: the event,
        then WATCHDOG=trigger instead of STOPPING=1 and no drain (the worker never comes back);
        SERVER once systemd's signal had KILL_WAIT_S to come (at once outside systemd)."""
        deadline = self.clock() + self.settings.drain_timeout
        signame = signal.Signals(self._signals[0]).name if reason is Reason.SIGNAL else None
        self._waiter.stop_accepting()
        self.listener.close()
        if reason is Reason.STUCK:
            self.events.exit_event(reason, None)
            until = self.clock() + KILL_WAIT_S
            if systemd.watchdog_trigger(self.report.farewell(reason)):
                self._waiter.sleep_until(self.clock, until, KILL_WAIT_S)   # systemd's SIGABRT ends us here
            return ExitCode.SERVER
        self.server.drain()
        systemd.stopping(self.report.farewell(reason))
        self.events.stopping(signame)
        handled = 1 if reason is Reason.SIGNAL else 0   # any signal beyond that one: stop at once
        while self.server.active or self.scheduler.pending:
            if self.clock() >= deadline or len(self._signals) > handled:
                self.events.drain_abandoned()
                break
            self._waiter.wait(DRAIN_POLL_S)
        self.events.exit_event(reason, signame)
        self.scheduler.stop(timeout=1.0)
        self.deciding.close(timeout=1.0)
        return ExitCode.SERVER if reason is Reason.UNAVAILABLE else ExitCode.OK


def end_process(code: int) -> NoReturn:
    """End the process now with `code` whatever its threads do (a thread stuck in a C call would
    keep a normal interpreter exit waiting, and the GPU held): the logs are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


def main(overrides: Mapping[str, object], config_path: str | None = None) -> ExitCode:
    """`e2vd serve`: run the daemon in the foreground; returns the process exit code.

    Raises ConfigError (its exit_code: USAGE) for settings that cannot be used: `e2vd.cli.main`
    prints it and exits with that code. A socket that cannot be listened on is logged as the
    journal event socket_error and ends the daemon with SocketError's exit_code."""
    from e2vd.config import ConfigError, load_settings
    from e2vd.log import setup_logging

    def settings_now() -> "Settings":
        return load_settings(dict(overrides), config_path=config_path)

    try:
        settings = settings_now()
    except ConfigError as err:
        return _misconfigured(err, settings_now)
    setup_logging(settings.log_level)   # before anything imports funasr (it calls basicConfig)
    faulthandler.enable(all_threads=True)   # SIGABRT from systemd's watchdog: every thread's stack
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
    daemon = Daemon(settings, listener)
    code = daemon.run()
    if daemon.exiting is Reason.STUCK or daemon.scheduler.worker_alive:   # a stuck call, or a load given up on
        end_process(code)
    return ExitCode(code)


def _misconfigured(error: Exception, settings_now: Callable[[], "Settings"]) -> ExitCode:
    """Settings that cannot be used: raise `error` (cli.main: one line, exit 2) unless systemd
    passed a socket; then answer 503 config_invalid until the grace ends or the file is fixed."""
    from e2vd.config import Settings
    from e2vd.log import setup_logging
    from e2vd.misconfigured import Misconfigured

    try:
        listener = systemd_listener(Settings.socket)
    except SocketError:
        listener = None
    if listener is None:
        raise error
    setup_logging(Settings.log_level)
    return Misconfigured(listener, error, settings_now, grace=Settings.unavailable_grace).run()
