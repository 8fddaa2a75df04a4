"""Fuzzing: no input makes the server answer 500.

* schemathesis generates requests for every operation of the OpenAPI schema the server publishes;
* the Wiro endpoints read raw bodies (the schema cannot describe them), so a hand-written hypothesis
  strategy posts random JSON and multipart field values to ``/v1/Run`` and ``/v1/Task/*``;
* the classes of input that once were 500s get their own strategies: non-ASCII digits and integers of 2^63 or
  more in every id and number field, lone surrogates in every text field (after which the project's Task/List and
  Task/Detail must still answer), and JSON nested up to 50,000 deep;
* hypothesis checks the size parser and the signature check on their own.

The schema-driven run and the raw-header one go through a real server (uvicorn as ``serve`` configures it, on a
thread of this process, SQLite: h11 and uvicorn parse what they send); the hand-written bodies go through the
in-process app (the same routes, SQLite and error handling, no socket). Neither runs a model worker, so generated
tasks stay queued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamserve.errors import InvalidRequest
from dreamserve.signing import sign, verify
from dreamserve.sizes import MAX_ASPECT, MAX_PIXELS, MIN_PIXELS, parse_size
from tests.conftest import MODEL, App, LiveServer, open_app, png_bytes, start_live

FUZZ = settings(
    max_examples=int(os.environ.get("DREAMSERVE_FUZZ_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The OpenAI-style calls wait for their task; with no worker, not for long.
    options: dict[str, Any] = {"model": {"workers": 0}, "min_pixels": 64 * 64, "sync_wait_seconds": 0.5}
    server = start_live(tmp_path_factory, tmp_path_factory.mktemp("fuzz"), allow_private=False, **options)
    yield server
    server.stop()
    log = server.log()
    assert "unhandled error" not in log, log[-4000:]
    assert 500 not in server.statuses, "an answer was 500 Internal Server Error"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """``fuzz_server``'s settings in this process."""
    app = open_app(tmp_path_factory.mktemp("fuzz-app"), model={"workers": 0}, min_pixels=64 * 64, sync_wait_seconds=0.5)
    yield app
    log = app.log()
    app.close()
    assert "unhandled error" not in log, log[-4000:]


def test_openapi_operations_never_fail_with_500(fuzz_server: LiveServer) -> None:
    """Every operation in /openapi.json, with schemathesis' generated paths, queries and bodies."""
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    assert creds_of(fuzz_server)
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            headers = {**fuzz_server.headers(), "authorization": f"Bearer {creds_of(fuzz_server)}"}
            response = case.call(headers={**(case.headers or {}), **headers}, timeout=30)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])

        check()


def creds_of(server: LiveServer | App) -> str:
    assert server.creds is not None
    return server.creds.api_key


# -- hand-written: the raw-body Wiro endpoints -----------------------------------------------------------------

FIELDS = [
    "prompt",
    "size",
    "maxImages",
    "watermark",
    "seed",
    "priority",
    "callbackUrl",
    "callbackEvents",
    "inputImage",
    "inputImageUrl",
    "taskid",
    "tasktoken",
    "socketaccesstoken",
    "start",
    "limit",
]
SIZES = ["64x64", "1K", "2K", "4K", "0x0", "99999x1", "1e3x1e3", "auto", "", "64×64", "2048x2048"]
NUMBERS = ["1", "0", "-1", "15", "16", "1.5", "nan", "inf", "-inf", "1e999", "9" * 40, "0x10", "١", "²", " 2 "]
URLS = ["http://127.0.0.1:1/x.png", "https://[::1]/a", "file:///etc/passwd", "http://", "ftp://x", "http://a,http://b"]

scalars = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SIZES + NUMBERS + URLS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))
json_bodies = st.dictionaries(names, values, max_size=8)
form_values = st.one_of(st.text(max_size=30), st.sampled_from(SIZES + NUMBERS + URLS))
files = st.one_of(st.binary(max_size=300), st.just(png_bytes(32, 32)), st.just(png_bytes(64, 64)[:50]))
multipart = st.tuples(
    st.lists(st.tuples(names, form_values), max_size=8),
    st.lists(st.tuples(st.sampled_from(["inputImage", "file", "image"]), st.text(max_size=12), files), max_size=3),
)
endpoints = st.sampled_from(
    [f"/v1/Run/{MODEL}", "/v1/Task/Detail", "/v1/Task/Cancel", "/v1/Task/Kill", "/v1/Task/List", "/v1/Task/Webhooks"]
)


def _envelope(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.text[:500])
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("result"), bool), body


@FUZZ
@given(endpoint=endpoints, body=json_bodies)
def test_wiro_endpoints_with_random_json(fuzz_app: App, endpoint: str, body: dict[str, Any]) -> None:
    content = json.dumps(body, allow_nan=True)
    headers = {**fuzz_app.headers(), "content-type": "application/json"}
    _envelope(fuzz_app.http.post(endpoint, headers=headers, content=content))


@FUZZ
@given(endpoint=endpoints, form=multipart)
def test_wiro_endpoints_with_random_multipart(fuzz_app: App, endpoint: str, form: Any) -> None:
    fields, uploads = form
    data: dict[str, list[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    sent = [(name, (filename, content, "image/png")) for name, filename, content in uploads]
    headers = fuzz_app.headers()
    if sent:
        response = fuzz_app.http.post(endpoint, headers=headers, data=data, files=sent)
    else:
        response = fuzz_app.http.post(endpoint, headers=headers, data=data)
    _envelope(response)


@FUZZ
@given(
    body=st.binary(max_size=200),
    content_type=st.sampled_from(
        [
            "application/json",
            "multipart/form-data",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ]
    ),
)
def test_wiro_endpoints_with_random_bytes(fuzz_app: App, body: bytes, content_type: str) -> None:
    headers = {**fuzz_app.headers(), "content-type": content_type}
    _envelope(fuzz_app.http.post(f"/v1/Run/{MODEL}", headers=headers, content=body))


@FUZZ
@given(nonce=st.text(max_size=70), signature=st.text(max_size=70), key=st.text(max_size=40))
def test_random_credentials_are_refused_cleanly(fuzz_server: LiveServer, nonce: str, signature: str, key: str) -> None:
    headers = {
        "x-api-key": key.encode("utf-8", "replace"),
        "x-nonce": nonce.encode("utf-8", "replace"),
        "x-signature": signature.encode("utf-8", "replace"),
    }
    try:
        request = httpx.Request("POST", f"{fuzz_server.url}/v1/Task/List", headers=headers, json={})
    except (ValueError, httpx.HTTPError):
        return  # not sendable as HTTP headers at all
    with httpx.Client(timeout=30) as client:
        try:
            response = client.send(request)
        except httpx.LocalProtocolError:
            return  # h11 refuses to send such a header (newlines, ...)
    assert response.status_code in (200, 400, 401), response.text[:300]  # 400: h11 refused the header


# -- the classes that were 500s (issue 14) ----------------------------------------------------------------------

#: Digits that str.isdigit() and float() accept and int() or SQLite do not: "²", "١٢", "߅" ...
unicode_digits = st.text(
    alphabet=st.characters(categories=["Nd", "No"], exclude_characters="0123456789"), min_size=1, max_size=6
)
#: At or past SQLite's and PostgreSQL's 64-bit integers, as JSON numbers and as strings.
huge_integers = st.integers(min_value=2**63 - 1, max_value=2**200)
huge = st.one_of(huge_integers, huge_integers.map(str), huge_integers.map(lambda n: str(-n)))
#: Lone surrogates: valid JSON escapes (\ud800), not valid Unicode text.
surrogates = st.builds(
    lambda lone, before, after: before + lone + after,
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.text(max_size=5),
    st.text(max_size=5),
)
HOSTILE_FIELDS = [
    "taskid",
    "start",
    "limit",
    "maxImages",
    "seed",
    "priority",
    "folderid",
    "parentid",
    "prompt",
    "size",
    "tasktoken",
    "socketaccesstoken",
    "callbackUrl",
    "callbackEvents",
    "inputImage",
    "name",
    "watermark",
]
hostile_endpoints = st.sampled_from(
    [
        f"/v1/Run/{MODEL}",
        "/v1/Task/Detail",
        "/v1/Task/Cancel",
        "/v1/Task/List",
        "/v1/Task/Webhooks",
        "/v1/File/FolderCreate",
        "/v1/images/generations",
    ]
)


def _post_json(server: App, endpoint: str, content: str) -> httpx.Response:
    headers = {**server.headers(), "content-type": "application/json"}
    if endpoint.startswith("/v1/images/"):
        headers["authorization"] = f"Bearer {creds_of(server)}:{server.creds.api_secret if server.creds else ''}"
    return server.http.post(endpoint, headers=headers, content=content)


def _project_still_answers(server: App) -> None:
    """The failure mode of stored surrogates: every later Task/List and Task/Detail of the project was a 500."""
    listing = server.http.post("/v1/Task/List", headers=server.headers(), json={"limit": "5"})
    assert listing.status_code == 200 and listing.json()["result"] is True, listing.text[:300]
    for task in listing.json()["tasklist"][:1]:
        detail = server.http.post("/v1/Task/Detail", headers=server.headers(), json={"taskid": task["id"]})
        assert detail.status_code == 200 and detail.json()["result"] is True, detail.text[:300]


@FUZZ
@given(
    endpoint=hostile_endpoints,
    name=st.sampled_from(HOSTILE_FIELDS),
    value=st.one_of(unicode_digits, huge, surrogates),
    as_list=st.booleans(),
)
def test_hostile_value_classes(fuzz_app: App, endpoint: str, name: str, value: Any, as_list: bool) -> None:
    body = {"prompt": "a fox", "size": "64x64", "name": "f", name: [value] if as_list else value}
    _envelope_or_openai(_post_json(fuzz_app, endpoint, json.dumps(body)))  # ensure_ascii: \udXXX escapes
    _project_still_answers(fuzz_app)


@FUZZ
@given(endpoint=hostile_endpoints, depth=st.integers(1, 50_000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting(fuzz_app: App, endpoint: str, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + ("1" if opener != "[" else "") + closer * depth
    _envelope_or_openai(_post_json(fuzz_app, endpoint, '{"prompt": ' + nested + ', "size": "64x64"}'))


def _envelope_or_openai(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.text[:500])
    body = response.json()
    assert isinstance(body, dict) and (isinstance(body.get("result"), bool) or "error" in body), body


# -- units: the size parser and the signature check ------------------------------------------------------------


@given(st.one_of(st.text(max_size=30), st.from_regex(r"\s*\d{1,6}\s*[xX×*]\s*\d{1,6}\s*", fullmatch=True)))
def test_parse_size_accepts_only_sizes_within_bounds(text: str) -> None:
    try:
        width, height = parse_size(text)
    except InvalidRequest as error:
        assert "size" in error.message
        return
    assert MIN_PIXELS <= width * height <= MAX_PIXELS
    assert max(width / height, height / width) <= MAX_ASPECT


@given(st.integers(1, 20_000), st.integers(1, 20_000), st.sampled_from(["1K", "2K", "4K", "1k"]))
def test_parse_size_tiers_follow_the_reference(width: int, height: int, tier: str) -> None:
    chosen = parse_size(tier, (width, height))
    assert parse_size(f"{chosen[0]}x{chosen[1]}") == chosen


@given(st.integers(64, 5000), st.integers(64, 5000), st.integers(64 * 64, MIN_PIXELS))
def test_parse_size_explicit_round_trip(width: int, height: int, floor: int) -> None:
    ok = floor <= width * height <= MAX_PIXELS and max(width / height, height / width) <= MAX_ASPECT
    try:
        assert parse_size(f"{width}x{height}", None, floor) == (width, height) and ok
    except InvalidRequest:
        assert not ok


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40), st.text(max_size=80))
def test_verify_never_raises_and_accepts_only_the_signature(key: str, secret: str, nonce: str, other: str) -> None:
    signature = sign(key, secret, nonce)
    assert verify(key, secret, nonce, signature)
    assert verify(key, secret, nonce, signature.upper())
    assert verify(key, secret, nonce, other) == (other.strip().lower() == signature)
    assert not verify(key, secret, nonce + "0", signature)
    assert not verify(key + "x", secret, nonce, signature)
