"""e2vd.routes: the route table, each route function on a real Scheduler (with a stand-in engine,
no model), and the one table that answers the scheduler's and the audio decoder's errors."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wav_clip
from forms import form

from e2vd import __version__, protocol
from e2vd.audio import ERROR_CODES as AUDIO_CODES, AudioError
from e2vd.protocol import BUSY_RETRY_AFTER_S, ERRORS, ROUTES, ApiError
from e2vd.result import Recognition
from e2vd.routes import (ERROR_CODES, ROUTE_FUNCTIONS, App, ClientGone, Request, api_error, check_complete,
                         recognize)
from e2vd.scheduler import (BadAudio, InferenceFailed, ModelUnavailable, OutOfGpuMemory, QueueFull, Scheduler,
                            SchedulerError)
from e2vd.vocabulary import LABELS


class FakeEngine:
    """Recognises every clip as `happy` (or with `scores`), or raises `error`."""

    model_id, device, load_seconds = "fake-model", "cpu", 1.5

    def __init__(self, error: Exception | None = None, scores: list[float] | None = None) -> None:
        self.error = error
        self.scores = scores or [1.0 if label == "happy" else 0.0 for label in LABELS]

    def recognize_batch(self, clips, granularity="utterance", embedding=False):
        if self.error is not None:
            raise self.error
        return [Recognition(list(LABELS), list(self.scores), list(LABELS), c.duration_s) for c in clips]


class FakeBody:
    """A body already received whole: `data` with `content_type`, handed on in pieces of 1000 bytes."""

    def __init__(self, data: bytes = b"", content_type: str = "", chunked: bool = False) -> None:
        self.data, self.skipped, self.received = data, 0, 0
        self.content_type, self.chunked = content_type, chunked

    def pieces(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), 1000):
            self.received += len(self.data[i:i + 1000])
            yield self.data[i:i + 1000]

    def read(self) -> bytes:
        return b"".join(self.pieces())

    def skip(self) -> None:
        self.skipped += 1


class FakeControl:
    def __init__(self) -> None:
        self.holds: list[float] = []

    def status(self) -> dict[str, Any]:
        return {"state": "ready", "queue_depth": 0}

    def hold(self, seconds: float) -> tuple[float, float | None]:
        self.holds.append(seconds)
        return min(seconds, 60.0), 1234.5


class Served:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def started(load) -> Scheduler:
    scheduler = Scheduler(load, queue_size=4, max_batch=1)
    scheduler.start()
    return scheduler


@pytest.fixture
def ready():
    scheduler = started(lambda: FakeEngine())
    assert scheduler.settled.wait(10)
    yield scheduler
    scheduler.stop(10)


@pytest.fixture
def unavailable():
    def load():
        raise FileNotFoundError("/srv/models/e2v/model.pt does not exist")

    scheduler = started(load)
    assert scheduler.settled.wait(10)
    yield scheduler
    scheduler.stop(10)


def request(scheduler: Scheduler, route: protocol.Route, query: str = "", body: bytes = b"",
            gone: bool = False, content_type: str = "", chunked: bool = False) -> tuple[Request, FakeControl, Served]:
    control, served = FakeControl(), Served()
    app = App(scheduler, control, max_seconds=5.0, count_served=served)
    req = Request(app, protocol.parse_options(query, route.options), FakeBody(body, content_type, chunked), {},
                  lambda: gone, query)
    return req, control, served



def answer(req: Request, route: protocol.Route):
    return ROUTE_FUNCTIONS[route](req)


# --- the tables -----------------------------------------------------------------------------------

def test_every_route_has_its_function_and_nothing_else():
    assert set(ROUTE_FUNCTIONS) == set(ROUTES)
    check_complete(ROUTE_FUNCTIONS)
    partial = {route: fn for route, fn in ROUTE_FUNCTIONS.items() if route is not protocol.WARMUP}
    with pytest.raises(RuntimeError, match=r"no function for \['POST /v1/warmup'\]"):
        check_complete(partial)
    stray = protocol.Route("GET", "/v1/nothing", "nothing", "")
    with pytest.raises(RuntimeError, match=r"not a route: \['GET /v1/nothing'\]"):
        check_complete({**ROUTE_FUNCTIONS, stray: recognize})


def test_errors_from_below_http_are_answered_by_one_table():
    """QueueFull and a GPU out of memory are busy with Retry-After; audio errors keep their code."""
    assert set(ERROR_CODES) | {BadAudio} == set(SchedulerError.__subclasses__())
    assert set(ERROR_CODES.values()) <= set(ERRORS) and AUDIO_CODES <= set(ERRORS)
    cases = [(QueueFull(64), "busy", "queue_size"), (OutOfGpuMemory("cuda:0 ran out of memory"), "busy", "memory"),
             (ModelUnavailable("no model.pt"), "model_unavailable", "could not be loaded: no model.pt"),
             (InferenceFailed(RuntimeError("boom")), "internal", "RuntimeError: boom"),
             (BadAudio(AudioError("too_long", "31 s > 30 s")), "too_long", "31 s"),
             (AudioError("too_short", "10 ms"), "too_short", "10 ms")]
    for exc, code, needle in cases:
        err = api_error(exc)
        assert err.code == code and err.status == ERRORS[code][0] and needle in err.message, (exc, err)
        assert err.retry_after == (BUSY_RETRY_AFTER_S if code == "busy" else None)
    assert api_error(QueueFull(1)).retry_after >= 1


# --- health, status, openapi, warmup --------------------------------------------------------------

def test_health_while_loading_ready_and_unavailable(ready, unavailable):
    gate = threading.Event()
    loading = started(lambda: gate.wait(10) and FakeEngine())
    try:
        req, _, _ = request(loading, protocol.HEALTH)
        assert answer(req, protocol.HEALTH) == (200, {"status": "loading"}) and req.body.skipped == 1
    finally:
        gate.set()
        loading.stop(10)
    req, _, _ = request(ready, protocol.HEALTH)
    assert answer(req, protocol.HEALTH) == (200, {"status": "ready"}) and req.fields == {}
    req, _, _ = request(unavailable, protocol.HEALTH)
    status, payload = answer(req, protocol.HEALTH)
    assert status == 503 and payload["status"] == "unavailable" and req.fields == {"code": "model_unavailable"}
    assert payload["error"]["code"] == "model_unavailable"
    assert "could not be loaded: /srv/models/e2v/model.pt does not exist" in payload["error"]["message"]


def test_status_and_openapi(ready):
    req, _, _ = request(ready, protocol.STATUS)
    assert answer(req, protocol.STATUS) == (200, {"state": "ready", "queue_depth": 0})
    req, _, _ = request(ready, protocol.OPENAPI)
    assert answer(req, protocol.OPENAPI) == (200, protocol.openapi(__version__))


def test_warmup_holds_then_answers_once_ready(ready):
    req, control, _ = request(ready, protocol.WARMUP, "hold=90")
    status, payload = answer(req, protocol.WARMUP)
    assert status == 200 and control.holds == [90.0] and req.fields == {"hold_seconds": 60.0}
    assert payload == {"status": "ready", "hold_s": 60.0, "keep_warm_deadline": 1234.5, "load_seconds": 1.5}


def test_warmup_of_a_model_that_cannot_load_is_model_unavailable(unavailable):
    req, control, _ = request(unavailable, protocol.WARMUP, "hold=10")
    with pytest.raises(ApiError) as info:
        answer(req, protocol.WARMUP)
    assert info.value.code == "model_unavailable" and "model.pt does not exist" in info.value.message
    assert control.holds == [10.0]


# --- recognize ------------------------------------------------------------------------------------

def test_recognize_answers_the_result_and_fills_the_request_event(ready):
    req, _, served = request(ready, protocol.RECOGNIZE, "embedding=0", wav_clip(0.5))
    status, result = answer(req, protocol.RECOGNIZE)
    assert status == 200 and result["top"] == {"label": "happy", "score": 1.0} and result["model"] == "fake-model"
    assert set(result["timing_ms"]) == {"queue", "infer"} and served.count == 1
    assert set(req.fields) == {"upload", "body_bytes", "read_ms", "audio_seconds", "decode_ms", "wait_ms",
                               "queue_ms", "infer_ms", "batch_size", "top_label", "top_score"}
    assert req.fields["upload"] == "raw" and req.fields["body_bytes"] == len(wav_clip(0.5))
    assert req.fields["audio_seconds"] == 0.5 and req.fields["batch_size"] == 1 and req.fields["top_label"] == "happy"


@pytest.mark.parametrize("body, code", [(b"", "bad_audio"), (b"not audio at all", "bad_audio"),
                                        (wav_clip(6.0), "too_long"), (wav_clip(0.01), "too_short")])
def test_recognize_refuses_bad_audio_before_the_queue(ready, body, code):
    req, _, served = request(ready, protocol.RECOGNIZE, body=body)
    with pytest.raises(ApiError) as info:
        answer(req, protocol.RECOGNIZE)
    assert info.value.code == code and served.count == 0 and ready.served == 0


def test_recognize_of_a_client_that_hung_up_raises_client_gone(ready):
    req, _, served = request(ready, protocol.RECOGNIZE, body=wav_clip(0.5), gone=True)
    with pytest.raises(ClientGone):
        answer(req, protocol.RECOGNIZE)
    assert served.count == 0 and ready.abandoned == 1 and "infer_ms" not in req.fields


@pytest.mark.parametrize("error, code", [(RuntimeError("boom"), "internal"),
                                         (AudioError("too_short", "the model needs more"), "too_short")])
def test_recognize_answers_the_jobs_error_by_the_table(error, code):
    scheduler = started(lambda: FakeEngine(error))
    try:
        req, _, served = request(scheduler, protocol.RECOGNIZE, body=wav_clip(0.5))
        with pytest.raises(ApiError) as info:
            answer(req, protocol.RECOGNIZE)
        assert info.value.code == code and served.count == 0 and "infer_ms" in req.fields
    finally:
        scheduler.stop(10)


def test_recognize_when_the_model_cannot_load_is_model_unavailable(unavailable):
    req, _, _ = request(unavailable, protocol.RECOGNIZE, body=wav_clip(0.5))
    with pytest.raises(ApiError) as info:
        answer(req, protocol.RECOGNIZE)
    assert info.value.code == "model_unavailable" and info.value.status == 503


# --- recognize: uploads (e2vd.upload) -------------------------------------------------------------

class Recorder(FakeEngine):
    """FakeEngine that records the options each batch ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def recognize_batch(self, clips, granularity="utterance", embedding=False):
        self.calls.append((granularity, embedding))
        return super().recognize_batch(clips, granularity, embedding)


@pytest.fixture
def recorder():
    engine = Recorder()
    scheduler = started(lambda: engine)
    assert scheduler.settled.wait(10)
    yield scheduler, engine
    scheduler.stop(10)


def test_a_multipart_form_gives_its_file_part_and_option_fields(recorder):
    scheduler, engine = recorder
    body, content_type = form(("granularity", b"frame", None), ("audio", wav_clip(0.5), "a.wav"),
                              ("embedding", b"yes", None))
    req, _, served = request(scheduler, protocol.RECOGNIZE, body=body, content_type=content_type, chunked=True)
    status, result = answer(req, protocol.RECOGNIZE)
    assert status == 200 and result["top"]["label"] == "happy" and served.count == 1
    assert engine.calls == [("frame", True)]
    assert req.fields["upload"] == "multipart" and req.fields["chunked"] is True
    assert req.fields["body_bytes"] == len(body) and req.fields["audio_seconds"] == 0.5


def test_options_from_the_query_and_the_form_are_merged_but_never_both_for_one(recorder):
    scheduler, engine = recorder
    body, content_type = form(("file", wav_clip(0.5), "a.wav"), ("embedding", b"1", None))
    req, _, _ = request(scheduler, protocol.RECOGNIZE, "granularity=frame", body, content_type=content_type)
    assert answer(req, protocol.RECOGNIZE)[0] == 200 and engine.calls == [("frame", True)]
    body, content_type = form(("file", wav_clip(0.5), "a.wav"), ("granularity", b"frame", None))
    for query in ("granularity=frame", "granularity=utterance"):         # equal or not: refused
        req, _, served = request(scheduler, protocol.RECOGNIZE, query, body, content_type=content_type)
        with pytest.raises(ApiError) as info:
            answer(req, protocol.RECOGNIZE)
        assert info.value.code == "bad_option" and served.count == 0
        assert "'granularity' is given both in the query and as a form field" in info.value.message


@pytest.mark.parametrize("parts, code, needle", [
    ((("file", b"", "a.wav"),), "bad_audio", "the form's file part 'file' is empty"),
    ((("file", b"not audio", "a.wav"),), "bad_audio", ""),
    ((("granularity", b"word", None), ("file", wav_clip(0.5), "a.wav")), "bad_option", "granularity='word'"),
    ((("embedding", b"perhaps", None), ("file", wav_clip(0.5), "a.wav")), "bad_option", "embedding='perhaps'"),
    ((("granularity", b"frame", None),), "bad_form", "no file part (only granularity)"),
])
def test_bad_forms_are_refused_before_the_queue(ready, parts, code, needle):
    body, content_type = form(*parts)
    req, _, served = request(ready, protocol.RECOGNIZE, body=body, content_type=content_type)
    with pytest.raises(ApiError) as info:
        answer(req, protocol.RECOGNIZE)
    assert info.value.code == code and needle in info.value.message and served.count == 0 and ready.served == 0
    assert req.fields["upload"] == "multipart"
