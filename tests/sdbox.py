#!/usr/bin/env python3
"""Boot a real systemd as PID 1 of throw-away namespaces, drive it, tear it down.

The box is a copy-on-write overlay of the host's root file system (writes land in a tmpfs and
vanish with the box), with its own pid, mount, uts, ipc and cgroup namespaces, and fresh
/run, /tmp and /dev.  The host keeps its clock, its /etc and its cgroups: the box's systemd
lives in one cgroup of its own (``e2vd-sdbox-NAME`` on the host's cgroup2 hierarchy) and sees
that cgroup as its root, so it can never move a host process.

Host side effects: the state directory ``$E2VD_SDBOX_ROOT/NAME`` (default
``/tmp/e2vd-sdbox/NAME``) and that one cgroup; both are removed by ``stop``.

Command line (root only)::

    python3 tests/sdbox.py start NAME [--bind SRC[:DST]] [--bind-ro SRC[:DST]]
    python3 tests/sdbox.py exec NAME -- CMD...     # exit status is CMD's
    python3 tests/sdbox.py stop NAME | stop-all

From Python: ``with Box.start("name") as box: box.run(["systemctl", "status"])``.

Needs root, util-linux (unshare, nsenter, setpriv, pivot_root), overlayfs and cgroup2.
Only other mounts than / (e.g. a separate /home) must be passed with ``--bind``.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

STATE_ROOT = Path(os.environ.get("E2VD_SDBOX_ROOT", "/tmp/e2vd-sdbox"))
SYSTEMD = os.environ.get("E2VD_SDBOX_SYSTEMD", "/lib/systemd/systemd")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SELF = Path(__file__).resolve()
# Units that make no sense in a box (and would slow its boot or spam its journal).
MASK = ("systemd-journald-audit.socket", "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer",
        "e2scrub_all.timer", "fstrim.timer", "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer")
# Capabilities the box's PID 1 never gets: in particular it can never set the host clock.
DROP_CAPS = "-sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-sys_pacct,-mac_admin,-mac_override"


class BoxError(RuntimeError):
    """The box could not be booted, driven or torn down; the message says why."""


def unavailable_reason() -> str | None:
    """Why boxes cannot run here (not root, no overlayfs/cgroup2/tools), or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to create namespaces and mounts"
    for tool in ("unshare", "nsenter", "setpriv", "pivot_root", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install util-linux)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if _cgroup2_root() is None:
        return "no cgroup2 hierarchy is mounted"
    probe = subprocess.run(["unshare", "--pid", "--mount", "--uts", "--ipc", "--cgroup", "--fork", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here (unshare: {probe.stderr.strip()})"
    return None


def _cgroup2_root() -> Path | None:
    """The host's cgroup2 mount: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def _alive(pid: int | None) -> bool:
    """Whether `pid` exists and is not a zombie."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def hidden_host_paths() -> list[str]:
    """This checkout and the Python running it, where a box would not see them: inside a box /tmp
    and /run are fresh tmpfs and the overlay covers only the root file system.  Box.start binds
    these read-only at the same paths, so a checkout in /tmp (a CI clone) works like one in /work."""
    root_dev = os.stat("/").st_dev
    wanted = {SELF.parent.parent, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent}
    hidden = sorted(p for p in wanted
                    if p.parts[1:2] in (("tmp",), ("run",)) or os.stat(p).st_dev != root_dev)
    return [str(p) for p in hidden if not any(q != p and q in p.parents for q in hidden)]


@dataclass
class Box:
    """One booted box.  `init` is the host PID of its systemd (PID 1 inside)."""

    name: str
    binds: list[str] = field(default_factory=list)
    binds_ro: list[str] = field(default_factory=list)
    init: int = 0

    @property
    def state(self) -> Path:
        """The host directory holding this box's config, pids and mount points."""
        return STATE_ROOT / self.name

    @property
    def cgroup(self) -> Path:
        """This box's cgroup on the host's cgroup2 hierarchy."""
        root = _cgroup2_root()
        assert root is not None
        return root / f"e2vd-sdbox-{self.name}"

    @property
    def root(self) -> Path:
        """The box's root file system as seen from the host (valid while it runs)."""
        return Path(f"/proc/{self.init}/root")

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, name: str, binds: Sequence[str] = (), binds_ro: Sequence[str] = (),
              timeout: float = 60.0) -> "Box":
        """Boot a box; return once `systemctl is-system-running` says running or degraded."""
        box = cls(name, list(binds), [*hidden_host_paths(), *binds_ro])
        if box.state.exists():
            raise BoxError(f"{box.state} exists (stale? run: {SELF} stop {name})")
        (box.state / "root").mkdir(parents=True)
        (box.state / "rw").mkdir()
        cg = box.cgroup
        if cg.exists():
            box._remove_cgroup()
        (cg / "leader").mkdir(parents=True)
        (cg / "payload").mkdir()
        (box.state / "config.json").write_text(json.dumps(
            {"binds": box.binds, "binds_ro": box.binds_ro, "cgroup": str(cg)}))
        console = open(box.state / "console.log", "wb")
        launcher = subprocess.Popen([sys.executable, str(SELF), "_leader", name], stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        console.close()
        try:
            box._wait_for_init(launcher, timeout)
            state = box.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout).stdout
            if state.strip() not in ("running", "degraded"):
                raise BoxError(f"box {name} did not boot: is-system-running says {state.strip()!r}")
        except BaseException as exc:
            log = (box.state / "console.log").read_text(errors="replace")[-3000:]
            box.stop(kill=True)
            raise BoxError(f"boot of box {name} failed: {exc}\n--- console ---\n{log}") from exc
        atexit.register(box.stop, kill=True)   # a safety net if the caller never stops it
        return box

    def _wait_for_init(self, launcher: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        host_root = os.stat("/")
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                raise BoxError(f"launcher exited with status {launcher.returncode}")
            try:
                leader = int((self.state / "leader.pid").read_text())
                init = int(Path(f"/proc/{leader}/task/{leader}/children").read_text().split()[0])
                root = os.stat(f"/proc/{init}/root")
                if (root.st_dev, root.st_ino) != (host_root.st_dev, host_root.st_ino) and \
                        Path(f"/proc/{init}/root/run/systemd/private").is_socket():
                    self.init = init
                    (self.state / "init.pid").write_text(str(init))
                    return
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
        raise BoxError(f"no systemd came up within {timeout} s")

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is alive and inside this box's cgroup (guards every signal we send)."""
        if not _alive(pid):
            return False
        rel = "/" + self.cgroup.name
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        return any(l.startswith("0::") and (l[3:] == rel or l[3:].startswith(rel + "/")) for l in lines)

    def _procs(self) -> list[int]:
        pids: list[int] = []
        for f in self.cgroup.rglob("cgroup.procs"):
            try:
                pids += [int(p) for p in f.read_text().split()]
            except OSError:
                pass
        return pids

    def _remove_cgroup(self) -> None:
        cg = self.cgroup
        if not cg.exists():
            return
        if (cg / "cgroup.kill").exists():
            (cg / "cgroup.kill").write_text("1")
        else:
            for pid in self._procs():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        while self._procs() and time.monotonic() < deadline:
            time.sleep(0.02)
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [cg]:
            try:
                d.rmdir()
            except OSError:
                pass
        if cg.exists():
            raise BoxError(f"could not remove cgroup {cg} (processes left: {self._procs()})")

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Power the box off (SIGRTMIN+4 to its PID 1; SIGKILL after `timeout` or if `kill`), clean up."""
        if not self.state.exists():
            return
        if not self.init:
            try:
                self.init = int((self.state / "init.pid").read_text())
            except (OSError, ValueError):
                self.init = 0
        if self.init and self._ours(self.init):
            if not kill:
                os.kill(self.init, signal.SIGRTMIN + 4)   # = systemctl poweroff
                deadline = time.monotonic() + timeout
                while self._ours(self.init) and time.monotonic() < deadline:
                    time.sleep(0.02)
            if self._ours(self.init):
                os.kill(self.init, signal.SIGKILL)        # the whole pid namespace dies with it
        self._remove_cgroup()
        # every box mount lived in the box's own mount namespace, which is gone now
        mounts = Path("/proc/self/mounts").read_text()
        if f" {self.state}/" in mounts or f" {self.state} " in mounts:
            raise BoxError(f"mounts still present below {self.state}; not removing it")
        log = self.state / "console.log"
        if log.exists() and log.stat().st_size:   # keep what systemd printed, for a post-mortem
            shutil.copy(log, STATE_ROOT / f"{self.name}.console.log")
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> "Box":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- driving
    def command(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """The host argv that runs `argv` inside the box as root, in a clean environment."""
        ns = ["nsenter", "-t", str(self.init), "-m", "-u", "-i", "-p", "-C", "-r", "-w", "--",
              "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=cat",
              "SYSTEMD_COLORS=0"]
        ns += [f"{k}={v}" for k, v in (env or {}).items()]
        return ns + list(argv)

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 120.0,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `argv` inside the box; text output captured.  Raises BoxError when `check` and it fails."""
        if not self._ours(self.init):
            raise BoxError(f"box {self.name} is not running")
        cp = subprocess.run(self.command(argv, env), capture_output=True, text=True, timeout=timeout,
                            input=input)
        if check and cp.returncode != 0:
            raise BoxError(f"in box {self.name}: {' '.join(argv)} exited {cp.returncode}\n"
                           f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
        return cp

    def sh(self, script: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a bash script inside the box."""
        return self.run(["bash", "-c", script], check=check, timeout=timeout)

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file inside the box (its overlay; the host file system is untouched)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        target.write_bytes(data)
        target.chmod(mode)


def stop_all() -> None:
    """Stop every box under STATE_ROOT (a session-end safety net)."""
    if STATE_ROOT.is_dir():
        for d in STATE_ROOT.iterdir():
            if d.is_dir():
                Box(d.name).stop()


# --------------------------------------------------- stages of the boot
def _stage_leader(name: str) -> None:
    """Outside the new namespaces: enter the box's cgroup, then unshare pid/mount/uts/ipc."""
    box = Box(name)
    (box.cgroup / "leader" / "cgroup.procs").write_text("0")
    (box.state / "leader.pid").write_text(str(os.getpid()))
    os.execvp("unshare", ["unshare", "--pid", "--mount", "--uts", "--ipc", "--propagation", "private",
                          "--kill-child=SIGKILL", "--", sys.executable, str(SELF), "_stage2", name])


def _stage2(name: str) -> None:
    """PID 1 of the new pid namespace: move to the payload cgroup, which becomes the cgroupns root."""
    box = Box(name)
    (box.cgroup / "payload" / "cgroup.procs").write_text("0")
    os.execvp("unshare", ["unshare", "--cgroup", "--", sys.executable, str(SELF), "_stage3", name])


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _stage3(name: str) -> None:
    """Build the root file system and exec systemd in it."""
    box = Box(name)
    cfg = json.loads((box.state / "config.json").read_text())
    R, rw = box.state / "root", box.state / "rw"
    _mount("-t", "tmpfs", "-o", "mode=755", "sdbox-rw", str(rw))
    (rw / "upper").mkdir()
    (rw / "work").mkdir()
    _mount("-t", "overlay", "-o", f"lowerdir=/,upperdir={rw}/upper,workdir={rw}/work", "sdbox-root", str(R))

    # API file systems, as systemd-nspawn does it: /proc/sys and /sys read-only
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{R}/proc")
    for p in ("sys", "sysrq-trigger"):
        if (R / "proc" / p).exists():
            _mount("--bind", f"{R}/proc/{p}", f"{R}/proc/{p}")
            _mount("-o", "remount,bind,ro", f"{R}/proc/{p}")
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", f"{R}/sys")
    _mount("-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", f"{R}/sys/fs/cgroup")
    dev = R / "dev"
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid,size=4m", "sdbox-dev", str(dev))
    for node, major_minor in (("null", (1, 3)), ("zero", (1, 5)), ("full", (1, 7)), ("random", (1, 8)),
                              ("urandom", (1, 9)), ("tty", (5, 0))):
        os.mknod(dev / node, 0o666 | 0o020000, os.makedev(*major_minor))
        os.chmod(dev / node, 0o666)
    for d, mode in (("pts", 0o755), ("net", 0o755), ("shm", 0o1777)):
        (dev / d).mkdir()
        os.chmod(dev / d, mode)
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec", "devpts", f"{dev}/pts")
    os.symlink("pts/ptmx", dev / "ptmx")
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "shm", f"{dev}/shm")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / link)
    (dev / "console").touch()
    _mount("--bind", "/dev/null", f"{dev}/console")
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid,nodev,size=20%", "sdbox-run", f"{R}/run")
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "sdbox-tmp", f"{R}/tmp")

    for spec in cfg["binds"] + cfg["binds_ro"]:
        src, _, dst = spec.partition(":")
        dst = dst or src
        target = Path(f"{R}{dst}")
        if Path(src).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        _mount("--rbind", src, str(target))
        if spec in cfg["binds_ro"]:
            _mount("-o", "remount,bind,ro", str(target))

    # configuration: written to the overlay's upper layer only
    (R / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (R / "etc" / "hostname").write_text(name + "\n")
    subprocess.run(["hostname", name], check=True)
    units = R / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    jconf = R / "etc" / "systemd" / "journald.conf.d"
    jconf.mkdir(parents=True, exist_ok=True)
    (jconf / "sdbox.conf").write_text("[Journal]\nStorage=volatile\nReadKMSG=no\n")
    for unit in MASK:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    (units / "sdbox.target").write_text(
        "[Unit]\nDescription=sdbox default target (basic system: sysinit, sockets, timers, paths)\n"
        "Requires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n")

    os.chdir(R)
    os.mkdir(".sdbox-oldroot")
    subprocess.run(["pivot_root", ".", ".sdbox-oldroot"], check=True)
    os.chdir("/")
    subprocess.run(["umount", "-l", "/.sdbox-oldroot"], check=True)
    os.rmdir("/.sdbox-oldroot")
    os.execvp("setpriv", ["setpriv", "--bounding-set", DROP_CAPS, "--", "env", "-i", "container=sdbox",
                          "TERM=linux", f"PATH={PATH}", SYSTEMD, "--unit=sdbox.target", "--show-status=no"])


def main(argv: Sequence[str]) -> int:
    """The command line described in the module docstring."""
    if os.geteuid() != 0:
        print("sdbox: must run as root", file=sys.stderr)
        return 1
    cmd, rest = (argv[0], list(argv[1:])) if argv else ("", [])
    if cmd in ("_leader", "_stage2", "_stage3"):
        {"_leader": _stage_leader, "_stage2": _stage2, "_stage3": _stage3}[cmd](rest[0])
        return 0
    if cmd == "start" and rest:
        import argparse

        ap = argparse.ArgumentParser(prog="sdbox.py start")
        ap.add_argument("name")
        ap.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]")
        ap.add_argument("--bind-ro", action="append", default=[], metavar="SRC[:DST]")
        opts = ap.parse_args(rest)
        box = Box.start(opts.name, opts.bind, opts.bind_ro)
        atexit.unregister(box.stop)   # the command line leaves it running until `stop`
        print(box.init)
        return 0
    if cmd == "exec" and rest:
        box = Box(rest[0], init=int((STATE_ROOT / rest[0] / "init.pid").read_text()))
        args = rest[2:] if rest[1:2] == ["--"] else rest[1:]
        return subprocess.run(box.command(args)).returncode
    if cmd == "stop" and rest:
        Box(rest[0]).stop(kill="--kill" in rest)
        return 0
    if cmd == "stop-all":
        stop_all()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
