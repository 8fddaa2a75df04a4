"""Authentication and isolation: nonce replay and clock skew (seconds and milliseconds), revoked keys,
per-project rate limits (429 + Retry-After), and output URLs that reveal nothing about other projects."""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from dreamserve import cli
from dreamserve.auth import nonce_time
from dreamserve.errors import RateLimited
from dreamserve.projects import create_project
from dreamserve.ratelimit import RateLimiter
from dreamserve.signing import auth_headers, sign
from tests.conftest import LiveServer, new_project, png_bytes

ACCESSKEY_URL = re.compile(r"/v1/File/[0-9a-f]{8}(?:-[0-9a-f]{8}){7}/0\.png$")


# -- units -----------------------------------------------------------------------------------------------------


@given(st.text(max_size=40))
def test_nonce_time_never_raises(nonce: str) -> None:
    value = nonce_time(nonce)
    assert value is None or 10**9 <= value < 10**11


def test_nonce_time_reads_seconds_and_milliseconds() -> None:
    assert nonce_time("1700000000") == 1_700_000_000
    assert nonce_time("1700000000123") == pytest.approx(1_700_000_000.123)
    for other in ("nonce-1", "42", "²³", "١٧٠٠٠٠٠٠٠٠", "17000000001234567"):
        assert nonce_time(other) is None, other


def test_token_bucket() -> None:
    now = [1000.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check(1)
    with pytest.raises(RateLimited) as error:
        limiter.check(1)
    assert error.value.retry_after == 1 and error.value.http_status == 429 and error.value.code == 96
    limiter.check(2)  # another project has its own bucket
    now[0] += 1.0
    limiter.check(1)  # one token a second
    with pytest.raises(RateLimited):
        limiter.check(1)
    now[0] += 3600
    for _ in range(3):  # refilled to the burst, not beyond
        limiter.check(1)
    with pytest.raises(RateLimited):
        limiter.check(1)
    RateLimiter(per_minute=0).check(1)  # 0 = off


@given(st.lists(st.floats(min_value=0, max_value=30), max_size=50), st.integers(1, 600), st.integers(0, 20))
def test_token_bucket_never_exceeds_its_rate(gaps: list[float], per_minute: int, burst: int) -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=per_minute, burst=burst, clock=lambda: now[0])
    allowed = 0
    for gap in gaps:
        now[0] += gap
        if limiter.retry_after(7) == 0:
            allowed += 1
    assert allowed <= (burst or per_minute) + now[0] * per_minute / 60 + 1e-9


# -- through the app (in-process) or a server ---------------------------------------------------------------


def _post(server: Any, headers: dict[str, str], path: str = "/v1/Task/List") -> httpx.Response:
    response: httpx.Response = server.http.post(path, headers=headers, json={})
    return response


def test_random_nonces_are_bounded_per_project_and_a_replay_is_still_refused(make_app: Any) -> None:
    server = make_app(model={"workers": 0}, nonce_max_remembered=20, rate_limit_per_minute=0)
    key, secret = server.creds.api_key, server.creds.api_secret
    other = new_project(server.settings, "the other tenant")
    burst = [f"nonce-{secrets.token_hex(8)}" for _ in range(30)]
    answers = [_post(server, auth_headers(key, secret, nonce)) for nonce in burst]
    assert [answer.status_code for answer in answers] == [200] * 20 + [429] * 10
    refused = answers[-1].json()
    assert refused["result"] is False and refused["errors"][0]["code"] == 96, refused
    assert "20 single-use nonces remembered" in refused["errors"][0]["message"], refused
    assert int(answers[-1].headers["retry-after"]) > 7 * 24 * 3600 - 60
    # Nothing was forgotten to make room: every accepted nonce is still refused, the refused ones were not kept.
    replays = [_post(server, auth_headers(key, secret, nonce)).status_code for nonce in burst[:20]]
    assert replays == [401] * 20
    rows = sqlite3.connect(server.settings.data_dir / "dreamserve.db").execute(
        "select project_id, count(*) from nonces group by project_id"
    )
    assert dict(rows.fetchall()) == {1: 20}
    # Timestamp nonces (Wiro's clients) are not remembered, so they still work; so do another project's nonces.
    assert _post(server, auth_headers(key, secret, str(int(time.time())))).status_code == 200
    assert _post(server, auth_headers(other.api_key, other.api_secret, burst[0])).status_code == 200


def test_nonces_replay_and_clock_skew(make_app: Any) -> None:
    """In-process with the real clock (the window's edges, with an injected clock, are in tests/test_hardening.py)."""
    server = make_app(model={"workers": 0}, unique_nonces=True)
    key, secret = server.creds.api_key, server.creds.api_secret
    now = time.time()

    def call(nonce: str) -> httpx.Response:
        return _post(server, auth_headers(key, secret, nonce))

    seconds, millis = str(int(now)), str(int(now * 1000))
    assert call(seconds).status_code == 200
    assert call(millis).status_code == 200
    for nonce in (seconds, millis):
        replay = call(nonce)
        assert replay.status_code == 401 and "was already used" in replay.json()["errors"][0]["message"]

    for stale, why in (
        (str(int(now) - 1000), "s old (allowed: 900 s)"),
        (str(int(now) + 600), "ahead of the server clock"),
        (str(int(now * 1000) - 1_000_000), "s old"),
    ):
        response = call(stale)
        assert response.status_code == 401, stale
        message = response.json()["errors"][0]["message"]
        assert message.startswith("Project authorization is not valid.") and why in message, message

    # A nonce that is no timestamp ("random integer") is accepted once, and remembered.
    random_nonce = str(secrets.randbelow(10**8))
    assert call(random_nonce).status_code == 200
    assert call(random_nonce).status_code == 401

    # Digits that are not ASCII: a clean 401 or 200, never a server error. The server reads header bytes as
    # Latin-1 (HTTP's rule), so a client that signed those characters is let in.
    wire = "²³".encode()
    odd = wire.decode("latin-1")
    response = server.http.post(
        "/v1/Task/List",
        headers={"x-api-key": key, "x-nonce": wire, "x-signature": sign(key, secret, odd)},
        json={},
    )
    assert response.status_code == 200, response.text

    # A valid signature for another project's key proves nothing.
    other = create_project(server.settings, "other", signature=True)
    forged = {**auth_headers(other.api_key, secret, str(int(time.time()) + 1)), "x-api-key": other.api_key}
    assert _post(server, forged).status_code == 401


def test_revoked_keys_are_refused_at_once(make_app: Any) -> None:
    server = make_app(model={"workers": 0})
    keep = create_project(server.settings, "keep", signature=False)
    by_prefix = create_project(server.settings, "by-prefix", signature=False)
    by_id = create_project(server.settings, "by-id", signature=True)
    for creds in (keep, by_prefix, by_id):
        assert _post(server, auth_headers(creds.api_key, creds.api_secret)).status_code == 200

    def revoke(which: str) -> Result:
        # The CLI command itself, run in this process (a subprocess would cost an interpreter start per call).
        return CliRunner().invoke(cli.main, ["keys", "revoke", which, "--data-dir", str(server.settings.data_dir)])

    done = revoke(by_prefix.api_key[:8])
    assert done.exit_code == 0 and f"Project {by_prefix.project_id} (by-prefix" in done.stdout, done.output
    done = revoke(str(by_id.project_id))
    assert done.exit_code == 0 and "revoked" in done.stdout
    assert revoke("ffff").exit_code == 1 and revoke("99999").exit_code == 1

    for creds in (by_prefix, by_id):
        response = _post(server, auth_headers(creds.api_key, creds.api_secret))
        assert response.status_code == 401
        assert response.json()["errors"][0]["message"] == "Project authorization is not founded."
        # The OpenAI-style routes refuse it too.
        bearer = {"authorization": f"Bearer {creds.api_key}:{creds.api_secret or ''}"}
        openai = server.http.post("/v1/images/generations", headers=bearer, json={"prompt": "x"})
        assert openai.status_code == 401
    assert _post(server, auth_headers(keep.api_key, None)).status_code == 200


def test_rate_limit_per_project(make_app: Any) -> None:
    server = make_app(model={"workers": 0}, rate_limit_per_minute=20, rate_limit_burst=5)
    # One token every 3 s, on a clock of the test's own: time passes only when the test says so.
    now = [time.monotonic()]
    server.client.app.state.rate_limiter = RateLimiter(20, 5, clock=lambda: now[0])
    other = create_project(server.settings, "other", signature=False)
    answers = [_post(server, server.headers()) for _ in range(6)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    limited = answers[5]
    assert limited.status_code == 429 and limited.headers["retry-after"] in ("2", "3")
    body = limited.json()
    assert body["result"] is False and body["errors"][0]["code"] == 96
    assert "20 requests a minute" in body["errors"][0]["message"]
    # Another project is not slowed down; unauthenticated requests are not counted against anyone.
    assert _post(server, auth_headers(other.api_key, None)).status_code == 200
    assert _post(server, {"x-api-key": "wrong"}).status_code == 401
    # The OpenAI-style routes spend the same bucket.
    bearer = {"authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"}
    openai = server.http.post("/v1/images/generations", headers=bearer, json={"prompt": "x"})
    assert openai.status_code == 429 and openai.headers["retry-after"] in ("1", "2", "3"), openai.text
    now[0] += int(limited.headers["retry-after"])
    assert _post(server, server.headers()).status_code == 200


def test_output_urls_reveal_nothing_about_other_projects(tiny_server: LiveServer) -> None:
    server = tiny_server
    other = create_project(server.settings, "other", signature=False)
    theirs = auth_headers(other.api_key, None)

    runs = [server.run({"prompt": f"mine {i}", "size": "1K"}) for i in range(2)]
    tasks = [server.wait(run["taskid"]) for run in runs]
    urls = [task["outputs"][0]["url"] for task in tasks]
    assert all(ACCESSKEY_URL.search(url) for url in urls), urls
    keys = [url.split("/")[-2] for url in urls]
    assert keys[0] != keys[1] and not set(keys[0].split("-")) & set(keys[1].split("-"))
    assert str(server.creds.project_id) not in urls[0].split("/v1/File/")[1].replace("-", " ").split()

    base = f"{server.url}/v1/File/{keys[0]}"
    assert server.http.get(f"{base}/0.png").status_code == 200
    for probe in (
        f"{base}/",
        base,
        f"{base}/1.png",
        f"{base}/0.PNG",
        f"{base}/..%2F..%2Fdreamserve.db",
        f"{server.url}/v1/File/{keys[0][:-1]}{'1' if keys[0].endswith('0') else '0'}/0.png",  # one hex digit off
        f"{server.url}/v1/File/%25/0.png",
        f"{server.url}/v1/File/{keys[1]}/%2E%2E%2F{keys[0]}%2F0.png",
        f"{server.url}/v1/File",
    ):
        response = server.http.get(probe)
        # Unknown files get the envelope with HTTP 404 (405 for a path no route takes), never a file.
        assert response.status_code in (404, 405), probe
        assert response.headers["content-type"] == "application/json", probe
        assert response.json()["result"] is False, probe

    # The other project sees none of these tasks, by id or by token.
    listing = server.http.post(f"{server.url}/v1/Task/List", headers=theirs, json={}).json()
    assert listing["total"] == "0" and listing["tasklist"] == []
    for field, value in (("taskid", runs[0]["taskid"]), ("socketaccesstoken", runs[0]["socketaccesstoken"])):
        body = server.http.post(f"{server.url}/v1/Task/Detail", headers=theirs, json={field: value}).json()
        assert body["result"] is False and body["errors"][0]["code"] == 1
        body = server.http.post(f"{server.url}/v1/Task/Cancel", headers=theirs, json={field: value}).json()
        assert body["result"] is False and body["errors"][0]["code"] == 1

    # Folder ids of another project are refused for uploads and as parents.
    folder = server.post("/v1/File/FolderCreate", json={"name": "mine"}).json()["list"][0]["id"]
    upload = server.http.post(
        f"{server.url}/v1/File/Upload",
        headers=theirs,
        data={"folderid": folder},
        files=[("file", ("x.png", png_bytes(), "image/png"))],
    ).json()
    assert upload["result"] is False and upload["errors"][0]["code"] == 1 and "does not exist" in json.dumps(upload)
    nested = server.http.post(
        f"{server.url}/v1/File/FolderCreate", headers=theirs, json={"name": "sub", "parentid": folder}
    ).json()
    assert nested["result"] is False and nested["errors"][0]["code"] == 1
    # ... and an upload to one's own folder works, with a fresh capability URL.
    own = server.post(
        "/v1/File/Upload", data={"folderid": folder}, files=[("file", ("x.png", png_bytes(), "image/png"))]
    ).json()
    assert own["result"] is True and own["list"][0]["url"].split("/")[-2] not in keys
    assert server.post("/v1/Task/List", json={}).json()["total"] == "2"
