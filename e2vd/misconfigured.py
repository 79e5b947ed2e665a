"""Under socket activation, settings that cannot be used: answer 503 config_invalid, never fail
the socket (docs/design.md, the lifecycle).

A daemon that exits at once on a bad config file (an unknown key, a bad value, an unreadable
file) is started again by systemd for the connection still waiting in the socket's backlog, in
a tight loop, until e2vd.socket hits its trigger limit and fails; the client gets no answer, and
fixing the file is not enough to recover. Instead, `Misconfigured.run` (called by
`e2vd.daemon.main` only when systemd passed a socket):

- sends STATUS= with the error and logs one `config_invalid` event (no READY=1: the daemon never
  serves, so `systemctl start e2vd` fails, as it should);
- answers every connection with one 503 `config_invalid` whose message is the ConfigError's
  (the file, the key, the accepted values) and the fix, then closes it (`refuse`);
- before it accepts each connection, reads the settings again (after seeing the connection
  wait, so a client that fixed the file and then connected finds the fix read): once they load,
  it leaves the waiting connections in the backlog and exits 0 (`config_fixed`), and systemd
  starts a fresh daemon for them with the fixed file. No `systemctl` step is needed;
- after `grace` seconds (unavailable_grace's default: the file's own value cannot be trusted) it
  exits 2 (`exit_config_invalid`); SIGTERM/SIGINT end it at once with 0 (`stopped`). Either way
  it closes its fd of the socket and sends STOPPING=1 first; the socket stays with systemd.

The connections are answered on short-lived threads (`refuse`): the request head is read (at most
MAX_HEAD_BYTES, within READ_S) so HEAD gets no body, then the answer is sent with
Connection: close, and what the client still sends (a body) is read and dropped for up to
LINGER_S, so a client that writes its whole request before it reads gets the answer, not EPIPE.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable

from e2vd import systemd
from e2vd.http_wire import response_head
from e2vd.lifecycle import Reason
from e2vd.log import event
from e2vd.protocol import ApiError
from e2vd.vocabulary import ExitCode

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.daemon import Listener

READ_S = 5.0                  # longest wait for a request head before answering anyway
MAX_HEAD_BYTES = 64 * 1024    # most bytes read while looking for the end of the head
LINGER_S = 2.0                # after the answer: read and drop what the client still sends
LINGER_BYTES = 64 << 20       # ... at most this much
MAX_ANSWERING = 64            # connections answered at once; beyond, answered without reading
LOOK_EVERY_S = 1.0            # longest sleep of the loop


def config_invalid_error(error: Exception, grace: float) -> ApiError:
    """The 503 every request gets: the settings' error, and what to do about it."""
    return ApiError("config_invalid", (
        f"the daemon's settings cannot be used: {error} Fix that (`e2vd check-config` checks the "
        f"file); the first request after the fix starts a daemon with it, no systemctl step needed. "
        f"Until then every request is answered 503 (this daemon exits after {grace:g} s)."))


def refuse(sock: socket.socket, err: ApiError, patient: bool = True) -> None:
    """Answer `err` on the accepted connection `sock` and close it (see the module docstring).
    Not `patient`: send without reading or lingering, never blocking (too many at once)."""
    try:
        head = _read_head(sock) if patient else b""
        body = json.dumps(err.body()).encode()
        answer = response_head(err.status, len(body), close=True)
        if not head.startswith(b"HEAD "):
            answer += body
        if not patient:
            sock.setblocking(False)
            sock.send(answer)
            return
        sock.settimeout(READ_S)
        sock.sendall(answer)
        sock.shutdown(socket.SHUT_WR)
        _linger(sock)
    except OSError:
        pass
    finally:
        sock.close()


def _read_head(sock: socket.socket) -> bytes:
    """What arrives of the request head within READ_S (at most MAX_HEAD_BYTES)."""
    data = b""
    deadline = time.monotonic() + READ_S
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_HEAD_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_HEAD_BYTES - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data.lstrip(b"\r\n")


def _linger(sock: socket.socket) -> None:
    """Read and drop what the client sends until it closes, LINGER_S pass or LINGER_BYTES came."""
    deadline, total = time.monotonic() + LINGER_S, 0
    while total < LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            return
        if not chunk:
            return
        total += len(chunk)


class Misconfigured:
    """Serves the misconfigured state on `listener` (from systemd); see the module docstring.

    `error`: the ConfigError that stopped the start. `settings_now`: reads the settings again
    (raises while they still cannot be used). `grace`: seconds before exiting 2. `clock`: the
    monotonic clock of the grace. `run()` must be called on the main thread (signal handlers).
    """

    def __init__(self, listener: "Listener", error: Exception, settings_now: Callable[[], object], *,
                 grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        from e2vd.daemon import Waiter

        self.listener, self.error, self.settings_now = listener, error, settings_now
        self.grace, self.clock = float(grace), clock
        self.started = clock()
        self.refused = 0
        self._signals: list[int] = []
        self._threads: list[threading.Thread] = []
        self._waiter = Waiter(listener.sock)

    def run(self) -> ExitCode:
        """Answer 503 config_invalid until the grace ends, a signal comes or the settings load."""
        try:
            with self._waiter.signals_to(lambda signum, frame: self._signals.append(signum)):
                event("config_invalid", f"the settings cannot be used: {self.error} Answering every request "
                                        f"503 config_invalid for {self.grace:g} s, or until the file is fixed",
                      logging.ERROR, error=str(self.error), grace_seconds=self.grace)
                return self._shutdown(self._serve())
        finally:
            self._waiter.close()

    def status_line(self) -> str:
        """The STATUS= line while misconfigured."""
        left = max(0, math.ceil(self.started + self.grace - self.clock()))
        return f"Settings unusable (answering 503 config_invalid; exiting in {left} s): {self.error}"

    def _serve(self) -> Reason:
        """Wait for connections and answer them; the reason to stop."""
        shown = ""
        while True:
            now = self.clock()
            if self.status_line() != shown:
                shown = self.status_line()
                systemd.status(shown)
            if self._signals:
                return Reason.SIGNAL
            if now >= self.started + self.grace:
                return Reason.CONFIG_INVALID
            if self._waiter.wait(min(LOOK_EVERY_S, self.started + self.grace - now)) and self._refuse_waiting():
                return Reason.CONFIG_FIXED   # the waiting connections go to a fresh daemon

    def _refuse_waiting(self) -> bool:
        """Answer the waiting connections one by one, reading the settings again before each
        accept; True, accepting nothing more, once they load. A connection is accepted only if it
        was already waiting when the settings were read, so one made after the file was fixed
        is never answered with the old error (under load, a client that read the previous
        answer, fixed the file and connected could otherwise be accepted in the same round)."""
        waiting = self.listener.accept_waiting()
        while self.listener.pending():         # seen before the read below, so it came before it
            try:
                self.settings_now()
            except Exception as exc:   # still unusable (maybe for another reason now)
                self.error = exc
            else:
                return True
            conn = next(waiting, None)         # the oldest waiting connection: the one seen above
            if conn is None:
                return False
            self._answer(conn, config_invalid_error(self.error, self.grace))
        return False

    def _answer(self, conn: socket.socket, err: ApiError) -> None:
        self.refused += 1
        self._threads = [t for t in self._threads if t.is_alive()]
        if len(self._threads) >= MAX_ANSWERING:
            refuse(conn, err, patient=False)
            return
        thread = threading.Thread(target=refuse, args=(conn, err), name="e2vd-refuse", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _shutdown(self, reason: Reason) -> ExitCode:
        """Stop accepting, close our fd, STOPPING=1, let the answers leave, one journal event."""
        self._waiter.stop_accepting()
        self.listener.close()
        words = {Reason.CONFIG_FIXED: "Settings fixed: a fresh daemon takes over",
                 Reason.CONFIG_INVALID: f"Settings unusable: {self.error}",
                 Reason.SIGNAL: "Stopping"}
        systemd.stopping(words[reason])
        for thread in self._threads:
            thread.join(READ_S + LINGER_S + 1.0)
        alive = round(self.clock() - self.started, 3)
        if reason is Reason.CONFIG_FIXED:
            event("config_fixed", f"the settings load now; exiting so that a fresh daemon serves the waiting "
                                  f"connections (after {alive:.0f} s, {self.refused} refused)",
                  alive_seconds=alive, refused=self.refused)
            return ExitCode.OK
        if reason is Reason.SIGNAL:
            name = signal.Signals(self._signals[0]).name
            event("stopped", f"stopped by {name} after {alive:.0f} s alive with unusable settings",
                  signal=name, alive_seconds=alive, requests_served=0)
            return ExitCode.OK
        event("exit_config_invalid", f"exiting after {self.grace:g} s: the settings cannot be used ({self.error})",
              logging.ERROR, error=str(self.error), grace_seconds=self.grace, refused=self.refused)
        return ExitCode.USAGE
