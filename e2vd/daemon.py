"""The daemon's lifecycle (DESIGN §4): socket, model load, systemd notify, idle clock, signals.

`main(overrides, config_path)` is `e2vd serve`. In order:
1. settings (defaults < toml < E2VD_* < flags), then logging — before anything imports funasr;
2. the listening socket: the one systemd passes (LISTEN_FDS, LISTEN_PID checked to be us), else
   bind `socket` ourselves (mode 0660; a stale socket file nobody answers on is replaced; a live
   one is refused);
3. accept at once; the worker thread loads the model meanwhile (EXTEND_TIMEOUT_USEC every
   few seconds while it loads), READY=1 when loaded; STATUS= lines say what the daemon is doing;
4. idle clock: runs only while no request is in flight or queued, no client connection is
   open and the keep-warm deadline (POST /v1/warmup?hold=S) has passed; after idle_timeout
   seconds: stop accepting, close our fd (from systemd: never unlink, never shutdown()),
   STOPPING=1, exit 0 — connections arriving later wait in systemd's backlog and start us again;
5. SIGTERM/SIGINT: stop accepting, close the fd, finish in-flight work within drain_timeout, exit 0
   (a second signal stops at once);
6. a model that cannot load: answer 503 model_unavailable (with the reason) for
   unavailable_grace seconds, then exit EXIT_SERVER — slow enough that socket activation never
   spins in a tight restart loop.

The main thread only waits on one selector holding the listening socket and a self-pipe that the
signal handlers write to (`signal.set_wakeup_fd`), ticking every TICK_S for the clocks.

Exit codes: 0 idle exit or stopped by a signal; 2 bad configuration; 5 cannot listen on the socket
or the model is unavailable.
"""
from __future__ import annotations

import math
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from e2vd import __version__

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.config import Settings
    from e2vd.engine import Engine

EXIT_OK, EXIT_CONFIG, EXIT_SERVER = 0, 2, 5
TICK_S = 0.25                 # how often the clocks are looked at
EXTEND_EVERY_S = 5.0          # EXTEND_TIMEOUT_USEC cadence while the model loads
EXTEND_BY_USEC = 30_000_000   # each extension: 30 s from now
SOCKET_MODE = 0o660


class SocketError(RuntimeError):
    """The daemon cannot listen on its socket; the message says why and what to do."""


# --- systemd ----------------------------------------------------------------------------------

def notify(*lines: str) -> None:
    """sd_notify(3) the given KEY=VALUE lines; a no-op when not started by systemd (no NOTIFY_SOCKET)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as sd

    sd.notify("\n".join(lines))


def systemd_socket() -> socket.socket | None:
    """The listening socket passed by systemd (sd_listen_fds(3)), or None when there is none.

    LISTEN_FDS is honoured only when LISTEN_PID is this process (a child that inherited the
    environment must not take its parent's sockets); the variables are unset after reading so
    children we might start do not inherit them. The fd must be a listening AF_UNIX stream socket.
    """
    pid = os.environ.get("LISTEN_PID")
    if pid is None:
        return None
    if pid.strip() != str(os.getpid()):
        _event("socket_ignored", f"LISTEN_PID={pid} is not this process ({os.getpid()}); "
                                 "ignoring the inherited LISTEN_FDS and binding the socket ourselves")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return None
    from systemd import daemon as sd

    fds = sd.listen_fds(unset_environment=True)
    if not fds:
        return None
    for fd in fds:
        if sd.is_socket_unix(fd, socket.SOCK_STREAM, 1):
            extra = [f for f in fds if f != fd]
            if extra:
                _event("socket_extra", f"systemd passed {len(fds)} sockets; using fd {fd}, ignoring {extra}")
            return socket.socket(fileno=fd)
    raise SocketError(f"systemd passed fds {fds} but none is a listening Unix stream socket; "
                      "e2vd.socket must use ListenStream=/path/to/e2vd.sock with Accept=no")


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
            _event("socket_stale", f"removing stale socket {path} (nothing answers on it)")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
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

    def close(self) -> None:
        """Close our fd. From systemd: only that (the socket stays in systemd's hands, never
        unlinked, never shutdown()). Bound by us: also remove the file if it is still ours."""
        self.sock.close()
        if self.from_systemd or self.inode is None:
            return
        try:
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def open_listener(path: str) -> Listener:
    """The socket from systemd when passed, else `path` bound by us."""
    sock = systemd_socket()
    if sock is not None:
        name = sock.getsockname()
        return Listener(sock, name if isinstance(name, str) and name else path, from_systemd=True)
    sock = bind_socket(path)
    return Listener(sock, path, from_systemd=False, inode=os.lstat(path).st_ino)


def _event(name: str, message: str, level: int | None = None, **fields: object) -> None:
    import logging

    from e2vd.log import event

    event(name, message, logging.INFO if level is None else level, **fields)


# --- the daemon -------------------------------------------------------------------------------

class Daemon:
    """Runs the main loop; implements `e2vd.server.Control` (status, keep-warm hold)."""

    def __init__(self, settings: "Settings", listener: Listener) -> None:
        from e2vd.scheduler import Scheduler
        from e2vd.server import Server

        self.settings = settings
        self.listener = listener
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._lock = threading.Lock()
        self.keep_warm_until: float | None = None   # monotonic
        self.idle_since: float | None = None         # monotonic
        self.failed_at: float | None = None
        self.stopping = False
        self._signals: list[int] = []
        self._last_status = ""
        self._last_extend = 0.0
        self._announced = "loading"
        self.scheduler = Scheduler(self._load, queue_size=settings.queue_size, max_batch=settings.max_batch)
        self.server = Server(self.scheduler, self, max_body_bytes=settings.max_body_bytes,
                             max_seconds=settings.max_seconds, connection_timeout=settings.connection_timeout)

    # --- model (runs on the worker thread) ---
    def _load(self) -> "Engine":
        s = self.settings
        from e2vd.engine import Engine

        try:
            return Engine.load(s.model, device=s.device, dtype=s.dtype, quantize=s.quantize,
                               min_free_mb=s.min_free_mb, busy_policy=s.busy_policy, cache_dir=s.cache_dir)
        except Exception as exc:
            import logging

            _event("model_unavailable", f"the model {s.model} could not be loaded: {exc}", logging.ERROR,
                   model=s.model, error=str(exc), grace_seconds=s.unavailable_grace)
            raise

    # --- Control ---
    def hold(self, seconds: float) -> tuple[float, float | None]:
        """Keep warm at least `seconds` from now, capped by max_hold; never shortens a longer hold."""
        granted = min(float(seconds), float(self.settings.max_hold))
        now = time.monotonic()
        with self._lock:
            if granted > 0:
                until = now + granted
                if self.keep_warm_until is None or until > self.keep_warm_until:
                    self.keep_warm_until = until
            deadline = self.keep_warm_until
        if granted > 0:
            _event("keep_warm", f"keeping the model warm for {granted:g} s", hold_seconds=granted,
                   capped=granted < seconds)
        return granted, (None if deadline is None else self._wall(deadline))

    def status(self) -> dict[str, Any]:
        """The JSON of GET /v1/status (deadlines as Unix times, *_in_s as seconds from now)."""
        s, sch = self.settings, self.scheduler
        engine = sch.engine
        now = time.monotonic()
        memory: dict[str, int] = {}
        if engine is not None:
            try:
                memory = dict(engine.memory())
            except Exception as exc:  # status must answer even if the probe fails
                memory = {}
                _event("memory_probe_failed", f"engine.memory() failed: {exc}")
        idle_at = self._idle_deadline(now)
        with self._lock:
            keep = self.keep_warm_until
        return {
            "state": "stopping" if self.stopping else sch.state,
            "model": getattr(engine, "model_id", None) or s.model,
            "device": getattr(engine, "device", None),
            "dtype": getattr(engine, "dtype", None) or s.dtype,
            "memory": memory,
            "queue_depth": sch.pending,
            "queue_size": sch.queue_size,
            "connections": self.server.connections,
            "requests_served": self.server.requests_served,
            "uptime_s": round(now - self.started, 3),
            "load_seconds": getattr(engine, "load_seconds", None),
            "idle_timeout_s": s.idle_timeout,
            "idle_deadline": None if idle_at is None else self._wall(idle_at),
            "idle_exit_in_s": None if idle_at is None else round(max(0.0, idle_at - now), 3),
            "keep_warm_deadline": None if keep is None or keep <= now else self._wall(keep),
            "error": sch.error,
            "socket": self.listener.path,
            "socket_activated": self.listener.from_systemd,
            "pid": os.getpid(),
            "version": __version__,
        }

    def _wall(self, mono: float) -> float:
        return round(time.time() + (mono - time.monotonic()), 3)

    def _idle_deadline(self, now: float) -> float | None:
        """When the daemon exits if nothing else arrives: the running idle clock's end, or (while
        busy) keep-warm end or now, plus idle_timeout. None while loading or unavailable."""
        if self.scheduler.state != "ready" or not math.isfinite(self.settings.idle_timeout):
            return None
        if self.idle_since is not None:
            return self.idle_since + self.settings.idle_timeout
        with self._lock:
            keep = self.keep_warm_until
        return max(now, keep or now) + self.settings.idle_timeout

    # --- main loop ---
    def run(self) -> int:
        """Serve until idle exit, a signal, or the end of the unavailable grace; returns the exit code."""
        s = self.settings
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.listener.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.listener.sock, selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        _event("start", f"e2vd {__version__} listening on {self.listener.path}"
                        f"{' (from systemd)' if self.listener.from_systemd else ''}; loading {s.model}",
               socket=self.listener.path, socket_activated=self.listener.from_systemd, model=s.model,
               device=s.device, pid=os.getpid(), idle_timeout_seconds=s.idle_timeout)
        self.scheduler.start()
        try:
            while True:
                for key, _ in sel.select(TICK_S):
                    if key.data == "accept":
                        self._accept()
                    else:
                        _drain_pipe(wake_r)
                if self._signals:
                    return self._stop(sel, wake_r)
                code = self._tick(sel)
                if code is not None:
                    return code
        finally:
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving what we have
                _event("accept_failed", f"accept() failed: {exc}")
                return
            conn.setblocking(True)
            self.idle_since = None
            self.server.add(conn)

    def _tick(self, sel: selectors.BaseSelector) -> int | None:
        """Look at the clocks once; returns an exit code when the daemon should exit."""
        s, sch = self.settings, self.scheduler
        now = time.monotonic()
        state = sch.state
        if state == "loading":
            if now - self._last_extend >= EXTEND_EVERY_S:
                self._last_extend = now
                notify(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")
        elif state != self._announced:
            self._announced = state
            if state == "ready":
                engine = sch.engine
                memory = {}
                try:
                    memory = dict(engine.memory()) if engine is not None else {}
                except Exception:
                    pass
                _event("model_loaded", f"model {getattr(engine, 'model_id', s.model)} loaded on "
                                       f"{getattr(engine, 'device', '?')} in {getattr(engine, 'load_seconds', 0):.1f} s",
                       model=getattr(engine, "model_id", s.model), device=getattr(engine, "device", None),
                       dtype=getattr(engine, "dtype", None), load_seconds=getattr(engine, "load_seconds", None),
                       memory_bytes=memory.get("cuda_allocated_bytes", memory.get("param_bytes")),
                       **{f"memory_{k}": v for k, v in memory.items()})
                notify("READY=1", "STATUS=" + self._status_line(now))
                self._last_status = self._status_line(now)
            else:
                self.failed_at = now
        if state == "unavailable":
            assert self.failed_at is not None
            if now - self.failed_at >= s.unavailable_grace:
                return self._exit_unavailable(sel)
        elif state == "ready":
            busy = self.server.connections > 0 or sch.pending > 0
            with self._lock:
                warm = self.keep_warm_until is not None and now < self.keep_warm_until
            if busy or warm:
                self.idle_since = None
            elif self.idle_since is None:
                self.idle_since = now
            elif now - self.idle_since >= s.idle_timeout:
                return self._idle_exit(sel)
        line = self._status_line(now)
        if line != self._last_status:
            self._last_status = line
            notify("STATUS=" + line)
        return None

    def _status_line(self, now: float) -> str:
        s, sch = self.settings, self.scheduler
        if self.stopping:
            return f"Stopping: finishing {self.server.active} request(s)"
        if sch.state == "loading":
            return f"Loading model {s.model} (device {s.device})"
        if sch.state == "unavailable":
            left = max(0, math.ceil(s.unavailable_grace - (now - (self.failed_at or now))))
            return f"Model unavailable: {sch.error}; exiting in {left} s"
        device = getattr(sch.engine, "device", "?")
        served = self.server.requests_served
        head = f"Ready on {device}: {served} request(s) served"
        if self.server.connections or sch.pending:
            return f"{head}; busy ({sch.pending} in progress, {self.server.connections} connection(s))"
        with self._lock:
            keep = self.keep_warm_until
        if keep is not None and now < keep:
            until = time.strftime("%H:%M:%S", time.localtime(time.time() + keep - now))
            return f"{head}; kept warm until {until}"
        if self.idle_since is not None and math.isfinite(s.idle_timeout):
            left = max(0, math.ceil(s.idle_timeout - (now - self.idle_since)))
            return f"{head}; idle exit in {left} s"
        return head

    def _stop_accepting(self, sel: selectors.BaseSelector) -> None:
        try:
            sel.unregister(self.listener.sock)
        except (KeyError, ValueError):
            pass

    def _idle_exit(self, sel: selectors.BaseSelector) -> int | None:
        self._stop_accepting(sel)
        if not self.listener.from_systemd:
            # Nobody keeps our own socket after we close it: serve a last-moment client instead.
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                conn = None
            if conn is not None:
                conn.setblocking(True)
                self.server.add(conn)
                self.idle_since = None
                sel.register(self.listener.sock, selectors.EVENT_READ, "accept")
                return None
        self.listener.close()
        alive = time.monotonic() - self.started
        _event("idle_exit", f"idle for {self.settings.idle_timeout:g} s: exiting after {alive:.0f} s alive, "
                            f"{self.server.requests_served} request(s) served",
               alive_seconds=round(alive, 3), requests_served=self.server.requests_served,
               idle_timeout_seconds=self.settings.idle_timeout)
        notify("STOPPING=1", f"STATUS=Idle exit after {self.server.requests_served} request(s)")
        self.scheduler.stop(timeout=1.0)
        return EXIT_OK

    def _exit_unavailable(self, sel: selectors.BaseSelector) -> int:
        import logging

        self._stop_accepting(sel)
        self.listener.close()
        _event("exit_unavailable", f"exiting after {self.settings.unavailable_grace:g} s: the model is "
                                   f"unavailable ({self.scheduler.error})", logging.ERROR,
               error=self.scheduler.error, grace_seconds=self.settings.unavailable_grace)
        notify("STOPPING=1", f"STATUS=Model unavailable: {self.scheduler.error}")
        self.scheduler.stop(timeout=1.0)
        return EXIT_SERVER

    def _stop(self, sel: selectors.BaseSelector, wake_r: socket.socket) -> int:
        """SIGTERM/SIGINT: stop accepting, close the fd, finish in-flight work within drain_timeout."""
        import logging

        signum = self._signals[0]
        self._stop_accepting(sel)
        self.listener.close()
        self.stopping = True
        self.server.drain()
        notify("STOPPING=1", "STATUS=" + self._status_line(time.monotonic()))
        name = signal.Signals(signum).name
        _event("stopping", f"{name}: finishing {self.server.active} request(s) in flight "
                           f"(at most {self.settings.drain_timeout:g} s)", signal=name,
               in_flight=self.server.active, queued=self.scheduler.pending)
        deadline = time.monotonic() + self.settings.drain_timeout
        handled = len(self._signals)
        while self.server.active or self.scheduler.pending:
            if time.monotonic() >= deadline or len(self._signals) > handled:
                _event("drain_abandoned", f"stopping with {self.server.active} request(s) unfinished",
                       logging.WARNING, in_flight=self.server.active, queued=self.scheduler.pending)
                break
            sel.select(0.05)
            _drain_pipe(wake_r)
        alive = time.monotonic() - self.started
        _event("stopped", f"stopped by {name} after {alive:.0f} s alive, "
                          f"{self.server.requests_served} request(s) served",
               signal=name, alive_seconds=round(alive, 3), requests_served=self.server.requests_served)
        self.scheduler.stop(timeout=1.0)
        return EXIT_OK


def _drain_pipe(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def main(overrides: Mapping[str, object], config_path: str | None = None) -> int:
    """`e2vd serve`: run the daemon in the foreground; returns the process exit code."""
    from e2vd.config import ConfigError, load_settings

    try:
        settings = load_settings(dict(overrides), config_path=config_path)
    except ConfigError as exc:
        print(f"e2vd serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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
        import logging

        _event("socket_error", str(exc), logging.ERROR, socket=settings.socket)
        return EXIT_SERVER
    return Daemon(settings, listener).run()
