"""The GPU lock: one e2vd daemon at a time chooses a GPU and puts its model on it.

Every daemon checks the GPU's free memory against `min_free_mb` (e2vd.gpu.choose_device) before
it loads. Two daemons (instances) started at the same moment would both see the memory free, both
pass, and then run out of it. So the check and the placing of the weights on the device happen
while the daemon holds an exclusive `flock` on one lock file that every daemon of the machine
shares: the next daemon's check then sees the memory the first one took. The weights are read
from disk before the lock is taken (that needs no GPU), and the lock is released as soon as they
are on the device: loads overlap except for the NVML check, CUDA's start and the copy.

Where: the setting `gpu_lock` (an absolute path), else `<directory of the socket setting>/lock/
gpu.lock`, i.e. /run/e2vd/lock/gpu.lock for every unit whose socket is in /run/e2vd. systemd
creates /run/e2vd/lock for the service (RuntimeDirectory=e2vd/lock) and keeps it when the
service stops (RuntimeDirectoryPreserve=yes: a lock file removed while another daemon holds it
would let the next one lock a new file). Units that run under different dynamic users share it
through their primary group (Group=e2vd-daemon, RuntimeDirectoryMode=0770); the file is made
mode 0660, so no other local user can open it (and hold the lock to stop every load). A daemon
run by hand creates `lock/` next to its socket when it is missing.

`GpuLock.hold()` waits for the lock at most `timeout_s` seconds (the setting `gpu_lock_timeout`),
polling every POLL_S: flock has no timeout of its own and the model loads on a worker thread,
where SIGALRM cannot interrupt it. A daemon that gets no lock in time raises GpuLockTimeout (a
GpuBusyError: the engine then loads on the CPU under busy_policy "cpu", else the daemon answers
503 model_unavailable for unavailable_grace and exits, as for any GPU it cannot use). A lock
file that cannot be opened (directory missing and not creatable, no permission, not a regular
file) is not fatal: the daemon logs the event gpu_lock_unavailable (warning, with the path, the
reason and the fix) and loads without the lock, as e2vd did before it had one.

The holder writes one line into the file (pid, socket, since when); a waiter's messages quote it.
A file that holds anything else is not a lock file (gpu_lock set to some other file by mistake):
it is never emptied, written or chmodded, and the daemon loads without the lock. Nor is a file of
a stranger used (owned by neither root nor this uid, in none of its groups: a user who made
/tmp/lock/gpu.lock beside a socket in /tmp could hold it for ever).
flock locks belong to the open file: the kernel drops them when the holder exits or dies, so a
crashed loader never leaves a stale lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from e2vd.config import INSTANCE_ENV
from e2vd.gpu import GpuBusyError
from e2vd.log import event

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.config import Settings

log = logging.getLogger(__name__)

LOCK_DIR_NAME = "lock"        # below the socket's directory: /run/e2vd/lock
LOCK_FILE_NAME = "gpu.lock"
LOCK_MODE = 0o660             # the daemons' shared group may open it; nobody else
DIR_MODE = 0o770
POLL_S = 0.05                 # how often a waiter tries again
HOLDER_MAX_BYTES = 512        # the holder line read back from the file (written by another process)


class GpuLockTimeout(GpuBusyError):
    """Another daemon held the GPU lock longer than gpu_lock_timeout; the message names the lock,
    its holder and what to do; `reason` is its first clause alone (for the CPU fallback's log)."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}, so this daemon did not load its model. {advice}")
        self.reason = reason


@dataclass(frozen=True)
class LockOutcome:
    """What `GpuLock.hold` got. held: the lock is held for the block (False: loading without it,
    `problem` says why); waited_s: seconds spent waiting for another daemon to release it."""

    path: str
    held: bool
    waited_s: float = 0.0
    problem: str | None = None


def lock_path(setting: str, socket_path: str) -> str:
    """The lock file's path: `setting` (the gpu_lock setting) when given, else
    `<directory of socket_path>/lock/gpu.lock`."""
    if setting:
        return setting
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), LOCK_DIR_NAME, LOCK_FILE_NAME)


def daemon_gpu_lock(settings: "Settings", role: str = "") -> "GpuLock":
    """The lock a daemon with `settings` shares with every other (gpu_lock, gpu_lock_timeout). Its
    holder line names the instance ($E2VD_INSTANCE) or, outside one, the socket; `role` says which
    of the daemon's models holds it (e.g. "the fallback"; empty: the main model). Engine.load
    takes it only for a device other than "cpu"."""
    instance = os.environ.get(INSTANCE_ENV, "").strip()
    whose = f"instance {instance}" if instance else f"socket {settings.socket}"
    return GpuLock(lock_path(settings.gpu_lock, settings.socket), settings.gpu_lock_timeout,
                   owner=f"{role} of {whose}" if role else whose)


class GpuLock:
    """The machine-wide lock around choosing a GPU and placing a model on it (module docstring).

    path: the lock file; timeout_s (>= 0, seconds): longest wait for another holder, 0 = one
    try; create_dir: create the file's directory (mode 0770 less the umask) when it is missing;
    owner: what the holder line says about this daemon (e.g. its socket)."""

    def __init__(self, path: str, timeout_s: float, *, create_dir: bool = True, owner: str = "") -> None:
        if not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s!r}")
        self.path = path
        self.timeout_s = float(timeout_s)
        self.create_dir = create_dir
        self.owner = owner

    @contextlib.contextmanager
    def hold(self) -> Iterator[LockOutcome]:
        """Hold the lock for the block; yields a LockOutcome.

        Waits at most `timeout_s` seconds for another holder (event gpu_lock_wait when it has to
        wait, gpu_lock_acquired when it got it after waiting), then raises GpuLockTimeout. When
        the file cannot be opened or locked at all, logs gpu_lock_unavailable and runs the block
        without the lock (`held` False). Released (and the holder line cleared) when the block
        ends, also on an exception."""
        fd, writable, problem = self._open()
        if fd is None:
            yield self._unavailable(problem or "unknown error")
            return
        try:
            waited = self._acquire(fd)
            if waited is None:
                yield self._unavailable(f"flock() is not supported on {self.path}'s file system")
                return
            if writable:
                self._write_holder(fd)
            try:
                yield LockOutcome(self.path, True, waited)
            finally:
                if writable:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> str:
        """The holder line in the lock file (who holds or last held it), "" when unreadable."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            return _clean(os.pread(fd, HOLDER_MAX_BYTES, 0))
        except OSError:
            return ""
        finally:
            os.close(fd)

    # --- inside ---
    def _open(self) -> tuple[int | None, bool, str | None]:
        """(fd, opened for writing, problem): the lock file opened, created if missing (mode
        0660), read-only when it exists but this uid may not write it or its directory."""
        directory = os.path.dirname(self.path) or "."
        if self.create_dir and not os.path.isdir(directory):
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                pass
            except OSError as err:
                return None, False, (f"its directory {directory} does not exist and cannot be created "
                                     f"({err.strerror or err})")
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC   # NONBLOCK: a FIFO put there must not hang us
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | flags, LOCK_MODE)
        except PermissionError as denied:
            writable = False
            try:
                fd = os.open(self.path, os.O_RDONLY | flags)
            except FileNotFoundError:   # not there, and this uid may not create it
                return None, False, self._open_problem(denied)
            except OSError as err:
                return None, False, self._open_problem(err)
        except OSError as err:
            return None, False, self._open_problem(err)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None, False, _not_regular(st.st_mode)
            if st.st_uid not in (0, os.geteuid()) and st.st_gid != os.getegid() and st.st_gid not in os.getgroups():
                os.close(fd)   # a stranger's file: it could hold the lock for ever and stop every load
                return None, False, (f"it belongs to uid {st.st_uid} and group {st.st_gid}, neither this daemon's "
                                     f"(uid {os.geteuid()}) nor root nor of a group it is in, so that user could "
                                     f"hold it for ever: {_SET_ANOTHER} in a directory only e2vd's daemons may "
                                     "write, or remove it")
            if st.st_size and not _holder_text(os.pread(fd, HOLDER_MAX_BYTES + 1, 0)):
                os.close(fd)   # gpu_lock names someone else's file: never empty, write or chmod it
                return None, False, (f"it is not a GPU lock file (its {st.st_size} bytes are not a line e2vd "
                                     f"wrote), so it was left as it was: {_SET_ANOTHER} that no other "
                                     "program uses")
            if writable and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != LOCK_MODE:
                os.fchmod(fd, LOCK_MODE)   # the umask (the units' UMask=0077) narrowed it at creation
        except OSError as err:
            os.close(fd)
            return None, False, self._open_problem(err)
        return fd, writable, None

    def _open_problem(self, err: OSError) -> str:
        """What is wrong with the path, and what to do, for an `open` that failed with `err`."""
        if err.errno == errno.ELOOP:
            return ("it is a symbolic link: remove it (e2vd never makes one; a link could point the lock "
                    "at any file) or set gpu_lock to another path")
        if err.errno == errno.EISDIR:
            return f"it is a directory: set gpu_lock to a file in it, e.g. {os.path.join(self.path, LOCK_FILE_NAME)}"
        if err.errno == errno.ENAMETOOLONG:
            return "its path is too long for the file system: set gpu_lock to a shorter path"
        if err.errno == errno.ENXIO:
            return f"it is a socket, not a regular file: {_SET_ANOTHER}"
        if err.errno == errno.ENOENT:
            return f"its directory {os.path.dirname(self.path)} does not exist"
        if err.errno in (errno.EACCES, errno.EPERM):
            return f"uid {os.geteuid()} may not open it or create it ({err.strerror})"
        return f"it cannot be opened ({err.strerror or err})"

    def _acquire(self, fd: int) -> float | None:
        """Take the lock on `fd`; seconds waited, or None where the file system has no flock.
        Raises GpuLockTimeout after timeout_s."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                raise
            else:
                if not announced:
                    return 0.0              # free at the first try
                waited = time.monotonic() - start
                event("gpu_lock_acquired", f"Got the GPU lock {self.path} after {waited:.1f} s.",
                      lock=self.path, waited_s=round(waited, 3))
                return waited
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout()
            if not announced:
                announced = True
                event("gpu_lock_wait", f"Waiting up to {self.timeout_s:g} s for the GPU lock {self.path}: "
                      f"another e2vd daemon is choosing a GPU and loading its model "
                      f"({self.holder() or 'holder unknown'}).", lock=self.path, holder=self.holder() or None,
                      timeout_s=self.timeout_s)
            time.sleep(min(POLL_S, deadline - now))

    def _timeout(self) -> GpuLockTimeout:
        who = self.holder()
        return GpuLockTimeout(
            f"another e2vd daemon has held the GPU lock {self.path} for more than {self.timeout_s:g} s "
            f"({who or 'holder unknown'}) while choosing a GPU and loading its model",
            "Retry in a minute; if it persists, that daemon is stuck: find it with `systemctl "
            "list-units 'e2vd*'` and `journalctl -u 'e2vd*'` and stop it, or raise gpu_lock_timeout "
            "(or set busy_policy = \"cpu\" to load on the CPU instead)")

    def _unavailable(self, why: str) -> LockOutcome:
        problem = f"the GPU lock file {self.path} cannot be used: {why}"
        event("gpu_lock_unavailable", f"Loading without the GPU lock: {problem}. Two daemons starting "
              f"at once may then both pass the min_free_mb check. Fix: for a systemd unit, give it "
              f"RuntimeDirectory=e2vd/lock, RuntimeDirectoryMode=0770, RuntimeDirectoryPreserve=yes "
              f"and Group=e2vd-daemon (`e2vd install` writes them); or set gpu_lock to a file in a "
              f"directory every e2vd daemon may write.", logging.WARNING, lock=self.path, reason=why)
        return LockOutcome(self.path, False, 0.0, problem)

    def _write_holder(self, fd: int) -> None:
        line = (f"pid {os.getpid()}{', ' + self.owner if self.owner else ''}, since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}").encode()[:HOLDER_MAX_BYTES - 1] + b"\n"
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)


_SET_ANOTHER = (f"set gpu_lock to a regular file's path (or to \"\" for <socket directory>/{LOCK_DIR_NAME}/"
                f"{LOCK_FILE_NAME})")


def _not_regular(mode: int) -> str:
    """Why a lock path whose file has `mode` cannot be used, and what to do: a FIFO may be
    removed (nothing of e2vd's makes one), a device such as /dev/null must not be."""
    if stat.S_ISFIFO(mode):
        return f"it is a FIFO, not a regular file: remove it (e2vd never makes one) or {_SET_ANOTHER}"
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"it is {kind}, not a regular file: {_SET_ANOTHER}" if kind != "not a regular file" \
        else f"it is not a regular file: {_SET_ANOTHER}"


def _holder_text(data: bytes) -> bool:
    """Whether `data` (a lock file's first HOLDER_MAX_BYTES + 1 bytes) is what `_write_holder`
    writes: one line "pid N, ..." of at most HOLDER_MAX_BYTES bytes."""
    return (len(data) <= HOLDER_MAX_BYTES and re.match(rb"pid [0-9]+[,\n]", data) is not None
            and data.count(b"\n") <= 1)


def _clean(raw: bytes) -> str:
    """The first line of `raw` as text without control characters (it comes from another process)."""
    text = raw.decode("utf-8", "replace").split("\n", 1)[0]
    return re.sub(r"[\x00-\x1f\x7f]", "?", text).strip()[:200]
