"""e2vd.gpu_lock: real processes contending on a real lock file, the bounded wait, lock files that
cannot be used, the engine and the daemon loading under the lock, and (on a GPU only) two daemons
started at once against a min_free_mb only one of them fits, and the cached memory handed back
after a large batch.

The holders are subprocesses running `HOLDER` (a `GpuLock` held until a line arrives on stdin);
they report on stdout ("HELD", "RELEASED", "TIMEOUT ...", and "LOG <message>" for each log record),
so every step is read from the other process, never assumed from time passing.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import wav_clip
from daemon_proc import ROOT, DaemonProcess

from e2vd import gpu_lock
from e2vd.gpu_lock import GpuLock, GpuLockTimeout, lock_path

HOLDER = r"""
import logging, os, sys
logging.basicConfig(stream=sys.stdout, format="LOG %(message)s", level=logging.INFO)
os.umask(0o077)   # the units' UMask=
from e2vd.gpu_lock import GpuLock, GpuLockTimeout
if sys.argv[4] != "-":   # become another user, as a dynamic user is (after the imports: Python is under /root)
    os.setgroups([])
    os.setgid(int(sys.argv[5]))
    os.setuid(int(sys.argv[4]))
lock = GpuLock(sys.argv[1], float(sys.argv[2]), owner=sys.argv[3])
try:
    with lock.hold() as got:
        print("HELD", got.held, got.waited_s > 0, flush=True)
        sys.stdin.readline()
    print("RELEASED", flush=True)
except GpuLockTimeout as err:
    print("TIMEOUT", err, flush=True)
"""

NOBODY = 65534   # nobody / nogroup
DAEMON_UID = 1   # another uid, for "a second dynamic user"


class Holder:
    """A subprocess that takes the lock at `path` (waiting at most `timeout` s) as `owner`."""

    def __init__(self, path: Path, timeout: float, owner: str, uid: int | None = None,
                 gid: int | None = None) -> None:
        user = [str(uid), str(gid if gid is not None else uid)] if uid is not None else ["-", "-"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(timeout), owner, *user],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")

    def line(self) -> str:
        """The next line it printed ("" once it exited)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().rstrip("\n")

    def until(self, prefix: str) -> tuple[str, list[str]]:
        """Read lines until one starts with `prefix`; (that line, the lines before it)."""
        before: list[str] = []
        while True:
            line = self.line()
            if line.startswith(prefix):
                return line, before
            assert line, f"exited (code {self.proc.wait()}) without printing {prefix!r}; it printed {before}"
            before.append(line)

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.close()


def start(holders: list[Holder], *args, **kwargs) -> Holder:
    h = Holder(*args, **kwargs)
    holders.append(h)
    return h


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="e2vd-lock-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def is_locked(path: Path) -> bool:
    """Whether some process holds the flock on `path` (tried from this process, never blocking)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- where the lock is ----------------------------------------------------------------------------

def test_the_lock_file_is_next_to_the_socket_unless_set() -> None:
    assert lock_path("", "/run/e2vd/e2vd.sock") == "/run/e2vd/lock/gpu.lock"
    assert lock_path("", "/run/e2vd/asr.sock") == "/run/e2vd/lock/gpu.lock"   # every instance: one lock
    assert lock_path("/srv/locks/gpu.lock", "/run/e2vd/e2vd.sock") == "/srv/locks/gpu.lock"


def test_the_settings_take_a_lock_path_and_a_bounded_wait() -> None:
    from e2vd.config import ConfigError, load_settings

    s = load_settings(env={"E2VD_GPU_LOCK": "/srv/gpu.lock", "E2VD_GPU_LOCK_TIMEOUT": "2m"}, config_path=os.devnull)
    assert (s.gpu_lock, s.gpu_lock_timeout) == ("/srv/gpu.lock", 120.0)
    assert load_settings(env={}, config_path=os.devnull).gpu_lock == ""
    with pytest.raises(ConfigError, match="E2VD_GPU_LOCK: must be an absolute path"):
        load_settings(env={"E2VD_GPU_LOCK": "gpu.lock"}, config_path=os.devnull)
    with pytest.raises(ConfigError, match="E2VD_GPU_LOCK_TIMEOUT: expected seconds as a number, or a duration"):
        load_settings(env={"E2VD_GPU_LOCK_TIMEOUT": "soon"}, config_path=os.devnull)
    with pytest.raises(ConfigError, match="--gpu-lock-timeout: must be >= 0"):
        load_settings({"gpu_lock_timeout": -1.0}, env={}, config_path=os.devnull)


# --- two processes, one lock ---------------------------------------------------------------------

def test_the_second_process_waits_until_the_first_releases(tmp_path: Path, holders: list[Holder]) -> None:
    path = tmp_path / "lock" / "gpu.lock"          # the directory is created by the first
    first = start(holders, path, 60, "instance first")
    assert first.line() == "HELD True False"
    assert GpuLock(str(path), 0).holder().startswith(f"pid {first.proc.pid}, instance first, since ")
    second = start(holders, path, 60, "instance second")
    waiting, _ = second.until("LOG Waiting up to 60 s for the GPU lock")
    assert f"pid {first.proc.pid}, instance first" in waiting and str(path) in waiting
    # it tried, failed and waits: the file still names the first holder, which still holds it
    assert GpuLock(str(path), 0).holder().startswith(f"pid {first.proc.pid},") and is_locked(path)
    first.release()
    assert first.line() == "RELEASED"
    got, _ = second.until("HELD")
    assert got == "HELD True True"                  # held, after waiting
    assert GpuLock(str(path), 0).holder().startswith(f"pid {second.proc.pid}, instance second, ")
    second.release()
    assert second.line() == "RELEASED" and second.proc.wait() == 0
    assert not is_locked(path) and GpuLock(str(path), 0).holder() == ""   # released, holder line cleared


def test_the_wait_is_bounded_and_the_error_names_the_holder(tmp_path: Path, holders: list[Holder]) -> None:
    path = tmp_path / "gpu.lock"
    first = start(holders, path, 60, "instance stuck")
    assert first.line().startswith("HELD True")
    for timeout in (0.3, 0):
        late = start(holders, path, timeout, "instance late")
        line, _ = late.until("TIMEOUT")
        assert f"held the GPU lock {path} for more than {timeout:g} s (pid {first.proc.pid}, instance stuck" in line
        assert "did not load its model" in line and "gpu_lock_timeout" in line and 'busy_policy = "cpu"' in line
        assert late.proc.wait() == 0
    assert is_locked(path)                          # the first still holds it


def test_a_holder_that_dies_leaves_no_stale_lock(tmp_path: Path, holders: list[Holder]) -> None:
    path = tmp_path / "gpu.lock"
    first = start(holders, path, 60, "instance crashed")
    assert first.line().startswith("HELD True")
    first.proc.kill()
    first.proc.wait()
    after = start(holders, path, 60, "instance next")
    assert after.until("HELD")[0] == "HELD True False"


def test_daemons_of_different_dynamic_users_share_the_lock_through_their_group(
        shared_dir: Path, holders: list[Holder]) -> None:
    """As under systemd: instance daemons run as different dynamic uids with one primary group
    (Group=e2vd-daemon), UMask=0077, in a 0770 directory. The file the first makes is 0660, so
    the second opens it for writing (its holder line shows) and waits for it."""
    directory = shared_dir / "lock"
    directory.mkdir(mode=0o770)
    os.chown(directory, NOBODY, NOBODY)
    directory.chmod(0o770)
    path = directory / "gpu.lock"
    first = start(holders, path, 60, "instance a", uid=NOBODY, gid=NOBODY)
    assert first.line() == "HELD True False"
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, NOBODY)
    second = start(holders, path, 60, "instance b", uid=DAEMON_UID, gid=NOBODY)
    second.until("LOG Waiting")
    first.release()
    assert second.until("HELD")[0] == "HELD True True"
    assert GpuLock(str(path), 0).holder().startswith(f"pid {second.proc.pid}, instance b")


def test_a_daemon_that_may_only_read_the_file_still_takes_part(shared_dir: Path, holders: list[Holder]) -> None:
    path = shared_dir / "gpu.lock"
    path.write_text("")
    path.chmod(0o644)                               # root's, read-only for others
    reader = start(holders, path, 60, "instance reader", uid=NOBODY, gid=NOBODY)
    assert reader.line() == "HELD True False"
    assert is_locked(path)                          # held through a read-only descriptor
    writer = start(holders, path, 60, "instance writer")
    writer.until("LOG Waiting")
    reader.release()
    assert writer.until("HELD")[0] == "HELD True True"


# --- lock files that cannot be used: load without the lock, with a warning that says how to fix it ---

def unusable(path: Path, holders: list[Holder], **user: int) -> list[str]:
    """Run a holder on `path`; assert it loaded without the lock; return its log lines."""
    h = start(holders, path, 60, "instance x", **user)
    line, logs = h.until("HELD")
    assert line == "HELD False False"
    h.release()
    assert h.line() == "RELEASED"
    assert any("Loading without the GPU lock" in log and "RuntimeDirectory=e2vd/lock" in log for log in logs), logs
    return logs


def test_a_directory_that_cannot_be_created_means_no_lock_and_a_warning(tmp_path: Path, holders: list[Holder]) -> None:
    (tmp_path / "file").write_text("")
    logs = unusable(tmp_path / "file" / "lock" / "gpu.lock", holders)
    assert any("does not exist and cannot be created" in log for log in logs)


def test_an_unwritable_directory_without_the_file_means_no_lock(shared_dir: Path, holders: list[Holder]) -> None:
    logs = unusable(shared_dir / "gpu.lock", holders, uid=NOBODY, gid=NOBODY)   # 0755 root: nobody may not create
    assert any(f"uid {NOBODY} may not open it or create it" in log for log in logs)


def test_a_file_of_another_user_it_may_not_read_means_no_lock(shared_dir: Path, holders: list[Holder]) -> None:
    path = shared_dir / "gpu.lock"
    path.write_text("")
    path.chmod(0o600)
    unusable(path, holders, uid=NOBODY, gid=NOBODY)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_without_hanging(
        tmp_path: Path, holders: list[Holder], kind: str) -> None:
    path = tmp_path / "gpu.lock"
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text("keep")
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    logs = unusable(path, holders)
    if kind == "symlink":
        assert any("it is a symbolic link" in log for log in logs)
        assert (tmp_path / "elsewhere").read_text() == "keep"


def test_timeout_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        GpuLock("/run/e2vd/lock/gpu.lock", -1)


# --- the engine and the daemon load under the lock --------------------------------------------------

def test_the_engine_waits_for_the_lock_then_refuses_or_uses_the_cpu(
        tiny_model: Path, tmp_path: Path, holders: list[Holder]) -> None:
    """No GPU here, so "auto" loads on the CPU, but it still takes the lock (it may find a GPU):
    with another process holding it, busy_policy refuse raises GpuLockTimeout (the daemon's 503
    model_unavailable), busy_policy cpu loads on the CPU; device = "cpu" never waits for it."""
    from e2vd.engine import Engine

    path = tmp_path / "gpu.lock"
    other = start(holders, path, 60, "instance other")
    assert other.line().startswith("HELD True")
    lock = GpuLock(str(path), 0.2)
    with pytest.raises(GpuLockTimeout, match=f"pid {other.proc.pid}, instance other"):
        Engine.load(str(tiny_model), device="auto", busy_policy="refuse", gpu_lock=lock)
    assert Engine.load(str(tiny_model), device="auto", busy_policy="cpu", gpu_lock=lock).device == "cpu"
    assert Engine.load(str(tiny_model), device="cpu", gpu_lock=GpuLock(str(path), 0)).device == "cpu"
    other.release()
    assert other.line() == "RELEASED"
    engine = Engine.load(str(tiny_model), device="auto", gpu_lock=lock)
    assert engine.device == "cpu" and not is_locked(path)   # taken, and released once loaded


def test_a_daemon_whose_lock_stays_held_answers_model_unavailable_then_exits(
        tiny_model: Path, tmp_path: Path, holders: list[Holder]) -> None:
    """The default lock path (next to the socket), held by a stuck loader: the daemon answers 503
    model_unavailable naming the lock and its holder, and exits 5 after unavailable_grace (the
    socket then starts a fresh daemon for the next client, never a tight loop)."""
    other = start(holders, tmp_path / "lock" / "gpu.lock", 60, "instance stuck")
    assert other.line().startswith("HELD True")
    d = DaemonProcess(tmp_path / "d.sock", tiny_model, device="auto", gpu_lock_timeout=0.5,
                      unavailable_grace=1)
    with d:
        status, body = d.settled_health()
        assert status == 503 and body["error"]["code"] == "model_unavailable", body
        assert f"GPU lock {tmp_path / 'lock' / 'gpu.lock'}" in body["error"]["message"]
        assert f"pid {other.proc.pid}, instance stuck" in body["error"]["message"]
        assert d.wait(60) == 5
    assert "event=gpu_lock_wait" in d.log_text()


# --- the cached GPU memory after a batch -------------------------------------------------------------

def test_releasing_the_cache_on_the_cpu_does_nothing_and_leaves_cuda_alone(tiny_model: Path) -> None:
    code = (
        "import torch\n"
        "from e2vd.engine import Engine\n"
        f"e = Engine.load({str(tiny_model)!r}, device='cpu')\n"
        "from e2vd.audio import from_samples\n"
        "import numpy as np\n"
        "e.recognize(from_samples(np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1, 16000))\n"
        "print(e.release_cache(), e.release_cache(slack_bytes=0), torch.cuda.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["None", "None", "False"]


class ReleaseRecorder:
    """The real engine, with `release_cache` recording which jobs were answered when it ran (the
    GPU side of it cannot run here; on the CPU the real one returns None without doing anything)."""

    def __init__(self, engine, jobs: list) -> None:
        self._engine, self._jobs, self.calls = engine, jobs, []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def release_cache(self):
        self.calls.append([job.done.is_set() for job in self._jobs])
        return self._engine.release_cache()


def test_the_scheduler_releases_the_cache_after_the_answers_and_only_when_no_job_waits(tiny_model: Path) -> None:
    import threading

    from conftest import speechlike

    from e2vd.audio import from_samples
    from e2vd.engine import Engine
    from e2vd.scheduler import Scheduler

    jobs: list = []
    recorder = ReleaseRecorder(Engine.load(str(tiny_model), device="cpu"), jobs)
    gate = threading.Event()

    def load():
        gate.wait(60)
        return recorder

    sch = Scheduler(load, queue_size=8, max_batch=2)
    sch.start()
    try:
        jobs += [sch.submit(from_samples(speechlike(1.0, seed=i)[:, 0], 16000)) for i in range(3)]
        gate.set()
        assert all(job.wait(60) for job in jobs) and all(job.error is None for job in jobs)
        sch.stop(10)
        # two batches (2 + 1 jobs): no release while the third job waited; one after, all answered
        assert recorder.calls == [[True, True, True]]
    finally:
        sch.stop(10)


# --- on a GPU -----------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


@needs_gpu
def test_two_daemons_started_at_once_on_one_gpu_one_loads_the_other_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """min_free_mb = what is free now less 100 MiB: the first daemon to hold the lock fits, and its
    CUDA context alone (several hundred MiB) leaves the second below min_free_mb. Without the lock
    both would check before either allocated, and both would load. The refused one answers 503
    model_unavailable naming min_free_mb (not an out-of-memory error) and exits 5; the other serves."""
    from e2vd import gpu

    free_mb = gpu.list_gpus()[0].free_mb
    daemons = [DaemonProcess(tmp_path / f"{name}.sock", tiny_model, device="cuda:0",
                             min_free_mb=free_mb - 100, busy_policy="refuse", unavailable_grace=3,
                             idle_timeout=600) for name in ("a", "b")]   # one lock: tmp_path/lock/gpu.lock
    try:
        with ThreadPoolExecutor(2) as pool:   # both processes started at the same moment
            list(pool.map(DaemonProcess.start, daemons))
        answers = [d.settled_health() for d in daemons]
        ready = [d for d, (status, body) in zip(daemons, answers) if status == 200 and body.get("status") == "ready"]
        refused = [(d, body) for d, (status, body) in zip(daemons, answers) if status == 503]
        assert len(ready) == 1 and len(refused) == 1, answers
        d, body = refused[0]
        assert body["error"]["code"] == "model_unavailable" and "min_free_mb" in body["error"]["message"], body
        assert "out of memory" not in body["error"]["message"]
        assert d.wait(60) == 5
        assert ready[0].request("POST", "/v1/recognize", wav_clip(2.0))[0] == 200
    finally:
        for d in daemons:
            if d.proc is not None:
                d.__exit__(None, None, None)


@needs_gpu
def test_reserved_gpu_memory_falls_back_after_a_large_batch(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 x 30 s clips leave PyTorch's cache holding their activations; the scheduler, once the
    answers are back and nothing waits, hands the excess back: reserved falls to within the slack
    (0 here: the tiny stand-in's activations stay far below the default 1 GiB)."""
    from e2vd import engine as engine_module
    from e2vd.audio import decode
    from e2vd.engine import Engine
    from e2vd.scheduler import Scheduler

    monkeypatch.setattr(engine_module, "CACHE_SLACK_BYTES", 0)
    engine = Engine.load(str(tiny_model), device="cuda:0")
    clips = [decode(wav_clip(30.0, seed=i)) for i in range(8)]
    engine.recognize_batch(clips)
    allocated = torch.cuda.memory_allocated(0)
    before = torch.cuda.memory_reserved(0)
    assert before > allocated, "the batch left nothing cached: nothing to show"
    release = engine.release_cache()
    assert release is not None and release.reserved_before_bytes == before
    assert release.reserved_after_bytes < before and torch.cuda.memory_reserved(0) == release.reserved_after_bytes
    # and through the scheduler: after a batch, with nothing waiting
    sch = Scheduler(lambda: engine, queue_size=16, max_batch=8)
    sch.start()
    try:
        jobs = [sch.submit(c) for c in clips]
        assert all(job.wait(120) for job in jobs) and all(job.error is None for job in jobs)
        sch.stop(30)   # the worker has finished its loop: the release after the batch has run
        assert torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0) < before - allocated
    finally:
        sch.stop(30)


def test_the_plain_unit_gives_its_daemon_the_lock_directory() -> None:
    """The plain unit gives its daemon /run/e2vd/lock, kept across stops and shared through the
    group, where the default lock path (next to /run/e2vd/e2vd.sock) points."""
    text = (ROOT / "systemd" / "e2vd.service").read_text()
    assert f"RuntimeDirectory=e2vd/{gpu_lock.LOCK_DIR_NAME}\n" in text
    assert "RuntimeDirectoryPreserve=yes\n" in text and "RuntimeDirectoryMode=0770\n" in text
    assert "Group=e2vd-daemon\n" in text


# --- under a real systemd ------------------------------------------------------------------------

BOX_MODEL = "/srv/e2vd-models/tiny"


@pytest.mark.systemd
@pytest.mark.slow
def test_under_systemd_two_dynamic_users_share_the_kept_lock_directory(tiny_model: Path) -> None:
    """The installed e2vd.service and a second unit made from it with a dynamic user of its own
    (as an instance e2vd@NAME has) and the same Group=: systemd makes /run/e2vd/lock 0770 for
    both, each daemon takes the lock (no gpu_lock_unavailable warning) in the file the first made
    0660, the socket keeps its owner and mode, and the directory and file outlive both daemons."""
    import sdbox

    reason = sdbox.unavailable_reason()
    if reason:
        pytest.skip(f"no throw-away systemd: {reason}")
    env = {"PYTHONPATH": str(ROOT)}
    box = sdbox.Box.start(f"e2vd-lock-{os.getpid()}", binds_ro=[f"{tiny_model}:{BOX_MODEL}"])
    try:
        box.run([sys.executable, "-m", "e2vd", "install", "--no-pull"], env=env)
        settings = f'model = "{BOX_MODEL}"\ndevice = "auto"\nidle_timeout = 600\n'   # auto: takes the lock
        box.write("/etc/e2vd/e2vd.toml", settings)
        box.write("/etc/e2vd/other.toml", settings)
        service = (box.root / "etc/systemd/system/e2vd.service").read_text()
        other = (service.replace("User=e2vd-daemon", "User=e2vd-other")
                 .replace("e2vd.socket", "e2vd-other.socket")
                 .replace("Environment=PYTHONUNBUFFERED=1", "Environment=E2VD_CONFIG=/etc/e2vd/other.toml\n"
                          "Environment=PYTHONUNBUFFERED=1"))
        assert "User=e2vd-other" in other and "Group=e2vd-daemon" in other
        box.write("/etc/systemd/system/e2vd-other.service", other)
        socket_unit = (box.root / "etc/systemd/system/e2vd.socket").read_text()
        box.write("/etc/systemd/system/e2vd-other.socket",
                  socket_unit.replace("/run/e2vd/e2vd.sock", "/run/e2vd/other.sock"))
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "start", "e2vd-other.socket"])
        for unit in ("e2vd.service", "e2vd-other.service"):      # returns once the model is loaded
            box.run(["systemctl", "start", unit], timeout=300)
        # /run/e2vd/lock is systemd's symbolic link to ../private/e2vd/lock (DynamicUser= with
        # RuntimeDirectoryPreserve=); each unit's namespace mounts that one directory there
        stats = box.sh("stat -L -c '%n %a %U %G' /run/e2vd/lock /run/e2vd/lock/gpu.lock /run/e2vd/e2vd.sock "
                       "/run/e2vd/other.sock").stdout.splitlines()
        assert stats[0].split()[1:] == ["770", "e2vd-other", "e2vd-daemon"], stats   # the last unit started owns it
        assert stats[1].split()[1] == "660" and stats[1].split()[3] == "e2vd-daemon", stats
        assert stats[1].split()[2] in ("e2vd-daemon", "e2vd-other"), stats
        for line in stats[2:]:
            assert line.split()[1:] == ["660", "root", "e2vd"], stats            # the sockets are untouched
        # the first daemon's uid may still open the file for writing and lock it, now that the second
        # unit's start has handed the directory and the file to its own dynamic user: through the group
        pid = box.run(["systemctl", "show", "-p", "MainPID", "--value", "e2vd.service"]).stdout.strip()
        probe = box.run(["nsenter", "-t", pid, "-m", "setpriv", "--reuid=e2vd-daemon", "--regid=e2vd-daemon",
                         "--clear-groups", "--", "sh", "-c", "exec 3<>/run/e2vd/lock/gpu.lock && flock -n 3 && echo ok"],
                        check=False)
        assert probe.stdout.strip() == "ok", probe.stderr
        journal = box.run(["journalctl", "--no-pager", "-o", "cat", "-u", "e2vd.service",
                           "-u", "e2vd-other.service"]).stdout
        assert "Loading without the GPU lock" not in journal, journal[-3000:]
        assert journal.count("Using cpu") == 2, journal[-3000:]
        # a lock held from outside: the next start waits for it, then is refused with the holder named
        box.write("/etc/e2vd/other.toml", settings + "gpu_lock_timeout = 1\nunavailable_grace = 1\n")
        box.run(["systemctl", "stop", "e2vd.service", "e2vd-other.service"])
        box.run(["systemd-run", "--unit", "lock-hog", "flock", "/run/e2vd/lock/gpu.lock", "sleep", "600"])
        box.sh("until systemctl is-active -q lock-hog; do sleep 0.1; done")
        box.run(["systemctl", "start", "--no-block", "e2vd-other.service"])
        box.sh("until journalctl -o cat -u e2vd-other.service | grep -q 'did not load its model'; do sleep 0.2; done",
               timeout=300)
        box.run(["systemctl", "stop", "lock-hog", "e2vd-other.service"])
        box.run(["systemctl", "reset-failed"], check=False)
        assert box.sh("test -d /run/e2vd/lock && test -f /run/e2vd/lock/gpu.lock && echo kept").stdout.strip() == "kept"
    finally:
        box.stop()


@pytest.mark.parametrize("kind, says", [
    ("/dev/null", "a character device, not a regular file: set gpu_lock to"),
    ("directory", "a directory: set gpu_lock to a file in it"),
    ("fifo", "a FIFO, not a regular file: remove it"),
    ("symlink", "a symbolic link: remove it"),
    ("long", "too long"),
    ("missing dir", "does not exist and cannot be created"),
])
def test_an_unusable_lock_path_says_what_to_do(tmp_path: Path, kind: str, says: str) -> None:
    """In-process: the lock is not held, the block runs, and the problem names the path and what
    to do; /dev/null is never to be removed."""
    path = {"/dev/null": Path("/dev/null"), "long": tmp_path / ("x" * 300)}.get(kind, tmp_path / "gpu.lock")
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "missing dir":
        path = tmp_path / "no" / "such" / "gpu.lock"
    with GpuLock(str(path), 0).hold() as outcome:
        assert not outcome.held
    assert str(path) in outcome.problem and says in outcome.problem, outcome.problem
    if kind == "/dev/null":
        assert "remove" not in outcome.problem
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"\x00" * 100, b"pid " + b"9" * 2000])
def test_a_lock_path_naming_someone_elses_file_leaves_it_untouched(tmp_path: Path, content: bytes) -> None:
    """gpu_lock set by mistake to an existing file (say /etc/passwd, for a daemon run by hand as
    root): it is not emptied, written or chmodded; the lock is not held and the problem says so."""
    path = tmp_path / "passwd"
    path.write_bytes(content)
    path.chmod(0o644)
    with GpuLock(str(path), 0).hold() as outcome:
        assert not outcome.held
    assert path.read_bytes() == content and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert str(path) in outcome.problem and "not a GPU lock file" in outcome.problem, outcome.problem
    assert "set gpu_lock to" in outcome.problem


def test_a_lock_file_of_a_previous_holder_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "gpu.lock"
    path.write_bytes(b"pid 12, the fallback of instance gpu, since 2026-01-01T00:00:00Z\n")
    with GpuLock(str(path), 0, owner="socket /x.sock").hold() as outcome:
        assert outcome.held
        assert path.read_text().startswith(f"pid {os.getpid()}, socket /x.sock, since ")
    assert path.read_bytes() == b""


def test_a_lock_file_of_a_stranger_is_not_waited_for(shared_dir: Path, holders: list[Holder]) -> None:
    """A lock file that another user (neither root, nor this uid, nor of one of its groups) made,
    e.g. in /tmp/lock beside a socket in /tmp: that user could hold it for ever and stop every
    load. It is not used (no wait; load without the lock, with the warning)."""
    path = shared_dir / "gpu.lock"
    path.write_text("")
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o666)
    stranger = start(holders, path, 60, "someone", uid=NOBODY, gid=NOBODY)
    assert stranger.line() == "HELD True False"
    with GpuLock(str(path), 5).hold() as outcome:
        assert not outcome.held and outcome.waited_s == 0
    assert f"belongs to uid {NOBODY}" in outcome.problem and "set gpu_lock to" in outcome.problem, outcome.problem
