"""What each route of `protocol.ROUTES` does, and how the errors of the layers below HTTP are
answered (docs/design.md, section 3).

`ROUTE_FUNCTIONS` maps each `protocol.Route` to its function, explicitly, and is checked complete
when this module is imported. A route function takes a `Request` (its parsed options, its body,
the fields of its `request` event, and the `App` it serves from) and returns (status, JSON
payload), or raises `ApiError`; `ClientGone` when nobody is left to answer.

`ERROR_CODES` is the one table from the errors of the scheduler (and e2vd.audio) to error codes;
the status of each code is `protocol.ERRORS`'s. The scheduler and the audio decoder know nothing
about HTTP.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Protocol

from e2vd import __version__, protocol
from e2vd.fallback import Deciding
from e2vd.protocol import BUSY_RETRY_AFTER_S, ApiError, Route
from e2vd.upload import receive, upload_kind
from e2vd.scheduler import (BadAudio, InferenceFailed, ModelUnavailable, OutOfGpuMemory, QueueFull, Scheduler,
                            SchedulerError)
from e2vd.vocabulary import State

if TYPE_CHECKING:  # pragma: no cover
    from e2vd.audio import AudioError

Answer = tuple[int, dict[str, Any]]   # (HTTP status, JSON payload)

# The errors of the layers below HTTP and the code each is answered with; the status is
# protocol.ERRORS[code], and every "busy" answer carries Retry-After. Audio errors (the scheduler's
# BadAudio, e2vd.audio.AudioError) keep their own code: e2vd.audio's codes (bad_audio, too_long,
# too_short) are the API's.
ERROR_CODES: dict[type[SchedulerError], str] = {
    QueueFull: "busy",
    OutOfGpuMemory: "busy",
    ModelUnavailable: "model_unavailable",
    InferenceFailed: "internal",
}


def api_error(exc: "SchedulerError | AudioError") -> ApiError:
    """The HTTP error that answers `exc` (see ERROR_CODES), with its message."""
    if isinstance(exc, SchedulerError) and not isinstance(exc, BadAudio):
        code = ERROR_CODES[type(exc)]
    else:
        code = exc.code
    return ApiError(code, exc.message, retry_after=BUSY_RETRY_AFTER_S if code == "busy" else None)


class ClientGone(Exception):
    """The client hung up before its request ran; nobody is left to answer."""


class Control(Protocol):
    """What the HTTP layer needs from the daemon's lifecycle."""

    def status(self) -> dict[str, Any]:
        """The JSON of GET /v1/status."""

    def hold(self, seconds: float) -> tuple[float, float | None]:
        """Keep warm `seconds` from now (capped); returns (granted seconds, deadline as Unix time)."""


@dataclass(frozen=True)
class App:
    """What the routes serve from (one per server)."""

    scheduler: "Scheduler | Deciding"  # the daemon's Deciding (primary + fallback); a bare Scheduler is used as is
    control: Control
    max_seconds: float                 # longest audio accepted
    count_served: Callable[[], None]   # one more POST /v1/recognize answered with 200


class RequestBody(Protocol):
    """A request's body as the routes read it (e2vd.http_io.Body; e2vd.upload reads it for recognize)."""

    @property
    def content_type(self) -> str:
        """The Content-Type header ("" without one)."""

    @property
    def chunked(self) -> bool:
        """Whether the body is sent with Transfer-Encoding: chunked."""

    @property
    def received(self) -> int:
        """Body bytes read so far."""

    def pieces(self) -> Iterator[bytes]:
        """The body's bytes as they arrive (a body required, at most max_body_bytes)."""

    def read(self) -> bytes:
        """The whole body (a body required, at most max_body_bytes)."""

    def skip(self) -> None:
        """Read and ignore a small body (routes that take none)."""


@dataclass
class Request:
    """One request as a route function sees it."""

    app: App
    options: dict[str, Any]            # every option of the route, defaults filled in
    body: RequestBody
    fields: dict[str, Any]             # the request event's fields (README "Journal fields"); add yours
    client_gone: Callable[[], bool]    # whether the client has hung up; quick, never blocks
    query: str = ""                    # the URL's query string, as sent (options may come in a form too)


def health(req: Request) -> Answer:
    """GET /v1/health: the model's state at once; 503 with the error once it could not load."""
    req.body.skip()
    scheduler = req.app.scheduler
    if scheduler.state == State.UNAVAILABLE:
        err = api_error(scheduler.unavailable())
        req.fields["code"] = err.code
        return err.status, {"status": State.UNAVAILABLE.value, **err.body()}
    return 200, {"status": scheduler.state.value}


def status(req: Request) -> Answer:
    """GET /v1/status: the daemon's own account (Control.status)."""
    req.body.skip()
    return 200, req.app.control.status()


def openapi(req: Request) -> Answer:
    """GET /v1/openapi.json: the OpenAPI document of protocol.ROUTES."""
    req.body.skip()
    return 200, protocol.openapi(__version__)


def warmup(req: Request) -> Answer:
    """POST /v1/warmup?hold=SECONDS: keep warm (capped by max_hold), answer once the model is ready."""
    req.body.skip()
    granted, deadline = req.app.control.hold(req.options["hold"])
    req.fields["hold_seconds"] = granted
    scheduler = req.app.scheduler
    scheduler.settled.wait()
    if scheduler.state == State.UNAVAILABLE:
        raise api_error(scheduler.unavailable())
    return 200, {"status": State.READY.value, "hold_s": granted, "keep_warm_deadline": deadline,
                 "load_seconds": getattr(scheduler.engine, "load_seconds", None)}


def recognize(req: Request) -> Answer:
    """POST /v1/recognize: receive the upload (raw or a form, e2vd.upload) and decode the audio
    here (the connection's thread), run it on the scheduler's worker, answer the result. Options
    come from the query or the form's option fields (never both for one option). The request
    event gets each step's time and how the audio came (`upload`, `chunked`). The answer says
    which model decided (`decided_by`; e2vd.fallback): when the main model was unsure and the
    fallback answered, the main model's result is kept in `primary`; when the fallback was
    asked but could not answer, `fallback_error` says why."""
    from e2vd.audio import AudioError, decode   # here: importing the server stays light (no numpy)

    app, fields = req.app, req.fields
    t0 = time.monotonic()
    fields["upload"] = upload_kind(req.body.content_type)
    if req.body.chunked:
        fields["chunked"] = True
    try:
        upload = receive(req.body, [option.name for option in protocol.RECOGNIZE.options])
    finally:
        fields["body_bytes"] = req.body.received
    options = req.options
    if upload.fields:
        options = protocol.parse_options(req.query, protocol.RECOGNIZE.options, form=upload.fields)
    t1 = time.monotonic()
    fields["read_ms"] = round((t1 - t0) * 1000.0, 2)
    if not upload.audio:
        raise ApiError("bad_audio", f"{upload.what} is empty; send the audio file's bytes, "
                                    "e.g. curl --data-binary @clip.wav or curl -F file=@clip.wav")
    try:
        audio = decode(upload.audio, max_seconds=app.max_seconds)
    except AudioError as err:
        raise api_error(err) from None
    t2 = time.monotonic()
    fields.update(audio_seconds=round(audio.duration_s, 3), decode_ms=round((t2 - t1) * 1000.0, 2))
    try:
        job = Deciding.around(app.scheduler).submit(audio, options["granularity"], options["embedding"],
                                                    client_gone=req.client_gone)
    except SchedulerError as err:
        raise api_error(err) from None
    job.wait()
    fields.update(wait_ms=round((time.monotonic() - t2) * 1000.0, 2), queue_ms=round(job.queue_ms, 2))
    if job.abandoned:
        raise ClientGone()
    fields.update(infer_ms=round(job.infer_ms, 2), batch_size=job.batch_size)
    if job.error is not None:
        raise api_error(job.error)
    assert job.result is not None
    result = job.result.to_dict()
    result["model"] = job.model
    result["decided_by"] = job.decided_by
    result["timing_ms"] = {"queue": round(job.queue_ms, 3), "infer": round(job.infer_ms, 3)}
    primary, fallback_ms = job.primary, job.fallback_ms
    if primary is not None:
        result["primary"] = primary.to_dict()
        fields.update(primary_top_label=primary.top.label, primary_top_score=primary.top.score)
    if fallback_ms is not None:
        result["timing_ms"]["fallback"] = round(fallback_ms, 3)
        fields["fallback_ms"] = round(fallback_ms, 2)
    if job.fallback_error is not None:
        result["fallback_error"] = fields["fallback_error"] = job.fallback_error
    top = result.get("top") or {}
    fields.update(top_label=top.get("label"), top_score=top.get("score"))
    if job.has_fallback:
        fields["decided_by"] = job.decided_by
    app.count_served()
    return 200, result


RouteFunction = Callable[[Request], Answer]

ROUTE_FUNCTIONS: dict[Route, RouteFunction] = {
    protocol.RECOGNIZE: recognize,
    protocol.HEALTH: health,
    protocol.STATUS: status,
    protocol.WARMUP: warmup,
    protocol.OPENAPI: openapi,
}


def check_complete(functions: dict[Route, RouteFunction]) -> None:
    """Raise RuntimeError unless `functions` answers exactly the routes of protocol.ROUTES."""
    missing = [f"{r.method} {r.path}" for r in protocol.ROUTES if r not in functions]
    extra = [f"{r.method} {r.path}" for r in functions if r not in protocol.ROUTES]
    if missing or extra:
        raise RuntimeError(f"e2vd.routes.ROUTE_FUNCTIONS does not match protocol.ROUTES: "
                           f"no function for {missing or 'none'}, not a route: {extra or 'none'}")


check_complete(ROUTE_FUNCTIONS)
