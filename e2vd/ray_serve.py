"""e2vd's HTTP API on Ray Serve: replicas that start on demand, hold a GPU only while used, and
scale back to zero (the optional extra `pip install 'e2vd[ray]'`; nothing else in e2vd imports ray).

    serve run e2vd.ray_serve:app model=/srv/models/emotion2vec_plus_large max_replicas=4

`app(args)` is the application builder `serve run` and `serve deploy` call with the `key=value`
arguments (strings from the command line, YAML values from a config file). Keys are e2vd's
settings (`e2vd.config.Settings`: model, device, dtype, max_seconds, max_body_bytes, ...; applied
over the config file `config=PATH` or $E2VD_CONFIG or /etc/e2vd/e2vd.toml, and E2VD_* in the
builder's environment, exactly as `e2vd serve` reads them) and the replica settings of `Scaling`
(min_replicas 0 by default, max_replicas, downscale_delay = idle_timeout unless given,
gpus_per_replica, ...). Every value is checked when the app is built; a bad one raises
ConfigError naming the key, what was given and what is accepted.

Each replica (`Replica`) is e2vd's own request path without the socket: `e2vd.scheduler.Scheduler`
(one inference thread, the model loaded on it, dynamic batching as in the daemon) fed by the route
functions of `e2vd.routes`, with routes, options, results, error codes and the OpenAPI document
from `e2vd.protocol`. The Starlette request Ray hands over is adapted to `routes.Request`: its
body is read as it streams in through `StreamBody` (a `routes.RequestBody`) on the route's thread.
What differs from the daemon, by nature of the transport: HTTP framing is uvicorn's (Ray's proxy),
so malformed requests are refused by it, not with e2vd's bad_request JSON; `POST /v1/warmup`
starts a replica and answers when it is ready but grants no hold (`hold_s` 0: keep replicas warm
with min_replicas); `GET /v1/status` describes the replica that answered. A model that cannot
load makes its replica answer 503 model_unavailable (never a crash, so Ray does not restart it in
a loop) until the replica scales down. A model call that runs past inference_timeout is stuck:
the replica's health check ends its process at once (exit 5, as the daemon's watchdog; its GPU
memory goes with it) and Ray replaces it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import faulthandler
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response

from e2vd import __version__, config
from e2vd.config import ConfigError, Settings
from e2vd.daemon_report import engine_memory
from e2vd.durations import parse_duration
from e2vd.http_io import SMALL_BODY_BYTES, declared_length
from e2vd.protocol import ApiError, find_route, parse_options
from e2vd.routes import ROUTE_FUNCTIONS, App, ClientGone, Request
from e2vd.scheduler import Scheduler
from e2vd.vocabulary import ExitCode

log = logging.getLogger("e2vd")

DEPLOYMENT_NAME = "e2vd"
ABANDONED = 499          # status logged for a request whose client went away before it ran (never sent)
LOAD_WAIT_S = 1800.0     # longest a replica's constructor waits for its model (it answers 503 after a failure)


# --- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scaling:
    """How many replicas run and what each holds (Ray Serve's autoscaling and actor options).
    Times are seconds; None for downscale_delay means e2vd's idle_timeout, None for
    gpus_per_replica means 0 when device = "cpu" and 1 otherwise."""

    min_replicas: int = 0                   # 0: no replica (and no GPU held) while nobody asks
    max_replicas: int = 1
    downscale_delay: float | None = None    # no traffic this long: one replica fewer (to 0 too)
    upscale_delay: float = 30.0             # load above target this long: one replica more (not from 0)
    gpus_per_replica: float | None = None   # Ray's num_gpus of a replica (a fraction shares a GPU)
    cpus_per_replica: float = 1.0           # Ray's num_cpus (also the replica's torch threads)
    max_ongoing_requests: int = 16          # requests one replica holds at once; more wait in Ray's queue
    target_ongoing_requests: float = 2.0    # the load per replica the autoscaler aims at
    metrics_interval: float = 10.0          # how often load is reported to Ray's autoscaler
    look_back_period: float = 30.0          # the window the autoscaler averages the load over


SCALING_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Scaling)}
_DURATIONS = frozenset({"downscale_delay", "upscale_delay", "metrics_interval", "look_back_period"})


def parse_args(args: Mapping[str, object] | None, env: Mapping[str, str] | None = None) -> tuple[Settings, Scaling]:
    """e2vd's settings and the replica settings from the builder's `args` (values as strings, as
    `serve run` passes them, or YAML/Python values, as `serve deploy` and Python callers do).
    `config` names a config file; e2vd's settings come from defaults < that file < E2VD_* in
    `env` (default os.environ) < args. Raises ConfigError for an unknown key (with a hint), a bad
    value, or a combination that cannot run (e.g. min_replicas above max_replicas)."""
    args = dict(args or {})
    for key in args:
        if not isinstance(key, str):
            raise ConfigError(f"app argument names must be text; got {key!r}")
    config_path = args.pop("config", None)
    if config_path is not None and (not isinstance(config_path, str) or not config_path.strip()):
        raise ConfigError(f"config={config_path!r}: give the path of an e2vd TOML config file")
    scaling_raw = {k: args.pop(k) for k in list(args) if k in SCALING_FIELDS}
    unknown = [k for k in args if k not in config.FIELDS]
    if unknown:
        key = unknown[0]
        known = [*config.FIELDS, *SCALING_FIELDS, "config"]
        close = difflib.get_close_matches(key.replace("-", "_").lower(), known, n=1, cutoff=0.7)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown app argument {key[:60]!r}{hint}; e2vd's settings are {', '.join(config.FIELDS)}; "
                          f"the replica settings are {', '.join(SCALING_FIELDS)}; and config=PATH names a config file")
    try:
        settings = config.load_settings(overrides=args, env=env, config_path=config_path)
    except ConfigError as err:   # config names its overrides as command-line options: name them as app arguments
        message = str(err)
        for key in args:
            message = message.replace(f"command-line option --{key.replace('_', '-')}", f"app argument {key}")
        raise ConfigError(message) from None
    problem = config.model_problem(settings.model)
    if problem and not os.path.isabs(os.path.expanduser(settings.model)):
        raise ConfigError(f"app argument model: {problem}. Give an absolute model directory that exists on every "
                          "node that runs a replica, or a ModelScope id pulled there with `e2vd pull`.")
    if problem:   # the directory may exist on the GPU nodes only: their replicas say so with 503 model_unavailable
        log.warning("model %s: %s on this node; replicas on nodes without it will answer 503 model_unavailable",
                    settings.model, problem)
    values = {key: _scaling_value(key, raw) for key, raw in scaling_raw.items()}
    scaling = Scaling(**values)
    if scaling.downscale_delay is None:
        scaling = dataclasses.replace(scaling, downscale_delay=settings.idle_timeout)
    if scaling.gpus_per_replica is None:
        scaling = dataclasses.replace(scaling, gpus_per_replica=0.0 if settings.device == "cpu" else 1.0)
    _check_scaling(scaling, settings)
    return settings, scaling


def _scaling_value(key: str, raw: object) -> object:
    """One replica setting converted and range-checked; ConfigError naming it otherwise."""
    kind = SCALING_FIELDS[key].type
    whole = kind == "int"
    text = raw.strip() if isinstance(raw, str) else None
    try:
        if isinstance(raw, bool) or raw is None:
            raise ValueError
        if text is not None:
            if not text.isascii():
                raise ValueError
            value = parse_duration(text) if key in _DURATIONS else (int(text) if whole else float(text))
        elif isinstance(raw, (int, float)):
            value = raw
        else:
            raise ValueError
        if whole and value != int(value):
            raise ValueError
        value = int(value) if whole else float(value)
        if not math.isfinite(value):
            raise ValueError
    except (ValueError, OverflowError):
        form = ("a whole number" if whole else
                "seconds as a number or a duration like 90s, 5m" if key in _DURATIONS else "a number")
        raise ConfigError(f"app argument {key}={str(raw)[:60]!r}: expected {form}") from None
    return value


def _check_scaling(s: Scaling, settings: Settings) -> None:
    """Refuse replica settings Ray would refuse later, or that cannot serve."""
    problems = []
    if s.min_replicas < 0:
        problems.append(f"min_replicas must be >= 0, got {s.min_replicas}")
    if s.max_replicas < 1:
        problems.append(f"max_replicas must be >= 1, got {s.max_replicas}")
    if s.min_replicas > s.max_replicas:
        problems.append(f"min_replicas ({s.min_replicas}) is above max_replicas ({s.max_replicas})")
    for key in ("downscale_delay", "upscale_delay"):
        if getattr(s, key) < 0:
            problems.append(f"{key} must be >= 0 seconds, got {getattr(s, key):g}")
    for key in ("metrics_interval", "look_back_period", "target_ongoing_requests"):
        if getattr(s, key) <= 0:
            problems.append(f"{key} must be > 0, got {getattr(s, key):g}")
    if s.look_back_period <= s.metrics_interval:
        problems.append(f"look_back_period ({s.look_back_period:g} s) must be above metrics_interval "
                        f"({s.metrics_interval:g} s)")
    gpus = s.gpus_per_replica or 0.0
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        problems.append(f"gpus_per_replica must be 0, a fraction up to 1, or a whole number; got {gpus:g}")
    if gpus > 0 and settings.device == "cpu":
        problems.append(f"gpus_per_replica={gpus:g} with device=cpu would hold GPUs no replica uses; "
                        "set gpus_per_replica=0 or device=auto")
    if gpus == 0 and settings.device.startswith("cuda"):
        problems.append(f"device={settings.device} with gpus_per_replica=0: Ray gives the replica no GPU; "
                        "set gpus_per_replica=1 (Ray then picks the GPU: use device=cuda or auto)")
    if settings.device.startswith("cuda:") and settings.device != "cuda:0":
        problems.append(f"device={settings.device}: inside a replica Ray makes its own GPUs visible as "
                        "cuda:0, cuda:1, ...; use device=cuda (or auto) and gpus_per_replica")
    if s.cpus_per_replica <= 0:
        problems.append(f"cpus_per_replica must be > 0, got {s.cpus_per_replica:g}")
    if not 1 <= s.max_ongoing_requests <= settings.queue_size:
        problems.append(f"max_ongoing_requests must be from 1 to queue_size ({settings.queue_size}), "
                        f"got {s.max_ongoing_requests}")
    if problems:
        raise ConfigError("bad replica settings: " + "; ".join(problems) + ".")


def deployment_options(settings: Settings, scaling: Scaling) -> dict[str, Any]:
    """The options of the Ray Serve deployment that `scaling` and `settings` ask for."""
    return {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "downscale_delay_s": scaling.downscale_delay,
            "downscale_to_zero_delay_s": scaling.downscale_delay,
            "upscale_delay_s": scaling.upscale_delay,
            "metrics_interval_s": scaling.metrics_interval,
            "look_back_period_s": scaling.look_back_period,
        },
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica, "num_gpus": scaling.gpus_per_replica},
        "graceful_shutdown_timeout_s": settings.drain_timeout,
        # Replica.check_health ends a replica whose model call passed inference_timeout: look often
        # enough to catch it at most 10 s later
        "health_check_period_s": max(1.0, min(10.0, settings.inference_timeout / 2)),
        "health_check_timeout_s": 30.0,
    }


def app(args: Mapping[str, object] | None = None) -> serve.Application:
    """The application `serve run e2vd.ray_serve:app key=value ...` builds (see the module
    docstring); raises ConfigError for bad arguments."""
    settings, scaling = parse_args(args)
    deployment = serve.deployment(Replica).options(**deployment_options(settings, scaling))
    return deployment.bind(settings, scaling)


# --- one request ---------------------------------------------------------------------------------

class StreamBody:
    """A request body streaming in from Ray's proxy, read on the route's thread (a
    `routes.RequestBody`, the counterpart of e2vd.http_io.Body). `next_piece` returns the next
    body bytes, b"" at the end; the whole body must arrive by `deadline` (time.monotonic()).
    uvicorn has checked the framing already; the limits are e2vd's."""

    def __init__(self, headers: Mapping[str, str], next_piece: "PieceSource", max_body_bytes: int,
                 deadline: float, connection_timeout: float) -> None:
        self._headers = headers
        self._next = next_piece
        self.max_body_bytes = max_body_bytes
        self.deadline = deadline
        self.connection_timeout = connection_timeout
        self.received = 0
        self._started = False

    @property
    def content_type(self) -> str:
        """The Content-Type header ("" without one)."""
        return self._headers.get("content-type", "")

    @property
    def chunked(self) -> bool:
        """Whether the body came with Transfer-Encoding: chunked."""
        return "chunked" in self._headers.get("transfer-encoding", "").lower()

    def _length(self) -> int | None:
        raw = self._headers.get("content-length")
        return int(raw) if raw is not None and raw.strip().isdigit() else None

    def _check_length(self, required: bool) -> None:
        """411 for a required body sent without a length; 413 for a declared one over the limit."""
        declared_length(self._length(), self.chunked, required,
                        self.max_body_bytes if required else SMALL_BODY_BYTES, server="service")

    def _frames(self, limit: int) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("a request body can be read once")
        self._started = True
        while True:
            piece = self._next(self.deadline)
            if piece is None:
                raise ApiError("timeout", f"the body did not arrive within {self.connection_timeout:g} s "
                                          f"(got {self.received} bytes); send it at once, or raise connection_timeout")
            if not piece:
                return
            if self.received + len(piece) > limit:
                raise ApiError("too_large", f"the body is over {limit} bytes; this service accepts at most "
                                            f"{limit} (max_body_bytes); send a shorter clip or raise max_body_bytes")
            self.received += len(piece)
            yield piece

    def pieces(self) -> Iterator[bytes]:
        """The body of a route that takes one, as it arrives (at most max_body_bytes)."""
        self._check_length(required=True)
        return self._frames(self.max_body_bytes)

    def read(self) -> bytes:
        """The whole body of a route that takes one."""
        return b"".join(self.pieces())

    def skip(self) -> None:
        """The body of a route that takes none: a small one is read and ignored."""
        self._check_length(required=False)
        for _ in self._frames(SMALL_BODY_BYTES):
            pass


class PieceSource:
    """The body pieces of a Starlette request, fetched from its event loop by another thread.
    Calling it returns the next piece, b"" at the end of the body, or None once `deadline` has
    passed; raises ClientGone when the client went away."""

    def __init__(self, request: StarletteRequest, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = request.stream()
        self._loop = loop
        self._ended = False

    async def _next(self) -> bytes:
        try:
            while True:
                piece = await self._stream.__anext__()
                if piece:
                    return piece
        except StopAsyncIteration:
            return b""

    def __call__(self, deadline: float) -> bytes | None:
        if self._ended:
            return b""
        future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        try:
            piece = future.result(max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None
        except ClientDisconnect:
            raise ClientGone() from None
        if not piece:
            self._ended = True
        return piece


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the replica sends it: status, extra headers, JSON body (None: nothing to send)."""

    status: int
    body: bytes | None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    code: str | None = None


def json_answer(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
    """`payload` as the daemon writes it (compact JSON, no NaN); an unencodable result is 500 internal."""
    try:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        err = ApiError("internal", f"the result is not valid JSON ({exc}); the replica's log has the request")
        return Answer(err.status, json.dumps(err.body()).encode(), code=err.code)
    return Answer(status, body, dict(headers or {}))


def error_answer(err: ApiError) -> Answer:
    """The answer to `err`: its status from protocol.ERRORS, Retry-After and Allow as the daemon sends them."""
    headers = dict(err.headers)
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    answer = json_answer(err.status, err.body(), headers)
    return dataclasses.replace(answer, code=err.code)


def request_path(scope: Mapping[str, Any]) -> str:
    """The path as the client sent it (not percent-decoded, as the daemon reads it), without the
    application's route prefix."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").partition("?")[0] if isinstance(raw, bytes) and raw else scope.get("path", "")
    root = scope.get("root_path", "") or ""
    if root and root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    return path


# --- the replica ---------------------------------------------------------------------------------

class ReplicaControl:
    """`routes.Control` of one replica: its status document; warmup holds are not granted (Ray's
    autoscaler decides when a replica goes; keep replicas warm with min_replicas)."""

    def __init__(self, replica: "Replica") -> None:
        self.replica = replica

    def hold(self, seconds: float) -> tuple[float, float | None]:
        """No hold: (0.0, None)."""
        return 0.0, None

    def status(self) -> dict[str, Any]:
        """GET /v1/status of this replica (the fields of the daemon's that a replica has)."""
        r = self.replica
        sch, s = r.scheduler, r.settings
        engine = sch.engine
        memory = engine_memory(engine, lambda exc: log.warning("engine.memory() failed: %s", exc))
        return {
            "state": sch.state, "model": getattr(engine, "model_id", None) or s.model,
            "device": getattr(engine, "device", None), "dtype": getattr(engine, "dtype", None) or s.dtype,
            "memory": memory, "queue_depth": sch.pending, "queue_size": sch.queue_size,
            "requests_served": r.served, "uptime_s": round(time.monotonic() - r.started, 3),
            "load_seconds": getattr(engine, "load_seconds", None), "error": sch.error,
            "idle_timeout_s": r.scaling.downscale_delay, "keep_warm_deadline": None,
            "pid": os.getpid(), "version": __version__, "replica": r.replica_id,
        }


class Replica:
    """One Ray Serve replica: e2vd's scheduler (one inference thread; the model is loaded before
    the replica takes requests) answering the routes of e2vd.routes. Ray calls `__call__` with
    each HTTP request on the replica's event loop; the route runs on a thread of its own (it
    blocks: body, decode, the scheduler's job), at most max_ongoing_requests at once."""

    def __init__(self, settings: Settings, scaling: Scaling | None = None) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the daemon: before torch loads libgomp
        _log_to_stderr(settings.log_level)
        from e2vd.daemon import load_engine   # the daemon's own loading of the model the settings name

        self.settings = settings
        self.scaling = scaling or Scaling()
        self.started = time.monotonic()
        self.replica_id = _replica_id()
        self._served = 0
        self._lock = threading.Lock()
        self.scheduler = Scheduler(lambda: load_engine(settings), queue_size=settings.queue_size,
                                   max_batch=settings.max_batch)
        self.app = App(self.scheduler, ReplicaControl(self), settings.max_seconds, self._count_served)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.scaling.max_ongoing_requests + 2,
                                                          thread_name_prefix="e2vd-route")
        self.scheduler.start()
        self.scheduler.settled.wait(LOAD_WAIT_S)
        log.info("replica %s: model %s %s (%s)", self.replica_id, settings.model, self.scheduler.state,
                 self.scheduler.error or f"loaded in {getattr(self.scheduler.engine, 'load_seconds', 0.0):.2f} s")

    def check_health(self) -> None:
        """Ray asks every health_check_period_s. A model call running longer than
        inference_timeout is stuck (a wedged GPU, a driver fault), as the daemon's watchdog judges
        it, and ends the process at once, as the daemon does: the threads' stacks to stderr (the
        replica's log), then os._exit(5), which frees the GPU memory; a graceful stop would wait
        graceful_shutdown_timeout_s for the stuck call. Ray then replaces the replica as the
        autoscaler needs; its clients get Ray's 5xx. A model that could not load is healthy (it
        answers 503 model_unavailable: replacing it would load it again and again)."""
        running = self.scheduler.running
        if running is not None and time.monotonic() - running.started > self.settings.inference_timeout:
            log.critical("replica %s: the model call %s has run over inference_timeout (%g s): stuck; ending "
                         "this replica's process (exit 5) so that Ray replaces it", self.replica_id,
                         running.describe(), self.settings.inference_timeout)
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(int(ExitCode.SERVER))

    @property
    def served(self) -> int:
        """POST /v1/recognize answered with 200 by this replica."""
        with self._lock:
            return self._served

    def _count_served(self) -> None:
        with self._lock:
            self._served += 1

    async def __call__(self, request: StarletteRequest) -> Response:
        """Answer one HTTP request (Ray's ingress)."""
        loop = asyncio.get_running_loop()
        gone = threading.Event()
        future = self.pool.submit(self.answer, request, PieceSource(request, loop), gone)
        try:
            answer = await asyncio.wrap_future(future)
        except asyncio.CancelledError:   # Ray cancels the call when the client disconnects
            gone.set()
            raise
        if answer.body is None:
            return Response(status_code=answer.status)
        if request.method == "HEAD":   # GET's status and headers, Content-Length included, no body
            return Response(b"", answer.status, {**answer.headers, "Content-Length": str(len(answer.body))},
                            media_type="application/json")
        return Response(answer.body, answer.status, answer.headers, media_type="application/json")

    def answer(self, request: StarletteRequest, source: PieceSource, gone: threading.Event) -> Answer:
        """The request path of e2vd.handler without the socket: route, options, the route's
        function, the answer; every failure becomes an answer; one `request` event."""
        start = time.monotonic()
        fields: dict[str, Any] = {}
        path = request_path(request.scope)
        try:
            route = find_route(request.method, path)
            query = request.scope.get("query_string", b"").decode("latin-1")
            options = parse_options(query, route.options)
            deadline = start + self.settings.connection_timeout
            body = StreamBody(request.headers, source, self.settings.max_body_bytes, deadline,
                              self.settings.connection_timeout)
            status, payload = ROUTE_FUNCTIONS[route](Request(self.app, options, body, fields, gone.is_set, query))
            answer = json_answer(status, payload)
        except ApiError as err:
            answer = error_answer(err)
        except ClientGone:
            fields["abandoned"] = True
            answer = Answer(ABANDONED, None)
        except Exception as exc:
            log.exception("request failed")
            answer = error_answer(ApiError("internal", f"unexpected {type(exc).__name__}: {exc}; "
                                                       "the replica's log has the traceback"))
        if answer.code:
            fields["code"] = answer.code
        _log_request(request.method, path, answer.status, start, self.replica_id, fields)
        return answer


def _log_request(method: str, path: str, status: int, start: float, replica: str, fields: dict[str, Any]) -> None:
    """The `request` event of one request (the daemon's fields, plus the replica)."""
    from e2vd.handler import request_summary
    from e2vd.log import event

    level, summary = request_summary(method, path[:200], status, fields)   # the cut keeps the level
    event("request", summary, level, method=method, path=path[:200], status=status, replica=replica,
          total_ms=round((time.monotonic() - start) * 1000.0, 2), **fields)


def _replica_id() -> str:
    """Ray's id of this replica, or a random one outside Ray Serve."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a replica (a test building one directly)
        return uuid.uuid4().hex[:8]


def _log_to_stderr(level: str) -> None:
    """e2vd's events to the replica's stderr (Ray keeps it in the worker's log file), as the
    daemon writes them outside journald; Ray's own loggers are left alone."""
    from e2vd.log import StderrFormatter

    logger = logging.getLogger("e2vd")
    if not any(getattr(h, "_e2vd", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
        handler._e2vd = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
