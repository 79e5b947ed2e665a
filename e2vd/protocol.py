"""The HTTP API of the daemon: routes, query options, error codes and the OpenAPI document.

This module is the one source for what the daemon speaks (docs/design.md, section 3, the request
path): the handler finds each request's route in `ROUTES` with `find_route` (e2vd.routes maps
each route to its function), parses options with `parse_options` and answers errors with
`ApiError`, and `GET /v1/openapi.json` serves `openapi()`. Labels, granularities, model
states and boolean spellings come from `e2vd.vocabulary`. It imports nothing heavy and has no I/O.

Error responses always have the shape ``{"error": {"code": str, "message": str}}``. The codes of
the first design (bad_audio, too_large, too_long, too_short, bad_option, busy, model_unavailable,
internal) are extended with HTTP-level codes (bad_request, not_found, method_not_allowed,
timeout, length_required, uri_too_long, expectation_failed, header_too_large, not_implemented) and bad_form (a
multipart upload that is malformed or does not hold exactly one file part, see e2vd.upload), each listed in `ERRORS` with its status. `ERRORS` is the only source of
an error's HTTP status: `ApiError.status` reads it, the server answers with it, and the OpenAPI
document lists it (per operation, and for every code in the Error schema's `x-status`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from e2vd.vocabulary import FALSE_WORDS, LABELS, TRUE_WORDS, Granularity, State, parse_bool_word

# seconds as plain ASCII decimal (float() also reads "1_0", "infinity", " 10 " and every script's digits)
_SECONDS = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SHOWN_CHARS = 60   # most characters of a client's text quoted back in an error message


def shown(text: str) -> str:
    """`text` (sent by a client) quoted for an error message, cut to _SHOWN_CHARS characters."""
    return repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + f"... ({len(text)} characters)"

API_VERSION = "1"

# code -> (HTTP status, what it means; shown in the OpenAPI document)
ERRORS: dict[str, tuple[int, str]] = {
    "bad_audio": (400, "The body is not audio libsndfile can read (wav, flac, ogg, mp3), or its samples are unusable."),
    "bad_option": (400, "A query option (or a form field carrying one) is unknown, repeated, given both in the "
                        "query and the form, or has a bad value."),
    "bad_form": (400, "The multipart/form-data body is malformed (boundary, part headers, no closing boundary, "
                      "nested multipart) or does not hold exactly one file part."),
    "bad_request": (400, "The HTTP request itself is malformed (request line, request target with a #fragment or "
                         "not a path, HTTP version other than 1.x, header lines, Host missing (HTTP/1.1), repeated "
                         "or not a host, Content-Length, Transfer-Encoding other than chunked, chunk framing, short body); "
                         "the connection is closed after the answer."),
    "not_found": (404, "No such route; see GET /v1/openapi.json."),
    "method_not_allowed": (405, "The route exists but not for this method; the Allow header lists the methods."),
    "timeout": (408, "The request was not received completely within connection_timeout seconds."),
    "length_required": (411, "The request has no body: send it with Content-Length or Transfer-Encoding: chunked."),
    "too_large": (413, "The body is larger than the daemon accepts (max_body_bytes; a chunked body is refused the "
                       "moment it would cross it), or its Content-Length has more than 18 digits, or a chunked "
                       "body has more than 100 trailer lines."),
    "uri_too_long": (414, "The request line (its path and query) is longer than 64 KiB; the connection is closed "
                          "after the answer."),
    "expectation_failed": (417, "The Expect header asks for something other than 100-continue, the only "
                                "expectation met; the connection is closed after the answer."),
    "header_too_large": (431, "A header line is longer than 64 KiB, the header lines come to more than 64 KiB "
                              "together, or there are more than 100 of them; the connection is closed after the "
                              "answer."),
    "too_long": (422, "The audio is longer than max_seconds."),
    "too_short": (422, "The audio is too short to analyse."),
    "internal": (500, "The daemon failed unexpectedly; the journal has the details."),
    "busy": (503, "The inference queue is full, the daemon has too many connections open, or the GPU ran out "
                  "of memory for this request; retry after Retry-After seconds."),
    "model_unavailable": (503, "The model could not be loaded (the message says why); the daemon exits after a grace period."),
    "not_implemented": (501, "The request method is not one HTTP defines (methods are case-sensitive: GET, HEAD, "
                             "POST, ...), or the body has a transfer coding other than chunked (gzip, ...) before "
                             "its chunked coding; the connection is closed after a transfer coding."),
    "config_invalid": (503, "The daemon's settings cannot be used (the message names the file, the key and the fix); "
                            "it answers every request so until the file is fixed, then a fresh daemon serves."),
}

# Errors any request can get, whatever its route: listed under every operation of the document.
# (not_found, method_not_allowed and not_implemented belong to no operation; the Error schema's
# x-status has them.)
HTTP_ERRORS: tuple[str, ...] = ("bad_request", "timeout", "length_required", "too_large", "uri_too_long",
                                "expectation_failed", "header_too_large", "busy", "internal", "config_invalid")

# Retry-After seconds sent with 503 busy.
BUSY_RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answer: `code` (a key of ERRORS), `message` for the operator, optional Retry-After."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        """The HTTP status of this error."""
        return ERRORS[self.code][0]

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    """The error shape of every error answer: ``{"error": {"code": code, "message": message}}``."""
    return {"error": {"code": code, "message": message}}


# --- query options ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One query option: `kind` is "enum", "bool" or "seconds" (a finite number >= 0)."""

    name: str
    kind: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> Any:
        """Convert the raw query value; raises ApiError("bad_option") naming the accepted values."""
        if self.kind == "enum":
            if raw not in self.choices:
                raise ApiError("bad_option", f"{self.name}={shown(raw)} is not accepted; use one of: "
                               + ", ".join(self.choices))
            return raw
        if self.kind == "bool":
            value = parse_bool_word(raw)
            if value is None:
                raise ApiError("bad_option", f"{self.name}={shown(raw)} is not accepted; use {self.name}=1 or "
                               f"{self.name}=0 (also accepted: {', '.join(TRUE_WORDS[1:])} / "
                               f"{', '.join(FALSE_WORDS[1:])})")
            return value
        if self.kind == "seconds":
            text = raw.replace(" ", "+")  # an unescaped '+' in 1e+06 arrives as a space
            value = float(text) if _SECONDS.fullmatch(text) else math.nan
            if not math.isfinite(value) or value < 0:
                raise ApiError("bad_option", f"{self.name}={shown(raw)} is not accepted; give seconds as a number "
                               f">= 0, e.g. {self.name}=32400 for 9 hours")
            return value
        raise AssertionError(f"unknown option kind {self.kind!r}")


GRANULARITY = Option("granularity", "enum", Granularity.UTTERANCE.value,
                     "utterance: one result for the clip; frame: the embedding per 20 ms frame (50 Hz).",
                     tuple(g.value for g in Granularity))
EMBEDDING = Option("embedding", "bool", False, "1 to include the embedding in the result (D floats, or T x D for frame).")
HOLD = Option("hold", "seconds", 0.0, "Keep the model loaded at least this many seconds from now (capped by max_hold).")


def parse_options(query: str, options: tuple[Option, ...], form: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse a URL query string, and the option fields of a multipart form (raw text by name),
    against `options`; returns every option's value (defaults filled in).

    Unknown, repeated or malformed options raise ApiError("bad_option") with a message naming the
    accepted options, so a typo never silently falls back to a default. An option given both in the
    query and in the form is refused the same way, whatever the two values: neither source wins.
    """
    known = {o.name: o for o in options}
    values: dict[str, Any] = {o.name: o.default for o in options}
    seen: set[str] = set()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=32)
    except ValueError as exc:
        raise ApiError("bad_option", f"the query string {shown(query)} is malformed ({str(exc)[:_SHOWN_CHARS]}); "
                       "use name=value pairs joined by &") from None
    for name, raw in pairs:
        if name not in known:
            accepted = ", ".join(known) if known else "none"
            raise ApiError("bad_option", f"unknown option {shown(name)}; this route accepts: {accepted}")
        if name in seen:
            raise ApiError("bad_option", f"option {name!r} is given twice; give it once")
        seen.add(name)
        values[name] = known[name].parse(raw)
    for name, raw in (form or {}).items():
        if name not in known:
            raise ApiError("bad_option", f"unknown form field {shown(name)}; this route's option fields are: "
                           + (", ".join(known) or "none"))
        if name in seen:
            raise ApiError("bad_option", f"option {name!r} is given both in the query and as a form field; "
                           "give it once, in either")
        seen.add(name)
        values[name] = known[name].parse(raw)
    return values


# --- routes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """One endpoint. `name` is its operationId in the OpenAPI document; the function that
    answers it is `e2vd.routes.ROUTE_FUNCTIONS[route]`."""

    method: str
    path: str
    name: str
    summary: str
    options: tuple[Option, ...] = ()
    body: bool = False
    errors: tuple[str, ...] = field(default=())


RECOGNIZE = Route("POST", "/v1/recognize", "recognize",
                  "Recognise the emotion in the audio file sent as the body (wav, flac, ogg, mp3), raw or as "
                  "the one file part of a multipart/form-data form.",
                  (GRANULARITY, EMBEDDING), body=True,
                  errors=("bad_audio", "bad_option", "bad_form", "bad_request", "timeout", "length_required",
                          "too_large", "too_long", "too_short", "busy", "model_unavailable", "internal"))
HEALTH = Route("GET", "/v1/health", "health",
               "Answers at once, also while the model loads: {\"status\": \"loading\"|\"ready\"}.",
               errors=("model_unavailable",))
STATUS = Route("GET", "/v1/status", "status",
               "State, model, device, dtype, memory, queue depth, requests served, uptime and deadlines.")
WARMUP = Route("POST", "/v1/warmup", "warmup",
               "Keep the model loaded for `hold` seconds (capped by max_hold); returns when it is ready.",
               (HOLD,), errors=("bad_option", "model_unavailable"))
OPENAPI = Route("GET", "/v1/openapi.json", "openapi", "This document.")

ROUTES: tuple[Route, ...] = (RECOGNIZE, HEALTH, STATUS, WARMUP, OPENAPI)


#: The request methods HTTP defines (RFC 9110 §9, PATCH from RFC 5789). Methods are case-sensitive;
#: any other is answered 501 not_implemented (RFC 9110 §15.6.2), one of these that the route does
#: not take 405 method_not_allowed with Allow.
HTTP_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                                          "TRACE", "PATCH"})


def check_method(method: str) -> None:
    """ApiError not_implemented (501) unless `method` is one of HTTP_METHODS."""
    if method not in HTTP_METHODS:
        hint = f" (methods are case-sensitive: {method.upper()})" if method.upper() in HTTP_METHODS else ""
        raise ApiError("not_implemented", f"the method {shown(method)} is not an HTTP method this daemon "
                                          f"implements{hint}; it answers GET, HEAD and POST (see GET /v1/openapi.json)")


def find_route(method: str, path: str) -> Route:
    """The route for `method` and `path` (no query). HEAD is answered as GET without the body
    (RFC 9110 §9.3.2). Raises ApiError not_implemented (a method HTTP does not define),
    not_found, or method_not_allowed (with Allow)."""
    check_method(method)
    candidates = [r for r in ROUTES if r.path == path]
    if not candidates:
        raise ApiError("not_found", f"no route {shown(path)}; the routes are "
                       + ", ".join(f"{r.method} {r.path}" for r in ROUTES))
    for route in candidates:
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route
    allow = ", ".join(m for r in candidates for m in ((r.method, "HEAD") if r.method == "GET" else (r.method,)))
    raise ApiError("method_not_allowed", f"{path} accepts {allow}, not {method}",
                   headers={"Allow": allow})


# --- OpenAPI -----------------------------------------------------------------------------------

_STATES = [s.value for s in State]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": list(ERRORS),
                                    "x-status": {code: status for code, (status, _) in ERRORS.items()},
                                    "description": "x-status gives the HTTP status of each code."},
                           "message": {"type": "string", "description": "What went wrong and what to do."}}}},
    },
    "Recognition": {
        "type": "object",
        "required": ["labels", "scores", "top", "model_labels", "duration_s", "model", "decided_by", "timing_ms"],
        "properties": {
            "labels": {"type": "array", "items": {"type": "string", "enum": list(LABELS)},
                       "minItems": len(LABELS), "maxItems": len(LABELS)},
            "scores": {"type": "array", "items": {"type": "number"}, "minItems": len(LABELS), "maxItems": len(LABELS),
                       "description": "Same order as labels; they sum to 1."},
            "top": {"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "number"}}},
            "model_labels": {"type": "array", "items": {"type": "string"},
                             "description": "The model's own label strings (tokens.txt)."},
            "duration_s": {"type": "number", "description": "Audio duration in seconds."},
            "embedding": {"type": "array", "description": "Only with embedding=1: D floats, or T x D (50 Hz) for frame; "
                                                          "from the model named in `model` (the fallback's when it decided)."},
            "model": {"type": "string", "description": "The model whose result this is."},
            "decided_by": {"type": "string", "enum": ["primary", "fallback"],
                           "description": "\"fallback\" when the main model's top score was below fallback_below and "
                                          "the fallback model answered (the main model's result is in `primary`); "
                                          "else \"primary\"."},
            "primary": {"type": "object", "required": ["labels", "scores", "top", "model"],
                        "description": "Only when decided_by is \"fallback\": the main model's result.",
                        "properties": {
                            "labels": {"type": "array", "items": {"type": "string", "enum": list(LABELS)}},
                            "scores": {"type": "array", "items": {"type": "number"}},
                            "top": {"type": "object", "properties": {"label": {"type": "string"},
                                                                     "score": {"type": "number"}}},
                            "model": {"type": "string"}}},
            "fallback_error": {"type": "string",
                               "description": "Only when the fallback was asked but could not answer (e.g. its model "
                                              "could not be loaded): why; the answer is then the main model's."},
            "timing_ms": {"type": "object", "properties": {
                "queue": {"type": "number", "description": "Milliseconds waiting for the main model's worker (includes model load on a cold start)."},
                "infer": {"type": "number", "description": "Milliseconds of the main model's forward pass for this clip (shared with the other clips in it)."},
                "fallback": {"type": "number", "description": "Only when the fallback answered: milliseconds from asking it to its "
                                                              "answer (its model load included the first time)."}}},
        },
    },
    "Health": {"type": "object",
               "description": "200 while loading or ready; 503 with status \"unavailable\" and an error when the model cannot load.",
               "properties": {"status": {"type": "string", "enum": _STATES}}},
    "Status": {
        "type": "object",
        "description": "Deadlines are Unix times in seconds (null when none); *_in_s are seconds from now.",
        "properties": {
            "state": {"type": "string", "enum": [*_STATES, "stopping"]},
            "model": {"type": "string"}, "device": {"type": ["string", "null"]}, "dtype": {"type": "string"},
            "memory": {"type": "object", "additionalProperties": {"type": "integer"}},
            "queue_depth": {"type": "integer", "description": "Recognitions queued or running."},
            "queue_size": {"type": "integer"}, "connections": {"type": "integer"},
            "requests_served": {"type": "integer", "description": "POST /v1/recognize answered with 200."},
            "uptime_s": {"type": "number"},
            "inference_running_s": {"type": ["number", "null"],
                                    "description": "Age of the model call in progress (null when idle)."},
            "inference_timeout_s": {"type": "number",
                                    "description": "A model call older than this is stuck: the process ends."},
            "socket": {"type": "string"}, "socket_activated": {"type": "boolean"},
            "load_seconds": {"type": ["number", "null"]},
            "idle_timeout_s": {"type": "number"},
            "idle_deadline": {"type": ["number", "null"],
                              "description": "When the daemon exits if nothing else arrives (null while loading)."},
            "idle_exit_in_s": {"type": ["number", "null"]},
            "keep_warm_deadline": {"type": ["number", "null"]},
            "error": {"type": ["string", "null"], "description": "Why the model is unavailable."},
            "fallback": {"type": ["object", "null"],
                         "description": "The low-confidence fallback model; null when fallback_model is not set.",
                         "properties": {"model": {"type": "string"},
                                        "below": {"type": "number", "description": "fallback_below: the main "
                                                  "model's top score under which the fallback is asked."},
                                        "state": {"type": ["string", "null"], "enum": [*_STATES, None],
                                                  "description": "null until a request first needs it (it is "
                                                                 "loaded then, not at start)."},
                                        "error": {"type": ["string", "null"],
                                                  "description": "Why it could not be loaded."}}},
            "pid": {"type": "integer"}, "version": {"type": "string"},
        },
    },
    "Warmup": {
        "type": "object",
        "properties": {"status": {"type": "string", "enum": [State.READY.value]},
                       "hold_s": {"type": "number", "description": "Hold granted (capped by max_hold)."},
                       "keep_warm_deadline": {"type": ["number", "null"]},
                       "load_seconds": {"type": ["number", "null"]}},
    },
}

_OK_SCHEMA = {"recognize": "Recognition", "health": "Health", "status": "Status", "warmup": "Warmup"}


def _option_schema(option: Option) -> dict[str, Any]:
    if option.kind == "enum":
        return {"type": "string", "enum": list(option.choices), "default": option.default}
    if option.kind == "bool":
        return {"type": "integer", "enum": [0, 1], "default": int(option.default)}
    return {"type": "number", "minimum": 0, "default": option.default}


def _request_body(route: Route) -> dict[str, Any]:
    """The requestBody of a route that takes the audio (e2vd.upload): raw, or a multipart form."""
    raw = {"schema": {"type": "string", "format": "binary"}}
    fields = {o.name: {**_option_schema(o), "description": o.description} for o in route.options}
    if "embedding" in fields:
        fields["embedding"] = {"type": "string", "enum": [*TRUE_WORDS, *FALSE_WORDS], "description": EMBEDDING.description}
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "The audio file. Any field name is accepted for the one part "
                                                   "that is not an option field; 'file' is preferred, 'audio' "
                                                   "the other usual name."}, **fields}}
    return {"required": True,
            "description": "The audio file (wav, flac, ogg, mp3), up to max_body_bytes, framed by Content-Length or "
                           "Transfer-Encoding: chunked. Raw: the body is the file's bytes, whatever its Content-Type "
                           "(any type but multipart/*; e2vd's client and CLI send it so: the fastest path). "
                           "multipart/form-data: exactly one file part plus optional option fields; an option "
                           "given both in the query and as a form field is refused (bad_option).",
            "content": {"application/octet-stream": raw, "audio/*": raw,
                        "multipart/form-data": {"schema": form,
                                                "encoding": {"file": {"contentType": "audio/*, application/octet-stream"}}}}}


def openapi(version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route, option and error in this module."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        ok: dict[str, Any] = {"description": "OK"}
        if route.name in _OK_SCHEMA:
            ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{_OK_SCHEMA[route.name]}"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        responses: dict[str, Any] = {"200": ok}
        for code in dict.fromkeys(route.errors + HTTP_ERRORS):
            status = str(ERRORS[code][0])
            entry = responses.setdefault(status, {"description": "", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            entry["description"] = " ".join(filter(None, [entry["description"], f"{code}: {ERRORS[code][1]}"]))
        op: dict[str, Any] = {
            "operationId": route.name, "summary": route.summary, "responses": dict(sorted(responses.items())),
            "parameters": [{"name": o.name, "in": "query", "required": False, "description": o.description,
                            "schema": _option_schema(o)} for o in route.options],
        }
        if route.body:
            op["requestBody"] = _request_body(route)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "e2vd", "version": version,
                 "description": "Emotion2Vec+ speech emotion recognition over HTTP/1.1 on a Unix socket. "
                                "Errors: {\"error\": {\"code\", \"message\"}}; codes: "
                                + ", ".join(f"{c} ({s})" for c, (s, _) in ERRORS.items()) + "."},
        "servers": [{"url": "http://e2vd", "description": "curl --unix-socket /run/e2vd/e2vd.sock http://e2vd/v1/..."}],
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
