"""e2vd.scheduler with the real engine on the tiny stand-in, in process.

The loader waits on a gate before handing over the (real) engine, so jobs can be queued while
"loading" and the tests decide when the worker starts: no timing assumptions.
"""
from __future__ import annotations

import functools
import socket
import threading

import numpy as np
import pytest
from conftest import speechlike

from e2vd.audio import AudioError, from_samples
from e2vd.scheduler import (GPU_BATCH, BadAudio, InferenceFailed, ModelUnavailable, OutOfGpuMemory, QueueFull,
                            Scheduler, auto_batch)
from e2vd.handler import peer_hung_up
from e2vd.vocabulary import State


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The real tiny engine with padded batching (a GPU's default; the CPU's is equal lengths)."""
    from e2vd.engine import Engine

    return Engine.load(str(tiny_model), device="cpu", batching="padded")


def clip(seconds: float, seed: int = 0):
    return from_samples(speechlike(seconds, seed=seed)[:, 0], 16000)


def gated(engine):
    gate = threading.Event()

    def load():
        gate.wait(60)
        return engine

    return gate, load


def test_jobs_queued_while_loading_are_batched_and_equal_one_by_one(engine):
    gate, load = gated(engine)
    states: list[str] = []
    sch = Scheduler(load, queue_size=8, max_batch=8, on_state=states.append)
    sch.start()
    try:
        clips = [clip(1.0, 0), clip(1.0, 1), clip(1.5, 2), clip(1.0, 3)]
        jobs = [sch.submit(c) for c in clips[:3]] + [sch.submit(clips[3], "utterance", embedding=True)]
        assert sch.state == State.LOADING and sch.pending == 4
        gate.set()
        for job in jobs:
            assert job.wait(60)
        assert states == [State.READY] and sch.pending == 0 and sch.served == 4
        assert [j.batch_size for j in jobs] == [3, 3, 3, 1]    # grouped by options in one take
        for job, c in zip(jobs, clips):
            assert job.error is None and job.queue_ms > 0 and job.infer_ms > 0
            alone = engine.recognize(c, embedding=job.embedding)
            np.testing.assert_allclose(job.result.scores, alone.scores, atol=1e-5)
            assert job.result.duration_s == pytest.approx(c.duration_s)
        assert jobs[3].result.embedding is not None and jobs[0].result.embedding is None
    finally:
        sch.stop(10)


def test_clips_of_different_lengths_share_forward_passes_and_batch_size_counts_the_pass(engine):
    """8 clients sending 8 different lengths at once: the engine's padded passes run them (padding
    under 25 %), each job's batch_size is the number of clips in the forward pass that answered
    it, and every result equals one by one."""
    gate, load = gated(engine)
    sch = Scheduler(load, queue_size=8, max_batch=8)
    sch.start()
    try:
        clips = [clip(s, i) for i, s in enumerate((1.0, 3.6, 1.1, 3.4, 1.2, 3.2, 1.3, 3.0))]
        jobs = [sch.submit(c) for c in clips]
        gate.set()
        assert all(job.wait(60) for job in jobs)
        assert engine.forward_passes(clips) == [[0, 2, 4], [1, 3, 5, 6, 7]]
        assert [j.batch_size for j in jobs] == [3, 5, 3, 5, 3, 5, 5, 5]
        assert len({j.infer_ms for j in jobs if j.batch_size == 5}) == 1    # one pass, one time
        for job, c in zip(jobs, clips):
            assert job.error is None and job.infer_ms > 0
            np.testing.assert_allclose(job.result.scores, engine.recognize(c).scores, atol=1e-5, rtol=0)
    finally:
        sch.stop(10)


def test_full_queue_is_refused_at_once(engine):
    """(The server answers QueueFull 503 busy with Retry-After: tests/test_server.py.)"""
    gate, load = gated(engine)
    sch = Scheduler(load, queue_size=2, max_batch=1)
    sch.start()
    try:
        a, b = sch.submit(clip(0.5)), sch.submit(clip(0.5))
        with pytest.raises(QueueFull) as info:
            sch.submit(clip(0.5))
        assert info.value.queue_size == 2 and "queue_size" in info.value.message
        assert str(info.value) == info.value.message
        assert sch.pending == 2
        gate.set()
        assert a.wait(60) and b.wait(60) and a.result is not None and b.result is not None
        assert a.batch_size == b.batch_size == 1                # max_batch=1
        c = sch.submit(clip(0.5))                               # room again
        assert c.wait(60) and c.result is not None
    finally:
        sch.stop(10)


def test_frame_granularity_jobs_run_apart_from_utterance_jobs(engine):
    gate, load = gated(engine)
    sch = Scheduler(load, queue_size=8, max_batch=8)
    sch.start()
    try:
        u = sch.submit(clip(1.0))
        f = sch.submit(clip(1.0), "frame", embedding=True)
        gate.set()
        assert u.wait(60) and f.wait(60)
        assert u.batch_size == f.batch_size == 1
        assert f.result.embedding.ndim == 2 and u.result.embedding is None
    finally:
        sch.stop(10)


def test_model_that_cannot_load_fails_queued_and_later_jobs(tmp_path):
    from e2vd.engine import Engine

    gate = threading.Event()
    missing = tmp_path / "missing-model"

    def load():
        gate.wait(60)
        return Engine.load(str(missing), device="cpu")

    sch = Scheduler(load, queue_size=4, max_batch=4)
    sch.start()
    try:
        queued = sch.submit(clip(0.5))
        gate.set()
        assert queued.wait(60)
        assert sch.state == State.UNAVAILABLE and sch.settled.is_set()
        assert "missing-model" in sch.error
        assert isinstance(queued.error, ModelUnavailable)
        assert "missing-model" in queued.error.message and queued.error.reason == sch.error
        with pytest.raises(ModelUnavailable) as info:
            sch.submit(clip(0.5))
        assert "missing-model" in info.value.message
        assert sch.pending == 0
    finally:
        sch.stop(10)


def test_a_load_given_up_on_fails_queued_and_later_jobs_and_is_dropped_if_it_returns(engine):
    gate, load = gated(engine)
    states: list[State] = []
    sch = Scheduler(load, queue_size=4, max_batch=4, on_state=states.append)
    sch.start()
    try:
        queued = sch.submit(clip(0.5))
        assert sch.give_up_loading("the model did not finish loading within load_timeout = 5 s")
        assert queued.wait(30) and isinstance(queued.error, ModelUnavailable)
        assert queued.error.reason.startswith("the model did not finish loading within load_timeout = 5 s")
        assert "test_scheduler.py:" in queued.error.reason and "(load)" in queued.error.reason   # where it waits
        assert sch.state == State.UNAVAILABLE and sch.settled.is_set() and states == [State.UNAVAILABLE]
        with pytest.raises(ModelUnavailable):
            sch.submit(clip(0.5))
        assert not sch.give_up_loading("again")                 # once only
        assert sch.worker_alive
        gate.set()                                              # the load returns after all: dropped
        sch._thread.join(30)
        assert not sch.worker_alive and sch.engine is None and states == [State.UNAVAILABLE]
        late = None
        with pytest.raises(ModelUnavailable):
            late = sch.submit(clip(0.5))
        assert late is None and sch.pending == 0
    finally:
        gate.set()
        sch.stop(10)


def test_giving_up_after_the_load_returned_does_nothing(engine):
    sch = Scheduler(lambda: engine, queue_size=4)
    sch.start()
    try:
        assert sch.settled.wait(30) and sch.state == State.READY
        assert not sch.give_up_loading("too late")
        job = sch.submit(clip(0.5))
        assert job.wait(60) and job.result is not None and sch.error is None
    finally:
        sch.stop(10)


def test_a_job_whose_client_hung_up_is_abandoned_without_running(engine):
    """The server's own check on real socket pairs: the client that closed is skipped, the one
    that only shut down its sending side (it still reads the answer) is served."""
    gate, load = gated(engine)
    sch = Scheduler(load, queue_size=8, max_batch=8)
    sch.start()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        jobs = [sch.submit(clip(1.0, i), client_gone=functools.partial(peer_hung_up, ours))
                for i, (ours, _) in enumerate(pairs)]
        pairs[1][1].close()
        pairs[2][1].shutdown(socket.SHUT_WR)
        gate.set()
        assert all(job.wait(60) for job in jobs)
        gone = jobs[1]
        assert gone.abandoned and gone.result is None and gone.error is None and gone.batch_size == 0
        for job in (jobs[0], jobs[2]):
            assert not job.abandoned and job.error is None and job.result is not None
            assert job.batch_size == 2                     # the abandoned clip took no place in the batch
        assert sch.served == 2 and sch.abandoned == 1 and sch.pending == 0
    finally:
        sch.stop(10)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Scheduler(lambda: None, queue_size=0)
    with pytest.raises(ValueError):
        Scheduler(lambda: None, max_batch=-1)


def test_auto_batch_is_off_on_the_cpu_and_on_for_a_gpu(engine):
    assert auto_batch("cpu") == 1 and auto_batch("cuda:0") == GPU_BATCH > 1
    gate, load = gated(engine)
    sch = Scheduler(load, queue_size=8)          # max_batch 0 = auto
    sch.start()
    try:
        jobs = [sch.submit(clip(1.0, i)) for i in range(3)]   # equal lengths: batchable
        gate.set()
        assert all(job.wait(60) for job in jobs)
        assert engine.device == "cpu" and sch.max_batch == 1
        assert [j.batch_size for j in jobs] == [1, 1, 1]
    finally:
        sch.stop(10)


class _GpuWithLittleMemory:
    """The real tiny engine behind a memory budget, as on a GPU that other processes fill:
    runs of more than `fits` seconds of audio raise the GpuOutOfMemory that Engine raises for a
    CUDA out-of-memory (a real one is exercised in tests/test_gpu_device.py)."""

    def __init__(self, engine, fits: float) -> None:
        self.engine, self.fits, self.calls = engine, fits, []

    def recognize_batch(self, clips, **options):
        from e2vd.gpu import GpuOutOfMemory

        self.calls.append(len(clips))
        if sum(c.duration_s for c in clips) > self.fits:
            raise GpuOutOfMemory(f"cuda:0 ran out of memory running {len(clips)} clip(s)")
        return self.engine.recognize_batch(clips, **options)


def test_gpu_out_of_memory_retries_one_by_one_then_answers_busy_and_keeps_serving(engine):
    small = _GpuWithLittleMemory(engine, fits=2.5)
    gate, load = gated(small)
    sch = Scheduler(load, queue_size=8, max_batch=8)
    sch.start()
    try:
        fits = [sch.submit(clip(1.0, i)) for i in range(3)]    # one batch of 3 s: too much together
        gate.set()
        for job in fits:
            assert job.wait(60) and job.error is None and job.batch_size == 1
        assert small.calls == [3, 1, 1, 1]                       # the batch, then one by one
        too_long = sch.submit(clip(3.0))
        assert too_long.wait(60)
        err = too_long.error
        assert isinstance(err, OutOfGpuMemory) and "ran out of memory" in err.message   # 503 busy
        after = sch.submit(clip(1.0))
        assert after.wait(60) and after.result is not None and sch.state == State.READY
    finally:
        sch.stop(10)


class _Failing:
    """An engine whose every call raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def recognize_batch(self, clips, **options):
        raise self.error


@pytest.mark.parametrize("error, kind, code", [
    (AudioError("too_short", "The audio is 10 ms long; send at least 25 ms."), BadAudio, "too_short"),
    (AudioError("bad_audio", "The samples are NaN."), BadAudio, "bad_audio"),
    (RuntimeError("boom"), InferenceFailed, None),
    (ValueError("not about audio"), InferenceFailed, None),    # only an AudioError is bad audio
])
def test_a_failing_job_records_the_schedulers_own_error(error, kind, code):
    sch = Scheduler(lambda: _Failing(error), queue_size=2, max_batch=1)
    sch.start()
    try:
        job = sch.submit(clip(0.5))
        assert job.wait(60) and job.result is None
        assert type(job.error) is kind and str(error) in job.error.message
        if code is not None:
            assert job.error.code == code
        else:
            assert "the journal has the traceback" in job.error.message
        assert sch.state == State.READY and sch.served == 1
    finally:
        sch.stop(10)



class GatedEngine:
    """Wraps the real engine: each model call waits on `gate` after it has begun (`entered`)."""

    def __init__(self, engine) -> None:
        self.engine, self.device = engine, engine.device
        self.gate, self.entered = threading.Event(), threading.Event()

    def recognize_batch(self, audios, **kw):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.engine.recognize_batch(audios, **kw)


def test_running_shows_the_model_call_in_progress_on_the_given_clock(engine):
    """What the daemon's watchdog watches: when the call began (on the scheduler's clock), which
    jobs it runs, on which device; `on_running` is told as it begins, and it is gone once done."""
    now = [500.0]
    wrapped = GatedEngine(engine)
    told: list = []
    sch = Scheduler(lambda: wrapped, queue_size=4, max_batch=1, clock=lambda: now[0],
                    on_running=lambda: told.append(sch.running))
    sch.start()
    try:
        assert sch.running is None
        first, second = sch.submit(clip(1.0, 0)), sch.submit(clip(2.0, 1), "frame")
        assert wrapped.entered.wait(60)
        running = sch.running
        assert told == [running] and running.started == 500.0 and running.jobs == (1,)
        assert running.audio_seconds == (1.0,) and running.device == "cpu" and running.granularity == "utterance"
        assert running.describe() == "job 1 (1.0 s of audio, utterance)"
        now[0] = 620.0
        wrapped.entered.clear()
        wrapped.gate.set()
        assert first.wait(60) and wrapped.entered.wait(60) and second.wait(60)
        assert [r.jobs for r in told] == [(1,), (2,)] and told[1].started == 620.0
        assert (first.number, second.number) == (1, 2) and sch.running is None
    finally:
        wrapped.gate.set()
        sch.stop(timeout=10)


def test_readers_of_state_wait_while_the_observer_hears_of_a_new_one(engine):
    """The daemon's observer sends READY=1 and waits until systemd has read it; meanwhile nobody
    may read "loading" (systemctl start may have returned) nor "ready" (it may not have)."""
    hearing, gate = threading.Event(), threading.Event()

    def observer(state):
        hearing.set()
        assert gate.wait(60), "the test never let the observer finish"

    sch = Scheduler(lambda: engine, on_state=observer)
    assert sch.state == State.LOADING
    sch.start()
    try:
        assert hearing.wait(60)
        seen: list[State] = []
        reader = threading.Thread(target=lambda: seen.append(sch.state))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and seen == [], "a reader saw a state while the observer ran"
        gate.set()
        reader.join(60)
        assert seen == [State.READY]
    finally:
        gate.set()
        sch.stop(timeout=10)


def test_a_model_that_computes_nan_fails_the_request_with_its_reason_and_no_traceback(tiny_model, tmp_path,
                                                                                     caplog):
    """Weights that overflow on real audio (finite in the file, so the load accepts them): the
    job fails with InferenceFailed saying what is wrong with which file (500 internal), and the
    journal gets that one line, not a traceback; the scheduler keeps serving."""
    import torch
    from test_hostile_model import checkpoint_of, with_checkpoint

    from e2vd.engine import Engine

    ckpt = checkpoint_of(tiny_model)
    key = "d2v_model.modality_encoders.AUDIO.project_features.2.weight"
    weight = torch.full_like(ckpt["model"][key], 1e33)
    weight[:, 1::2] = -1e33
    ckpt["model"][key] = weight
    broken = Engine.load(str(with_checkpoint(tiny_model, tmp_path / "m", ckpt)), device="cpu")
    sch = Scheduler(lambda: broken, queue_size=4, max_batch=2)
    sch.start()
    try:
        with caplog.at_level("INFO", logger="e2vd"):
            jobs = [sch.submit(clip(1.0, seed)) for seed in range(3)]
            for job in jobs:
                assert job.wait(60) and isinstance(job.error, InferenceFailed), job.error
                assert job.error.message.startswith("inference failed: the model computed NaN or infinite values")
                assert "model.pt" in job.error.message and "traceback" not in job.error.message
        assert not [r for r in caplog.records if r.exc_info], "a model fault is not a bug: no traceback"
        assert sch.state == State.READY
    finally:
        sch.stop(10)
