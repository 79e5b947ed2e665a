"""One inference worker thread fed by a bounded queue, with dynamic batching.

funasr's `generate()` is not thread-safe, so every model call (and the model load itself) runs on
the one worker thread started by `Scheduler.start`. Connection threads decode audio, `submit` a
`Job` and wait for it. When several jobs are queued at once the worker takes up to `max_batch`
(0 = auto: `GPU_BATCH` on a GPU, 1 on the CPU, see `auto_batch`) of them, splits the jobs with
equal options into the forward passes the engine plans (`engine.forward_passes`: what it can prove
equal to one-by-one) and runs each pass through `engine.recognize_batch`; a job's `batch_size` is
the number of clips in its pass. A full queue is refused at once (`QueueFull`). Right before a pass
runs, each job's `client_gone` is asked: a job whose client has hung up is finished as `abandoned`
without running, so clients that gave up cost no inference.

The scheduler knows nothing about HTTP or the process lifecycle (docs/design.md, section 3): it
raises, or records on the job, its own errors, all `SchedulerError`s (QueueFull,
ModelUnavailable, OutOfGpuMemory, BadAudio, InferenceFailed), which the server maps to HTTP.
It exposes `state` (a `vocabulary.State`), `pending` (queued + running jobs, for the idle clock),
`served`, `abandoned` and `running`: the model call in progress (when it began, on the clock
the scheduler was given, and what it runs), which the daemon's watchdog watches (e2vd.watchdog).

After a batch, once its answers are handed back and no job waits, the worker lets the engine hand
the GPU memory PyTorch keeps cached beyond a slack back to the GPU (`engine.release_cache`, a
no-op on the CPU), so that other processes sharing the GPU can use it; a job that waits is run
first and reuses the cache.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from e2vd.gpu import GpuOutOfMemory
from e2vd.vocabulary import Granularity, State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.audio import Audio, AudioError
    from e2vd.engine import Engine, Recognition

log = logging.getLogger("e2vd")

GPU_BATCH = 8
STATE_WAIT_S = 10.0   # longest a reader of `state` waits while the observer hears of a new one


class SchedulerError(Exception):
    """A recognition the scheduler could not run; `message` (= str(err)) says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueueFull(SchedulerError):
    """`submit` found the queue full: `queue_size` jobs already wait. Transient."""

    def __init__(self, queue_size: int) -> None:
        super().__init__(f"the inference queue is full ({queue_size} requests waiting); "
                         "retry in a moment or raise queue_size")
        self.queue_size = queue_size


class ModelUnavailable(SchedulerError):
    """The model could not be loaded (or the worker died); `reason` is the load error's message."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(f"the model could not be loaded: {reason}")
        self.reason = reason


class OutOfGpuMemory(SchedulerError):
    """The job did not fit in the GPU's free memory, even alone; the engine's message names the
    clips and the fixes. Transient: the same job may run once other processes free memory."""


class BadAudio(SchedulerError):
    """The engine refused the job's audio (an `e2vd.audio.AudioError`); `code` is the audio
    module's: bad_audio, too_long or too_short."""

    def __init__(self, error: "AudioError") -> None:
        super().__init__(error.message)
        self.code = error.code


class InferenceFailed(SchedulerError):
    """The engine failed on this job: unexpectedly (the traceback is in the log), or through a
    fault of the model that its message states (`model_fault`: NaN results, no traceback)."""

    def __init__(self, exc: Exception, model_fault: bool = False) -> None:
        super().__init__(f"inference failed: {exc}" if model_fault else
                         f"inference failed ({type(exc).__name__}: {exc}); the journal has the traceback")


def model_fault(exc: BaseException) -> bool:
    """Whether `exc` is e2vd.engine's NonFiniteResult: the model computed NaN or infinity (broken
    weights), which its message explains; not a bug, so logged without a traceback. Looked up in
    sys.modules: importing the scheduler stays light, and without the engine there is no such error."""
    engine = sys.modules.get("e2vd.engine")
    return engine is not None and isinstance(exc, getattr(engine, "NonFiniteResult", ()))


def auto_batch(device: str) -> int:
    """The batch limit for `max_batch = 0`: GPU_BATCH on a GPU, 1 (no batching) on the CPU.

    On the CPU one clip already keeps every core busy, and batching measured slower: 16 clients
    on the large stand-in reached 0.84x the throughput of sequential calls with batches of 8,
    1.02x without (bench/concurrency.py --max-batch 8 / 1, 2 cores).
    """
    return 1 if device == "cpu" else GPU_BATCH


@dataclass(frozen=True)
class Running:
    """The model call the worker is in: when it began (seconds on the scheduler's clock) and
    what it runs, for the watchdog's journal event and GET /v1/status."""

    started: float
    jobs: tuple[int, ...]      # the jobs' numbers (1 = the first job submitted since start)
    audio_seconds: tuple[float, ...]
    granularity: str
    device: str

    def describe(self) -> str:
        """E.g. "job 7 (20.0 s of audio, utterance)" or "jobs 7, 8 (2 clips, 41.5 s of audio, frame)"."""
        total = sum(self.audio_seconds)
        if len(self.jobs) == 1:
            return f"job {self.jobs[0]} ({total:.1f} s of audio, {self.granularity})"
        return (f"jobs {', '.join(map(str, self.jobs))} ({len(self.jobs)} clips, {total:.1f} s of audio, "
                f"{self.granularity})")


@dataclass
class Job:
    """One recognition request. After `done` is set, exactly one of `result`, `error` or
    `abandoned` is set; an abandoned job (its client had hung up before it ran) never ran.

    `client_gone`, when given, answers whether anybody still waits for the answer; it is asked on
    the worker thread right before the job's batch runs, so it must be quick and must not block.
    """

    audio: "Audio"
    granularity: str = Granularity.UTTERANCE.value
    embedding: bool = False
    client_gone: Callable[[], bool] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: "Recognition | None" = None
    error: SchedulerError | None = None
    abandoned: bool = False
    number: int = 0         # 1 for the first job submitted since start, then 2, 3, ...
    queue_ms: float = 0.0   # from submit to the start of its forward pass (includes a cold model load)
    infer_ms: float = 0.0   # wall time of the forward pass it ran in
    batch_size: int = 0     # clips in that forward pass (1 when it ran alone)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has finished this job; False on timeout."""
        return self.done.wait(timeout)


class Scheduler:
    """Owns the engine and the single worker thread.

    `load` is called on the worker thread and returns the engine; if it raises, the scheduler
    becomes State.UNAVAILABLE with `error` set to the exception's message, and every queued or
    later job fails with ModelUnavailable. `on_state` is called on the worker thread with each
    new state (READY or UNAVAILABLE), before the worker takes any job. `on_running` is called on
    the worker thread right after a model call begins (`running` is set by then). `clock` is the
    monotonic clock of `running.started` (the daemon's). `name` is the worker thread's name (the
    journal's THREAD_NAME, and the name in a stuck daemon's stack dump).
    """

    def __init__(self, load: Callable[[], "Engine"], *, queue_size: int = 64, max_batch: int = 0,
                 on_state: Callable[[State], None] | None = None,
                 on_running: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, name: str = "e2vd-worker") -> None:
        if queue_size < 1 or max_batch < 0:
            raise ValueError("queue_size must be >= 1 and max_batch >= 0 (0 = auto)")
        self._load = load
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self._on_state = on_state
        self._on_running = on_running
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        self._running: Running | None = None
        self._submitted = 0
        self._pending = 0
        self._served = 0
        self._abandoned = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.settled = threading.Event()   # set once the model is loaded or has failed
        self._state = State.LOADING
        self._shown = threading.Event()   # clear only while the observer hears of a new state
        self._shown.set()
        self.engine: "Engine | None" = None
        self.error: str | None = None
        self._load_over = False   # the load returned, or was given up on (whichever came first)

    # --- observers (any thread) ---
    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished (queued + running)."""
        with self._lock:
            return self._pending

    @property
    def served(self) -> int:
        """Jobs finished with a result or an error since start (abandoned ones are not counted)."""
        with self._lock:
            return self._served

    @property
    def abandoned(self) -> int:
        """Jobs skipped since start because their client had hung up before they ran."""
        with self._lock:
            return self._abandoned

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    @property
    def state(self) -> State:
        """The model's state. While the worker tells its observer of a new one (the daemon: READY=1
        and the wait until systemd has read it), other threads wait for it (at most STATE_WAIT_S):
        nobody sees "ready" before systemd has READY=1, nor "loading" after `systemctl start`
        returned."""
        if threading.current_thread() is not self._thread:
            self._shown.wait(STATE_WAIT_S)
        return self._state

    @property
    def worker_alive(self) -> bool:
        """Whether the worker thread still runs (after `stop`: a load given up on that never returned)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> Running | None:
        """The model call in progress, or None while the worker is not in one."""
        with self._lock:
            return self._running

    # --- control ---
    def start(self) -> None:
        """Start the worker thread; it loads the model first, then serves jobs."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the worker to finish its current batch and exit; waits up to `timeout` seconds."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, audio: "Audio", granularity: str = Granularity.UTTERANCE.value, embedding: bool = False,
               client_gone: Callable[[], bool] | None = None) -> Job:
        """Queue a job; raises QueueFull, or ModelUnavailable once the model failed to load.
        `client_gone`: see `Job`; without it the job always runs."""
        if self.state == State.UNAVAILABLE:
            raise self.unavailable()
        job = Job(audio, granularity, embedding, client_gone)
        with self._lock:
            self._pending += 1
            self._submitted += 1
            job.number = self._submitted
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._pending -= 1
            raise QueueFull(self._queue.maxsize) from None
        return job

    def give_up_loading(self, reason: str) -> bool:
        """The load has run too long (called from another thread): the model is unavailable from
        now on, with `reason` and where the worker thread waits (file:line) as `error`; queued
        and later jobs fail with ModelUnavailable. The worker stays where it is (a thread cannot
        be interrupted in a system call); if its load ever returns, the engine is dropped and the
        worker ends. False, doing nothing, when the load had already returned."""
        with self._lock:
            if self._load_over:
                return False
            self._load_over = True
        where = self._worker_frame()
        self.error = reason + (f" (the load was waiting in {where})" if where else "")
        self._set_state(State.UNAVAILABLE)
        self.settled.set()
        threading.Thread(target=self._fail_queued, name=f"{self._name}-refusing", daemon=True).start()
        return True

    def _worker_frame(self, depth: int = 4) -> str | None:
        """Where the worker thread is: its `depth` innermost frames, innermost first, as
        "file.py:LINE (function) < ..."; None when it is not running."""
        thread = self._thread
        frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident else None
        if frame is None:
            return None
        frames = traceback.extract_stack(frame)[-depth:]
        return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} ({f.name})" for f in reversed(frames))

    def unavailable(self) -> ModelUnavailable:
        """The error of a model that could not be loaded (meaningful once `state` is UNAVAILABLE)."""
        return ModelUnavailable(self.error)

    # --- worker thread ---
    def _set_state(self, state: State) -> None:
        """Tell the observer first, then show `state` to everyone; readers of `state` on other
        threads wait meanwhile: GET /v1/health cannot say "ready" before the daemon has told
        systemd READY=1, nor "loading" once systemd has it."""
        self._shown.clear()
        try:
            if self._on_state is not None:
                try:
                    self._on_state(state)
                except Exception:  # a broken observer must not kill the worker
                    log.exception("state observer failed")
            self._state = state
        finally:
            self._shown.set()

    def _finish(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
            if job.abandoned:
                self._abandoned += 1
            else:
                self._served += 1
        job.done.set()

    def _abandon_if_gone(self, job: Job) -> bool:
        """Finish `job` as abandoned, without running it, if its client has hung up; True if so."""
        if job.client_gone is None:
            return False
        try:
            gone = bool(job.client_gone())
        except Exception:  # a broken check must not cost the client its answer
            log.exception("checking whether a client still waits failed; running its request anyway")
            return False
        if gone:
            job.abandoned = True
            job.queue_ms = (time.monotonic() - job.enqueued) * 1000.0
            self._finish(job)
        return gone

    def _run(self) -> None:
        try:
            engine = self._load()
            failure: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - any load failure makes the model unavailable
            engine, failure = None, exc
        with self._lock:
            given_up, self._load_over = self._load_over, True
        if given_up:   # give_up_loading came first: its thread refuses the jobs
            log.warning("the model load that was given up on has returned (%s); dropping it",
                        "failed" if failure is not None else "loaded")
            return
        if failure is not None:
            self.error = str(failure) or type(failure).__name__
            self._set_state(State.UNAVAILABLE)
            self.settled.set()
            self._fail_queued()
            return
        self.engine = engine
        self.max_batch = self.max_batch or auto_batch(str(getattr(self.engine, "device", "cpu")))
        self._set_state(State.READY)
        self.settled.set()
        try:
            while not self._stop.is_set():
                batch = self._take_batch()
                if batch:
                    self._run_batch(batch)
                    if self._queue.empty():
                        self._release_cache()
        except BaseException as exc:  # noqa: BLE001 - never leave waiting clients hanging
            log.exception("the inference worker failed")
            self.error = f"the inference worker failed ({type(exc).__name__}: {exc})"
            self._set_state(State.UNAVAILABLE)
            self._fail_queued()

    def _release_cache(self) -> None:
        """Between batches, nothing queued: the engine's `release_cache` (when it has one), which
        hands unused cached GPU memory back; its failure is logged and costs no job anything."""
        release = getattr(self.engine, "release_cache", None)
        if release is None:
            return
        try:
            done = release()
        except Exception:  # never worth a job: the memory stays cached, as before
            log.exception("handing PyTorch's cached GPU memory back failed")
            return
        if done is not None:
            mib = 1 << 20
            log.debug("handed %d MiB of cached GPU memory back on %s (reserved %d -> %d MiB, allocated %d MiB)",
                      done.released_bytes // mib, done.device, done.reserved_before_bytes // mib,
                      done.reserved_after_bytes // mib, done.allocated_bytes // mib)

    def _fail_queued(self) -> None:
        """After a failed load: fail every queued job, now and as they arrive, until stopped."""
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                continue
            job.error = self.unavailable()
            self._finish(job)

    def _take_batch(self) -> list[Job]:
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            batch.append(job)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        for granularity, embedding, jobs in self._forward_passes(batch):
            start = time.monotonic()
            for job in jobs:
                job.queue_ms = (start - job.enqueued) * 1000.0
                job.batch_size = len(jobs)
            try:
                results = self._infer(jobs, granularity, embedding)
            except Exception as exc:
                if model_fault(exc):
                    log.warning("batch of %d failed: %s; retrying one by one", len(jobs), exc)
                else:
                    log.exception("batch of %d failed; retrying one by one", len(jobs))
                results = None
            infer_ms = (time.monotonic() - start) * 1000.0
            if results is not None:
                for job, result in zip(jobs, results):
                    job.result, job.infer_ms = result, infer_ms
                    self._finish(job)
            else:
                for job in jobs:
                    self._run_one(job, granularity, embedding)

    def _forward_passes(self, batch: list[Job]) -> Iterator[tuple[str, bool, list[Job]]]:
        """(granularity, embedding, jobs) for each model call `batch` needs: jobs with equal options,
        split as the engine runs them in one forward pass each (its `forward_passes`, where it has
        one), so that `batch_size` and `infer_ms` describe that pass. Right before each pass, jobs
        whose client has hung up are finished as abandoned and the rest is planned again."""
        groups: dict[tuple[str, bool], list[Job]] = {}
        for job in batch:
            groups.setdefault((job.granularity, job.embedding), []).append(job)
        for (granularity, embedding), waiting in groups.items():
            while waiting:
                jobs = [job for job in waiting if not self._abandon_if_gone(job)]
                if not jobs:
                    break
                plan = getattr(self.engine, "forward_passes", None)
                first = set(plan([job.audio for job in jobs])[0] if plan else range(len(jobs)))
                yield granularity, embedding, [job for i, job in enumerate(jobs) if i in first]
                waiting = [job for i, job in enumerate(jobs) if i not in first]

    def _infer(self, jobs: list[Job], granularity: str, embedding: bool) -> list[Any]:
        """One model call for `jobs`, shown as `running` while it lasts."""
        assert self.engine is not None
        running = Running(self._clock(), tuple(j.number for j in jobs),
                          tuple(round(float(getattr(j.audio, "duration_s", 0.0)), 3) for j in jobs),
                          granularity, str(getattr(self.engine, "device", "?")))
        with self._lock:
            self._running = running
        if self._on_running is not None:
            try:
                self._on_running()
            except Exception:  # a broken observer must not fail the job
                log.exception("running observer failed")
        try:
            results = self.engine.recognize_batch([j.audio for j in jobs], granularity=granularity,
                                                  embedding=embedding)
        finally:
            with self._lock:
                self._running = None
        if len(results) != len(jobs):
            raise RuntimeError(f"recognize_batch returned {len(results)} results for {len(jobs)} clips")
        return list(results)

    def _run_one(self, job: Job, granularity: str, embedding: bool) -> None:
        from e2vd.audio import AudioError   # here, not above: importing the scheduler stays light (no numpy)

        if self._abandon_if_gone(job):
            return
        start = time.monotonic()
        try:
            job.result = self._infer([job], granularity, embedding)[0]
        except AudioError as exc:
            job.error = BadAudio(exc)
        except GpuOutOfMemory as exc:   # transient: other processes hold the GPU's memory
            log.warning("%s", exc)
            job.error = OutOfGpuMemory(str(exc))
        except Exception as exc:
            fault = model_fault(exc)
            if fault:
                log.error("inference failed: %s", exc)
            else:
                log.exception("inference failed")
            job.error = InferenceFailed(exc, fault)
        job.infer_ms = (time.monotonic() - start) * 1000.0
        job.batch_size = 1
        self._finish(job)
