"""e2vd.protocol: option parsing, routing and the OpenAPI document (pure functions, no I/O)."""
from __future__ import annotations

import json

import pytest

from e2vd import protocol
from e2vd.protocol import ERRORS, HTTP_ERRORS, ROUTES, ApiError, find_route, openapi, parse_options

RECOGNIZE = find_route("POST", "/v1/recognize").options
WARMUP = find_route("POST", "/v1/warmup").options


def test_design_error_codes_and_statuses():
    expected = {"bad_audio": 400, "bad_option": 400, "too_large": 413, "too_long": 422, "too_short": 422,
                "busy": 503, "model_unavailable": 503, "internal": 500}
    for code, status in expected.items():
        assert ERRORS[code][0] == status


def test_http_limits_and_expectations_have_their_own_codes_and_statuses():
    """RFC 9110: 414 for a request line too long, 417 for an unmet Expect, 431 for the header section;
    413 is the body's alone."""
    assert {code: ERRORS[code][0] for code in ("uri_too_long", "expectation_failed", "header_too_large")} == {
        "uri_too_long": 414, "expectation_failed": 417, "header_too_large": 431}
    assert {"uri_too_long", "expectation_failed", "header_too_large"} <= set(HTTP_ERRORS)
    assert "header" not in ERRORS["too_large"][1] and "request line" not in ERRORS["too_large"][1]
    for path in openapi()["paths"].values():
        for op in path.values():
            assert {"414", "417", "431"} <= set(op["responses"])
            assert "uri_too_long:" in op["responses"]["414"]["description"]


def test_recognize_defaults():
    assert parse_options("", RECOGNIZE) == {"granularity": "utterance", "embedding": False}


@pytest.mark.parametrize("query, expected", [
    ("granularity=frame", {"granularity": "frame", "embedding": False}),
    ("embedding=1", {"granularity": "utterance", "embedding": True}),
    ("embedding=true&granularity=utterance", {"granularity": "utterance", "embedding": True}),
    ("embedding=0", {"granularity": "utterance", "embedding": False}),
    ("embedding=on", {"granularity": "utterance", "embedding": True}),
    ("embedding=%20OFF%20", {"granularity": "utterance", "embedding": False}),
])
def test_recognize_options(query, expected):
    assert parse_options(query, RECOGNIZE) == expected


@pytest.mark.parametrize("query, needle", [
    ("granularity=word", "utterance, frame"),
    ("embedding=maybe", "embedding=1"),
    ("granularty=frame", "unknown option 'granularty'"),
    ("embedding=1&embedding=0", "given twice"),
    ("granularity", "malformed"),
    ("granularity=", "utterance, frame"),
    ("&&=", "malformed"),
])
def test_bad_recognize_options_name_the_fix(query, needle):
    with pytest.raises(ApiError) as info:
        parse_options(query, RECOGNIZE)
    assert info.value.code == "bad_option" and info.value.status == 400
    assert needle in info.value.message


@pytest.mark.parametrize("raw, value", [("0", 0.0), ("32400", 32400.0), ("1.5", 1.5), ("1e+06", 1e6), ("1e 06", 1e6), ("+5", 5.0), (" 10", 10.0)])
def test_hold_seconds(raw, value):
    assert parse_options(f"hold={raw}", WARMUP)["hold"] == value


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "9h", "", "1_0", "\u0661\u0660", "infinity", "0x10", "++5", "-0"])
def test_bad_hold(raw):
    with pytest.raises(ApiError) as info:
        parse_options(f"hold={raw}", WARMUP)
    assert info.value.code == "bad_option" and "seconds" in info.value.message


def test_find_route_errors():
    with pytest.raises(ApiError) as info:
        find_route("GET", "/v2/nothing")
    assert info.value.code == "not_found" and info.value.status == 404 and "/v1/recognize" in info.value.message
    with pytest.raises(ApiError) as info:
        find_route("GET", "/v1/recognize")
    assert info.value.code == "method_not_allowed" and info.value.status == 405
    assert info.value.headers == {"Allow": "POST"}
    with pytest.raises(ApiError) as info:
        find_route("PUT", "/v1/status")
    assert info.value.code == "method_not_allowed" and info.value.headers == {"Allow": "GET, HEAD"}
    assert find_route("HEAD", "/v1/status") is find_route("GET", "/v1/status")
    for method in ("BREW", "get", "Post", "M-SEARCH"):
        with pytest.raises(ApiError) as info:
            find_route(method, "/v1/status")
        assert info.value.code == "not_implemented" and info.value.status == 501, method
    with pytest.raises(ApiError) as info:
        find_route("get", "/v1/nothing")                  # the method is judged before the path
    assert info.value.code == "not_implemented" and "methods are case-sensitive: GET" in info.value.message


def test_bool_options_accept_the_spellings_settings_accept():
    """One vocabulary: what E2VD_QUANTIZE=on means, embedding=on means too."""
    from e2vd.vocabulary import FALSE_WORDS, TRUE_WORDS

    for word in TRUE_WORDS + tuple(w.upper() for w in TRUE_WORDS):
        assert parse_options(f"embedding={word}", RECOGNIZE)["embedding"] is True
    for word in FALSE_WORDS:
        assert parse_options(f"embedding={word}", RECOGNIZE)["embedding"] is False
    with pytest.raises(ApiError) as info:
        parse_options("embedding=2", RECOGNIZE)
    assert "use embedding=1 or embedding=0 (also accepted: true, yes, on / false, no, off)" in info.value.message


def test_document_uses_the_shared_vocabulary():
    from e2vd.vocabulary import LABELS, Granularity, State

    schemas = openapi()["components"]["schemas"]
    assert schemas["Recognition"]["properties"]["labels"]["items"]["enum"] == list(LABELS)
    assert schemas["Health"]["properties"]["status"]["enum"] == [s.value for s in State]
    assert schemas["Status"]["properties"]["state"]["enum"] == [*(s.value for s in State), "stopping"]
    assert find_route("POST", "/v1/recognize").options[0].choices == tuple(g.value for g in Granularity)


def test_api_error_rejects_unknown_codes():
    with pytest.raises(ValueError):
        ApiError("oops", "x")
    err = ApiError("busy", "full", retry_after=1)
    assert err.body() == {"error": {"code": "busy", "message": "full"}} and err.status == 503


def test_openapi_covers_every_route_option_and_error():
    doc = json.loads(json.dumps(openapi("9.9")))  # JSON-serialisable
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == "9.9"
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert [p["name"] for p in op["parameters"]] == [o.name for o in route.options]
        for code in route.errors:
            assert code in op["responses"][str(ERRORS[code][0])]["description"]
    assert doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"] == list(ERRORS)
    frame = doc["paths"]["/v1/recognize"]["post"]["parameters"][0]
    assert frame["schema"]["enum"] == ["utterance", "frame"]
    assert protocol.BUSY_RETRY_AFTER_S >= 1


def test_openapi_gives_every_code_its_status_from_the_table():
    doc = openapi()
    code = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert code["x-status"] == {name: status for name, (status, _) in ERRORS.items()}
    for route in ROUTES:
        responses = doc["paths"][route.path][route.method.lower()]["responses"]
        for name in HTTP_ERRORS:                     # any request can get these
            assert f"{name}: " in responses[str(ERRORS[name][0])]["description"]
        assert list(responses) == sorted(responses)


def test_options_from_a_form_join_the_query_but_never_repeat_it():
    assert parse_options("granularity=frame", RECOGNIZE, form={"embedding": "yes"}) == {
        "granularity": "frame", "embedding": True}
    assert parse_options("", RECOGNIZE, form={"granularity": "frame"})["granularity"] == "frame"
    for query in ("embedding=1", "embedding=0"):                 # the same value or not: refused
        with pytest.raises(ApiError) as info:
            parse_options(query, RECOGNIZE, form={"embedding": "1"})
        assert info.value.code == "bad_option" and "given both in the query and as a form field" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_options("", RECOGNIZE, form={"granularity": "word"})
    assert info.value.code == "bad_option" and "granularity='word'" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_options("", RECOGNIZE, form={"model": "x"})
    assert info.value.code == "bad_option" and "unknown form field 'model'" in info.value.message


def test_openapi_lists_the_request_bodies_recognize_accepts():
    body = openapi()["paths"]["/v1/recognize"]["post"]["requestBody"]
    assert body["required"] and set(body["content"]) == {"application/octet-stream", "audio/*", "multipart/form-data"}
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and set(form["properties"]) == {"file", "granularity", "embedding"}
    assert "chunked" in body["description"] and "refused (bad_option)" in body["description"]
    assert "bad_form" in openapi()["paths"]["/v1/recognize"]["post"]["responses"]["400"]["description"]
