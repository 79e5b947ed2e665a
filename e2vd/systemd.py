"""What the daemon says to systemd and takes from it: the passed socket and sd_notify(3) messages.

This is the only module in e2vd that reads LISTEN_PID/LISTEN_FDS/WATCHDOG_USEC or writes to $NOTIFY_SOCKET
(journald logging is e2vd.log's). It wraps systemd-python (libsystemd's own sd_listen_fds and
sd_notify) in the manner of nobodd's systemd.py and gunicorn's listen_fds: small functions, each
a no-op outside systemd, so the daemon runs the same in a terminal. The design is in
docs/design.md (the lifecycle).

The notify functions return True when systemd was told (a notify socket exists and the message
was sent), False otherwise; they never raise for a missing or unreachable notify socket.
"""
from __future__ import annotations

import os
import select
import socket

from systemd import daemon as sd   # systemd-python; this module's name does not shadow it (absolute import)

from e2vd.vocabulary import ExitCode

BARRIER_TIMEOUT_S = 5.0   # how long ready() waits for systemd to have read READY=1 (sd_notify_barrier's default)
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketError(RuntimeError):
    """The daemon cannot listen on its socket; the message says why and what to do."""

    exit_code = ExitCode.SERVER


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds(3), fds from 3 on), or None without one.

    LISTEN_FDS is honoured only when LISTEN_PID is this process: the variables are inherited by
    children, and a child that took its parent's fds would steal the parent's socket. Either way
    LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment, so nothing this
    process starts inherits them. The first fd that is a listening AF_UNIX stream socket is used
    (an event names any others); passed fds of which none is one raise SocketError.

    The socket belongs to the .socket unit, not to us: the daemon accepts on it and, when it exits,
    only closes its own fd. It must never shutdown() it (that would stop the listening socket for
    systemd too, and connections waiting in the backlog would be refused) nor unlink its path
    (systemd would keep listening on a socket nobody can reach). Connections left in the backlog
    when the daemon exits make systemd start the next instance.
    """
    pid = os.environ.get("LISTEN_PID")
    if pid is None:
        return None
    if pid.strip() != str(os.getpid()):
        _event("socket_ignored", f"LISTEN_PID={pid} is not this process ({os.getpid()}); "
                                 "ignoring the inherited LISTEN_FDS and binding the socket ourselves")
        for name in _LISTEN_VARS:
            os.environ.pop(name, None)
        return None
    fds = sd.listen_fds(unset_environment=True)
    for name in _LISTEN_VARS:   # libsystemd unset them in the C environment; os.environ caches its own copy
        os.environ.pop(name, None)
    for fd in fds:
        if sd.is_socket_unix(fd, socket.SOCK_STREAM, 1):
            extra = [f for f in fds if f != fd]
            if extra:
                _event("socket_extra", f"systemd passed {len(fds)} sockets; using fd {fd}, ignoring {extra}")
            return socket.socket(fileno=fd)
    if fds:
        raise SocketError(f"systemd passed fds {fds} but none is a listening Unix stream socket; "
                          "e2vd.socket must use ListenStream=/path/to/e2vd.sock with Accept=no")
    return None


def ready(status_text: str | None = None, barrier_timeout: float = BARRIER_TIMEOUT_S) -> bool:
    """READY=1 (and STATUS=`status_text`): start-up is finished, the daemon serves.

    For a Type=notify service this is what ends `systemctl start` and turns the unit from
    `activating` into `active` (`systemctl is-active`). systemd reads notifications on its own
    schedule, so after sending, this waits (at most `barrier_timeout` seconds) on a barrier
    (BARRIER=1 with a pipe fd that systemd closes once it has processed every earlier message, as
    sd_notify_barrier(3) does): when ready() returns True, systemd has seen READY=1, and whatever
    the caller does next (answering the first request) happens after the unit is active.
    Returns False outside systemd, or when the barrier timed out (READY=1 was still sent).
    """
    lines = ["READY=1"] + ([f"STATUS={status_text}"] if status_text is not None else [])
    return _notify(*lines) and _barrier(barrier_timeout)


def status(text: str) -> bool:
    """STATUS=`text`: one line shown by `systemctl status` and as StatusText of `systemctl show`.

    Purely informational; systemd keeps the last one sent until the service stops."""
    return _notify(f"STATUS={text}")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC: while the unit is `activating` (or `deactivating`), make the start
    (or stop) timeout end no sooner than `seconds` from now. Sent repeatedly while a slow model
    loads, so TimeoutStartSec= fails a load that stalls, not one that is merely slow. systemd
    ignores it once the unit is active."""
    return _notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1 (and STATUS=`status_text`): the daemon has begun to shut down by itself.

    systemctl shows the unit `deactivating` from now on; systemd sends no signal for it but starts
    the stop timeout (TimeoutStopSec=), within which the process must exit. A connection arriving
    on the socket meanwhile waits in its backlog, and systemd starts a new instance for it once
    this one has exited. Send it once, when the decision to exit is taken."""
    return _notify("STOPPING=1", *([f"STATUS={status_text}"] if status_text is not None else []))


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 pings when systemd watches this process (half of its
    WatchdogSec=, as sd_watchdog_enabled(3) advises), else None. systemd passes WatchdogSec= as
    WATCHDOG_USEC, and WATCHDOG_PID when set must be this process (the variables are inherited)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if pid.strip() and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def watchdog_ping() -> bool:
    """WATCHDOG=1: the keep-alive ping. Send it only while the daemon works as it should; when
    pings stop for WatchdogSec=, systemd kills the process with WatchdogSignal= (SIGABRT) and
    records Result=watchdog."""
    return _notify("WATCHDOG=1")


def watchdog_trigger(status_text: str, barrier_timeout: float = BARRIER_TIMEOUT_S) -> bool:
    """WATCHDOG=trigger (and STATUS=`status_text`): the daemon found itself broken; systemd
    handles it as a missed watchdog ping at once (SIGABRT, Result=watchdog), whether or not
    WatchdogSec= is set. Waits on a barrier like `ready`, so when this returns True systemd has
    acted on it (its signal is on its way); False outside systemd or when the barrier timed out."""
    return _notify("WATCHDOG=trigger", f"STATUS={status_text}") and _barrier(barrier_timeout)


def booted() -> bool:
    """Whether systemd is this machine's (or container's) PID 1 (sd_booted(3): /run/systemd/system
    exists). Without it the units cannot be installed or started."""
    return bool(sd.booted())


def notifying() -> bool:
    """Whether systemd gave this process a notify socket ($NOTIFY_SOCKET): it runs as a service."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _notify(*lines: str) -> bool:
    """sd_notify(3) the KEY=VALUE `lines` as one message; False when there is no notify socket."""
    if not notifying():
        return False
    try:
        return bool(sd.notify("\n".join(lines)))
    except OSError:   # systemd went away (e.g. during shutdown); nothing to tell
        return False


def _barrier(timeout: float) -> bool:
    """sd_notify_barrier(3): send BARRIER=1 with the write end of a pipe and wait until systemd
    closes it, which it does after processing every message sent before. False on timeout."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            sent = sd.notify("BARRIER=1", fds=[w])
        except OSError:
            return False
        os.close(w)
        w = -1
        if not sent:
            return False
        poller = select.poll()
        poller.register(r, select.POLLHUP)
        return bool(poller.poll(max(0.0, timeout) * 1000.0))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _event(name: str, message: str) -> None:
    from e2vd.log import event

    event(name, message)
