"""The low-confidence fallback: a second model that answers when the main model is unsure.

With `fallback_model` set (e2vd.config), every recognition first runs on the main model (the
primary scheduler, usually on the GPU). When its top score is below `fallback_below`, the same
audio runs on the fallback model and the answer is the fallback's result, the main model's kept
in `primary` and `decided_by: "fallback"`; otherwise the main model's result, `decided_by:
"primary"`. Without a fallback model every answer is the main model's, `decided_by: "primary"`.

How it is built:

* `Deciding` wraps the primary `Scheduler` with the interface the routes use (`submit`, and the
  primary's `state`, `settled`, `engine`, `unavailable()`), so `e2vd.routes.recognize` reads
  straight through. `submit` returns a `Decided`: the primary's job, and after `wait()` the
  fallback's when the primary was unsure. The fallback job is submitted from the thread that
  waits (the request's connection thread), never on the primary's worker: the GPU is not held
  up by CPU work.
* `Fallback` owns the fallback model's own `Scheduler`: one worker thread of its own (funasr's
  model call is not thread-safe), in the same process, a daemon thread that ends with it. It is
  created empty and started on the first request that needs it (`submit`), so a cold start
  loads nothing more than before. Its engine is loaded with `fallback_device` (default "cpu":
  `Engine.load` on the CPU never touches CUDA) in fp32, without quantization.
* A fallback model that cannot be loaded never fails a request and never ends the daemon: the
  load is tried once per daemon process (the next daemon tries again), logged once as the
  journal event `fallback_unavailable`, and every unsure answer then carries the main model's
  result with `decided_by: "primary"` and `fallback_error` saying why. A fallback call that
  fails (full queue, bad audio, an error) is answered the same way. A client that hangs up
  while its fallback call waits is abandoned like any other.

Journal events: `fallback_loaded` (model, device, load_seconds) and `fallback_unavailable`
(model, error); the `request` event gets `decided_by`, `fallback_ms`, `primary_top_label`,
`primary_top_score` and `fallback_error` (e2vd.routes).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from e2vd.log import event
from e2vd.scheduler import Job, ModelUnavailable, Running, Scheduler, SchedulerError
from e2vd.vocabulary import Granularity, State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.audio import Audio
    from e2vd.config import Settings
    from e2vd.engine import Engine
    from e2vd.result import Primary, Recognition

PRIMARY, FALLBACK = "primary", "fallback"   # the values of `decided_by` (e2vd.result.DECIDED_BY)


def load_fallback_engine(settings: "Settings") -> "Engine":
    """The fallback model as the settings ask for it (runs on the fallback's worker thread):
    `fallback_model` on `fallback_device`, fp32, not quantized. On the CPU nothing touches CUDA
    or the GPU lock; on a GPU (fallback_device "cuda" or "cuda:N") the device is checked for the
    main model's min_free_mb, refusing one that is too full, under the machine's GPU lock
    (e2vd.gpu_lock), like the main model."""
    from e2vd.engine import Engine
    from e2vd.gpu_lock import daemon_gpu_lock

    s = settings
    return Engine.load(s.fallback_model, device=s.fallback_device, dtype="fp32", quantize=False,
                       min_free_mb=s.min_free_mb, busy_policy="refuse", cache_dir=s.cache_dir,
                       gpu_lock=daemon_gpu_lock(s, "the fallback"))


class Fallback:
    """The fallback model, loaded on first need on a worker thread of its own.

    `load` runs on that thread and returns the engine. `below`: a main-model top score below it
    asks this model (`wanted`). Nothing is loaded and no thread runs until the first `submit`.
    `clock` is the monotonic clock of `running.started` (the daemon's, whose watchdog watches
    the fallback's model calls too).
    """

    def __init__(self, model: str, below: float, load: Callable[[], "Engine"], *, queue_size: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.below = below
        self._scheduler = Scheduler(load, queue_size=queue_size, max_batch=1, on_state=self._on_state,
                                    clock=clock, name="e2vd-fallback")
        self._lock = threading.Lock()
        self._started = False

    @classmethod
    def from_settings(cls, settings: "Settings", clock: Callable[[], float] = time.monotonic) -> "Fallback | None":
        """The fallback the settings configure (not loaded), or None when `fallback_model` is empty."""
        if not settings.fallback_model:
            return None
        return cls(settings.fallback_model, settings.fallback_below,
                   functools.partial(load_fallback_engine, settings), queue_size=settings.queue_size, clock=clock)

    # --- observers (any thread) ---
    @property
    def started(self) -> bool:
        """Whether the fallback has been needed yet (its load has begun)."""
        with self._lock:
            return self._started

    @property
    def state(self) -> State | None:
        """None until first needed; then the model's state (loading, ready, unavailable)."""
        return self._scheduler.state if self.started else None

    @property
    def engine(self) -> "Engine | None":
        """The loaded fallback engine, or None (not needed yet, loading, or failed)."""
        return self._scheduler.engine

    @property
    def error(self) -> str | None:
        """Why the fallback model could not be loaded (None unless it failed)."""
        return self._scheduler.error

    @property
    def running(self) -> Running | None:
        """The fallback's model call in progress, or None."""
        return self._scheduler.running

    def wanted(self, result: "Recognition") -> bool:
        """Whether `result` (the main model's) is unsure enough to ask the fallback."""
        return result.top.score < self.below

    # --- control ---
    def submit(self, audio: "Audio", granularity: str, embedding: bool,
               client_gone: Callable[[], bool] | None = None) -> Job:
        """Queue `audio` on the fallback model, starting its worker (and the load) on first use.
        Raises QueueFull, or ModelUnavailable once the fallback model failed to load."""
        with self._lock:
            if not self._started:
                self._started = True
                self._scheduler.start()
        return self._scheduler.submit(audio, granularity, embedding, client_gone=client_gone)

    def close(self, timeout: float | None = None) -> None:
        """Stop the fallback's worker after its current call (waits up to `timeout` seconds)."""
        if self.started:
            self._scheduler.stop(timeout)

    # --- the fallback's worker thread ---
    def _on_state(self, state: State) -> None:
        if state == State.READY:
            engine = self._scheduler.engine
            seconds = float(getattr(engine, "load_seconds", 0.0))
            device = str(getattr(engine, "device", "?"))
            event("fallback_loaded", f"Fallback model {self.model} loaded on {device} in {seconds:.1f} s; it "
                  f"answers when the main model's top score is below {self.below:g}.",
                  model=self.model, device=device, load_seconds=round(seconds, 3))
        elif state == State.UNAVAILABLE:
            event("fallback_unavailable", f"Fallback model {self.model} could not be loaded: "
                  f"{self._scheduler.error}. Unsure answers keep the main model's result until the "
                  "daemon exits (the next one tries again); fix or empty fallback_model "
                  "(e2vd check-config).", logging.WARNING, model=self.model, error=self._scheduler.error)


class Decided:
    """One recognition through `Deciding`: the primary's job, and the fallback's when the
    primary was unsure. Read like a scheduler `Job` (`wait`, `result`, `error`, `abandoned`,
    `queue_ms`, `infer_ms`, `batch_size`: the primary's timings), plus which model decided.

    `wait()` runs the decision on the calling thread: it waits for the primary, submits to the
    fallback when `Fallback.wanted`, and waits for that too.
    """

    def __init__(self, job: Job, primary: Scheduler, fallback: Fallback | None,
                 client_gone: Callable[[], bool] | None) -> None:
        self.job = job
        self._primary = primary
        self._fallback = fallback
        self._client_gone = client_gone
        self._lock = threading.Lock()
        self._asked = False
        self._fallback_job: Job | None = None
        self._fallback_error: str | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the answer is decided (the fallback asked and answered, when needed);
        False on timeout (`timeout` in seconds bounds the whole wait; wait again to go on)."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self.job.wait(timeout):
            return False
        fallback_job = self._ask_fallback()
        if fallback_job is None:
            return True
        return fallback_job.wait(None if end is None else max(0.0, end - time.monotonic()))

    def _ask_fallback(self) -> Job | None:
        """The fallback's job once the primary answered unsure (submitted on the first call)."""
        with self._lock:
            if not self._asked:
                self._asked = True
                result = self.job.result
                if self._fallback is not None and result is not None and self._fallback.wanted(result):
                    job = self.job
                    try:
                        self._fallback_job = self._fallback.submit(job.audio, job.granularity, job.embedding,
                                                                   client_gone=self._client_gone)
                    except SchedulerError as err:
                        self._fallback_error = _fallback_message(err)
            return self._fallback_job

    # --- the decision (after wait) ---
    @property
    def has_fallback(self) -> bool:
        """Whether a fallback model is configured (whether or not this request needed it)."""
        return self._fallback is not None

    @property
    def primary_model(self) -> str:
        """The id of the main model (the primary scheduler's engine)."""
        return str(getattr(self._primary.engine, "model_id", ""))

    @property
    def decided_by(self) -> str:
        """"fallback" when the fallback's result is the answer, else "primary"."""
        fb = self._fallback_job
        return FALLBACK if fb is not None and fb.done.is_set() and fb.result is not None else PRIMARY

    @property
    def result(self) -> "Recognition | None":
        """The answer: the fallback's result when it decided, else the primary's."""
        return self._fallback_job.result if self.decided_by == FALLBACK else self.job.result  # type: ignore[union-attr]

    @property
    def model(self) -> str:
        """The id of the model whose result is the answer."""
        if self.decided_by == FALLBACK:
            return str(getattr(self._fallback.engine if self._fallback else None, "model_id", "")
                       or getattr(self._fallback, "model", ""))
        return self.primary_model

    @property
    def primary(self) -> "Primary | None":
        """The main model's answer when the fallback decided (None otherwise)."""
        from e2vd.result import Primary   # here: importing the routes stays light (no numpy)

        result = self.job.result
        if self.decided_by != FALLBACK or result is None:
            return None
        return Primary(list(result.labels), [float(s) for s in result.scores], self.primary_model)

    @property
    def error(self) -> SchedulerError | None:
        """The primary's error: a fallback that fails never fails the request."""
        return self.job.error

    @property
    def abandoned(self) -> bool:
        """Whether the client hung up before its primary or fallback call ran."""
        return self.job.abandoned or (self._fallback_job is not None and self._fallback_job.abandoned)

    @property
    def fallback_error(self) -> str | None:
        """Why the fallback was asked but could not answer (None when it answered or was not asked)."""
        if self._fallback_error is not None:
            return self._fallback_error
        fb = self._fallback_job
        if fb is not None and fb.done.is_set() and fb.error is not None:
            return _fallback_message(fb.error)
        return None

    @property
    def fallback_ms(self) -> float | None:
        """Milliseconds from submitting to the fallback to its answer (its load included the
        first time); None when it was not asked or could not be."""
        fb = self._fallback_job
        if fb is None or not fb.done.is_set() or fb.abandoned:
            return None
        return fb.queue_ms + fb.infer_ms

    queue_ms = property(lambda self: self.job.queue_ms, doc="The primary's wait for its worker, ms.")
    infer_ms = property(lambda self: self.job.infer_ms, doc="The primary's forward pass, ms.")
    batch_size = property(lambda self: self.job.batch_size, doc="Clips in the primary's forward pass.")


def _fallback_message(err: SchedulerError) -> str:
    if isinstance(err, ModelUnavailable):
        return f"the fallback model could not be loaded: {err.reason}"
    return f"the fallback model could not answer: {err.message}"


class Deciding:
    """The primary `Scheduler` with the fallback behind it: what the routes submit to.

    `state`, `settled`, `engine` and `unavailable()` are the primary's (health and warmup are
    about the main model; the fallback never delays or fails them). `fallback` is None when
    none is configured: then every answer is the primary's.
    """

    def __init__(self, primary: Scheduler, fallback: Fallback | None = None) -> None:
        self.primary = primary
        self.fallback = fallback

    @classmethod
    def around(cls, scheduler: "Scheduler | Deciding") -> "Deciding":
        """`scheduler` itself when it is a Deciding, else a Deciding without a fallback around it."""
        return scheduler if isinstance(scheduler, Deciding) else cls(scheduler)

    @property
    def state(self) -> State:
        return self.primary.state

    @property
    def settled(self) -> threading.Event:
        return self.primary.settled

    @property
    def engine(self) -> "Engine | None":
        return self.primary.engine

    def unavailable(self) -> ModelUnavailable:
        return self.primary.unavailable()

    @property
    def running(self) -> Running | None:
        """The older of the model calls in progress, the primary's or the fallback's (None when
        neither runs one): what the daemon's watchdog watches, so that a stuck fallback call
        ends the process like a stuck primary call (it would otherwise hold its request, and so
        the daemon and its GPU, for ever)."""
        calls = [c for c in (self.primary.running, self.fallback.running if self.fallback else None) if c]
        return min(calls, key=lambda c: c.started) if calls else None

    def submit(self, audio: "Audio", granularity: str = Granularity.UTTERANCE.value, embedding: bool = False,
               client_gone: Callable[[], bool] | None = None) -> Decided:
        """Queue `audio` on the primary (raises what `Scheduler.submit` raises); `wait()` on the
        returned `Decided` asks the fallback when the primary is unsure."""
        job = self.primary.submit(audio, granularity, embedding, client_gone=client_gone)
        return Decided(job, self.primary, self.fallback, client_gone)

    def close(self, timeout: float | None = None) -> None:
        """Stop the fallback's worker, if it ever started (the primary is the daemon's to stop)."""
        if self.fallback is not None:
            self.fallback.close(timeout)
