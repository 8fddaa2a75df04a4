"""Hardening of secrets, stored data and errors (issue 14) and the nonce window (issue 12, item 8).

Most of it runs in-process (``create_app`` + ``httpx.ASGITransport``, the lifespan entered by hand, SQLite on
disk, no model process); what needs a model process (a model error, output PNGs, a fetch that fails a task)
goes through a scripted app and the session's tiny server at the end.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import select, text

from dreamserve.api.app import create_app
from dreamserve.dialects.wiro.tasks import task_object_of
from dreamserve.errors import InvalidRequest
from dreamserve.fetch import fetch
from dreamserve.projects import Credentials, add_project
from dreamserve.queue.db import Nonce, make_engine
from dreamserve.queue.keyring import ServerKey
from dreamserve.queue.migrate import alembic_config
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.signing import auth_headers, sign_webhook, verify_webhook
from tests.conftest import MODEL, LiveServer, Receiver, png_bytes

T0 = 1_800_000_000.0  # the injected clock's "now"


@dataclass
class App:
    app: FastAPI
    client: httpx.AsyncClient
    services: Services
    creds: Credentials
    settings: Settings
    now: list[float]

    def headers(self, nonce: str | None = None) -> dict[str, str]:
        return auth_headers(self.creds.api_key, self.creds.api_secret, nonce or str(int(self.now[0])))

    async def post(self, path: str, nonce: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(nonce), **kwargs.pop("headers", {})}
        return await self.client.post(path, headers=headers, **kwargs)


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[App]:
    settings = Settings(
        data_dir=tmp_path / "data",
        models={MODEL: ModelSpec(workers=0)},
        min_pixels=64 * 64,
        **overrides,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        now = [T0]
        services.clock = lambda: now[0]
        creds = await add_project(services.sessions, services.keys, "tests", signature=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            yield App(app, client, services, creds, settings, now)


def _error(response: httpx.Response) -> str:
    body = response.json()
    assert body["result"] is False, body
    message: str = body["errors"][0]["message"]
    return message


# -- 1 + issue 12.8: nonces ------------------------------------------------------------------------------------


async def test_timestamp_nonce_window_and_single_use_random_nonces(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        seconds, millis = str(int(T0)), str(int(T0 * 1000))

        async def status(nonce: str) -> int:
            return (await app.post("/v1/Task/List", nonce, json={})).status_code

        # The n8n node signs once and polls with the same nonce for up to 600 s: accepted all that time and more.
        for elapsed in (0, 1, 300, 600, 899):
            app.now[0] = T0 + elapsed
            assert await status(seconds) == 200, elapsed
            assert await status(millis) == 200, elapsed
        app.now[0] = T0 + 901
        refused = await app.post("/v1/Task/List", seconds, json={})
        assert refused.status_code == 401
        assert "is 901 s old (allowed: 900 s)" in _error(refused)
        assert (await app.post("/v1/Task/List", millis, json={})).status_code == 401

        # Future skew stays small: 30 s ahead is a clock that is a little off, 120 s ahead is refused.
        app.now[0] = T0
        assert await status(str(int(T0) + 30)) == 200
        ahead = await app.post("/v1/Task/List", str(int(T0) + 120), json={})
        assert ahead.status_code == 401 and "120 s ahead of the server clock" in _error(ahead)

        # A random nonce is single-use by default (one captured header triple is not a key to everything) ...
        assert await status("nonce-1") == 200
        replay = await app.post("/v1/Task/List", "nonce-1", json={})
        assert replay.status_code == 401 and "was already used" in _error(replay)
        assert await status("42") == 200 and await status("42") == 401

        # ... and remembered for nonce_remember_seconds, then pruned: the table does not grow for ever.
        async def remembered() -> set[str]:
            async with app.services.sessions() as session:
                return set((await session.execute(select(Nonce.nonce))).scalars())

        assert await remembered() == {"nonce-1", "42"}
        app.now[0] = T0 + 6 * 86400
        assert await status("late-1") == 200
        assert await remembered() == {"nonce-1", "42", "late-1"}
        assert (await app.post("/v1/Task/List", "nonce-1", json={})).status_code == 401  # still remembered at 6 days
        app.now[0] = T0 + 7 * 86400 + 10
        assert await status("late-2") == 200
        assert await remembered() == {"late-1", "late-2"}


async def test_unique_nonces_makes_timestamps_single_use(tmp_path: Path) -> None:
    async with running(tmp_path, unique_nonces=True) as app:
        nonce = str(int(T0))
        assert (await app.post("/v1/Task/List", nonce, json={})).status_code == 200
        again = await app.post("/v1/Task/List", nonce, json={})
        assert again.status_code == 401 and "was already used" in _error(again)


# -- 2: what is stored ----------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _bytes_of(folder: Path) -> bytes:
    """Everything a local reader of the data folder's database files could see."""
    return b"".join(path.read_bytes() for path in sorted(folder.glob("dreamserve.db*")))


async def test_data_folder_is_private_and_the_database_alone_grants_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        data = app.settings.data_dir
        upload = await app.post("/v1/File/Upload", files=[("file", ("a.png", png_bytes(), "image/png"))])
        uploaded = upload.json()["list"][0]
        run = await app.post(
            f"/v1/Run/{MODEL}",
            data={"prompt": "a fox", "size": "64x64", "callbackUrl": "https://hooks.example.com/x"},
            files=[("inputImage", ("ref.png", png_bytes(), "image/png"))],
        )
        run_body = run.json()
        token = run_body["socketaccesstoken"]
        assert len(token) == 30 and token.isalnum()
        detail = (await app.post("/v1/Task/Detail", json={"tasktoken": token})).json()["tasklist"][0]
        input_url = detail["parameters"]["inputImage"]
        input_key = input_url.split("/")[-2]
        assert detail["socketaccesstoken"] == token

        # Permissions: the folder 0700, the database, its WAL and SHM, and the server key 0600.
        assert _mode(data) == 0o700
        for name in ("dreamserve.db", "dreamserve.db-wal", "dreamserve.db-shm", "server.key"):
            assert (data / name).exists(), name
            assert _mode(data / name) == 0o600, (name, oct(_mode(data / name)))

        # The capabilities are nowhere in the database files (nor the webhook secret, nor the blob paths).
        stored = _bytes_of(data)
        for secret in (token, uploaded["accesskey"], input_key, app.creds.webhook_secret):
            assert secret.encode() not in stored, secret
        assert not any(uploaded["accesskey"] in str(path) for path in data.rglob("*"))

        # Yet Detail shows them, and they work: file URLs, Detail by token, the same token on every read.
        assert (await app.client.get(uploaded["url"].removeprefix("http://127.0.0.1:8000"))).status_code == 200
        assert (await app.client.get(input_url.removeprefix("http://127.0.0.1:8000"))).status_code == 200
        again = (await app.post("/v1/Task/Detail", json={"socketaccesstoken": token})).json()
        assert again["tasklist"][0]["id"] == run_body["taskid"]
        key_file = (data / "server.key").read_text()

    # The same database with another server secret grants nothing: tokens and keys no longer match.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "data").mkdir()
    for path in data.glob("dreamserve.db*"):
        (moved / "data" / path.name).write_bytes(path.read_bytes())
    async with running(moved) as other:
        assert (other.settings.data_dir / "server.key").read_text() != key_file
        listing = (await other.post("/v1/Task/List", json={})).json()
        assert listing["total"] == "0"  # a new project; the old one's token cannot be presented anyway
        assert (await other.client.get(f"/v1/File/{uploaded['accesskey']}/{uploaded['name']}")).status_code == 404
        async with other.services.sessions() as session:
            row = (await session.execute(text("SELECT id FROM tasks"))).scalar_one()
            task = await other.services.store.get_by_id(row)
        assert task is not None and other.services.keys.token(task) != token


async def test_rows_from_before_the_upgrade_keep_working_and_webhook_secrets_get_sealed(tmp_path: Path) -> None:
    """Migration: a database at the initial revision with clear tokens, keys and webhook secrets."""
    data = tmp_path / "data"
    data.mkdir()
    engine = make_engine(f"sqlite+aiosqlite:///{data / 'dreamserve.db'}", pool_size=1)

    def old_schema(connection: Any) -> None:
        command.upgrade(alembic_config(connection), "9bc1bd1e81df")

    async with engine.begin() as connection:
        await connection.run_sync(old_schema)
        await connection.execute(
            text(
                "INSERT INTO projects (id, name, api_key_hash, api_key_prefix, secret_sealed, signature_required,"
                " webhook_secret, revoked, created) VALUES (7, 'old', 'h', 'p', NULL, 0, 'clear-webhook-secret', 0, 1)"
            )
        )
        await connection.execute(
            text(
                "INSERT INTO tasks (id, project_id, token, model, status, priority, parameters, job, callback_url,"
                " callback_events, pexit, debugoutput, debugerror, details, createtime, attempts, stop_requested)"
                " VALUES (3, 7, 'LegacyToken0123456789abcdefghi', :model, 'task_cancel', 0, '{}', '{}', '', '[]',"
                " '130', '', '', '{\"worker\": \"host:1:m:0\"}', 1, 0, '')"
            ),
            {"model": MODEL},
        )
        await connection.execute(
            text(
                "INSERT INTO files (id, project_id, task_id, role, position, name, contenttype, size, accesskey,"
                " blob_key, meta, created) VALUES (5, 7, 3, 'output', 0, '0.png', 'image/png', 4, 'legacy-key',"
                " 'outputs/legacy-key/0.png', '{}', 1)"
            )
        )
    await engine.dispose()
    blob = data / "files" / "outputs" / "legacy-key" / "0.png"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(png_bytes())

    async with running(tmp_path) as app:
        task = await app.services.store.get_by_token("LegacyToken0123456789abcdefghi")
        assert task is not None and task.id == 3
        rendered = await task_object_of(app.services, task)
        assert rendered["socketaccesstoken"] == "LegacyToken0123456789abcdefghi"
        assert rendered["outputs"][0]["accesskey"] == "legacy-key"
        assert "worker" not in rendered["details"]  # hidden from clients, old rows included
        assert (await app.client.get("/v1/File/legacy-key/0.png")).status_code == 200
        async with app.services.sessions() as session:
            row = (
                await session.execute(text("SELECT webhook_secret, webhook_secret_sealed FROM projects WHERE id = 7"))
            ).one()
        assert row[0] == "" and row[1]
        assert app.services.keys.webhook_secret(7, row[1]) == "clear-webhook-secret"
    assert b"clear-webhook-secret" not in _bytes_of(data)


def test_webhook_secret_round_trips_through_the_seal(tmp_path: Path) -> None:
    keys = ServerKey.load(Settings(data_dir=tmp_path))
    sealed = keys.seal("webhook-secret:1", "s" * 64)
    assert "s" * 8 not in sealed and keys.webhook_secret(1, sealed) == "s" * 64
    assert keys.webhook_secret(2, sealed) != "s" * 64
    body, stamp = b"{}", "1"
    stamp = str(int(time.time()))
    assert verify_webhook("s" * 64, stamp, body, sign_webhook(keys.webhook_secret(1, sealed), stamp, body))


# -- 3: eight 500s, fixed at input ----------------------------------------------------------------------------


async def test_hostile_ids_nesting_and_surrogates_are_refused_cleanly(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        run = await app.post(f"/v1/Run/{MODEL}", json={"prompt": "fine", "size": "64x64"})
        assert run.json()["result"] is True

        cases: list[tuple[str, dict[str, Any]]] = []
        for bad in ("²", "١٢", "9" * 25, str(2**63), "-1", "1e3", " 12a"):
            cases += [
                ("/v1/Task/Detail", {"taskid": bad}),
                ("/v1/Task/Cancel", {"taskid": bad}),
                ("/v1/Task/List", {"start": bad}),
                ("/v1/Task/List", {"limit": bad}),
                ("/v1/File/FolderCreate", {"name": "x", "parentid": bad}),
            ]
            if bad != "1e3":  # Run's numbers are "integer or float" (Wiro), so 1e3 is a seed of 1000
                cases += [
                    (f"/v1/Run/{MODEL}", {"prompt": "x", "size": "64x64", "maxImages": bad}),
                    (f"/v1/Run/{MODEL}", {"prompt": "x", "size": "64x64", "seed": bad}),
                ]
        for path, body in cases:
            response = await app.post(path, json=body)
            assert response.status_code == 200, (path, body, response.text)
            assert response.json()["result"] is False, (path, body)
        folder = await app.post("/v1/File/Upload", data={"folderid": "²"}, files=[("file", ("a.png", png_bytes()))])
        assert "integer" in _error(folder)
        assert (await app.post("/v1/Task/Detail", json={"taskid": str(2**63 - 1)})).json()["errors"][0]["code"] == 1

        # Deep nesting: a clear refusal, not a RecursionError.
        for depth in (40, 5000, 100_000):
            content = '{"prompt": ' + "[" * depth + "]" * depth + "}"
            response = await app.post(f"/v1/Run/{MODEL}", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 200 and "nested" in _error(response), depth

        # A lone surrogate is refused at input, so the project's List and Detail keep working.
        for prompt in ("\ud800", "fox \udfff tail"):
            content = json.dumps({"prompt": prompt, "size": "64x64"})  # ensure_ascii: sent as \\ud800
            response = await app.post(f"/v1/Run/{MODEL}", content=content, headers={"content-type": "application/json"})
            assert "lone surrogate" in _error(response)
        listing = await app.post("/v1/Task/List", json={})
        assert listing.status_code == 200 and listing.json()["total"] == "1"
        detail = await app.post("/v1/Task/Detail", json={"taskid": run.json()["taskid"]})
        assert detail.status_code == 200 and detail.json()["result"] is True
        token = await app.post(
            "/v1/Task/Detail", content=json.dumps({"tasktoken": "\ud800"}), headers={"content-type": "application/json"}
        )
        assert token.status_code == 200 and token.json()["result"] is False

        # The OpenAI-style route's integer field too.
        bearer = {"authorization": f"Bearer {app.creds.api_key}:{app.creds.api_secret}"}
        openai = await app.client.post(
            "/v1/images/generations", headers=bearer, json={"prompt": "x", "output_compression": "²"}
        )
        assert openai.status_code == 400, openai.text


@pytest.mark.parametrize(
    "url",
    ["http://0177.0.0.3/", "http://1.2.3.4:99999/", "http://\u00e9\u0301xn--/", "http://[::1%25x]/", "http://a..b/"],
)
async def test_every_fetch_error_is_a_clear_input_error(url: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        await fetch(url, max_bytes=100, timeout=5, allow_private=False)
    assert url[:20] in error.value.message or "does not resolve" in error.value.message


# -- 4: truncated images at submit -----------------------------------------------------------------------------


async def test_truncated_images_are_refused_at_submit(tmp_path: Path) -> None:
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        noisy.save(buffer, format=fmt)
        whole = buffer.getvalue()
        cut = whole[: len(whole) * 2 // 3]
        async with running(tmp_path / fmt) as app:
            ok = await app.post(f"/v1/Run/{MODEL}", data={"prompt": "x"}, files=[("inputImage", ("a", whole))])
            assert ok.json()["result"] is True, ok.text
            bad = await app.post(f"/v1/Run/{MODEL}", data={"prompt": "x"}, files=[("inputImage", ("a", cut))])
            assert "not an image this service can read" in _error(bad), fmt
            upload = await app.post("/v1/File/Upload", files=[("file", ("a", cut))])
            assert upload.json()["result"] is False


async def test_unexpected_errors_give_an_id_and_keep_the_traceback_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as app:

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("secret internals at /srv/weights")

        monkeypatch.setattr(app.services.store, "list_ids", broken)
        transport = httpx.ASGITransport(app=app.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            with caplog.at_level(logging.ERROR):
                response = await client.post("/v1/Task/List", headers=app.headers(), json={})
        assert response.status_code == 500
        message = _error(response)
        assert "/srv/weights" not in response.text and "Traceback" not in response.text
        error_id = message.split("error id ")[1].split(")")[0]
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None


# -- 5: log injection -------------------------------------------------------------------------------------------


async def test_urls_with_control_characters_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        for field, value in (
            ("callbackUrl", "https://hooks.example.com/x\nINFO forged line"),
            ("callbackUrl", "https://hooks.example.com/x\r\nSet-Cookie: a=b"),
            ("callbackUrl", "https://hooks.example.com/a b"),
            ("callbackUrl", "https://hooks.example.com/\u2028x"),
            ("inputImage", "https://img.example.com/a.png\nforged"),
            ("inputImage", "https://img.example.com/\x00.png"),
        ):
            response = await app.post(f"/v1/Run/{MODEL}", json={"prompt": "x", "size": "64x64", field: value})
            assert f"[{field}] contains the control or space character" in _error(response), value
        listing = (await app.post("/v1/Task/List", json={})).json()
        assert listing["total"] == "0"


async def test_logged_callback_urls_are_quoted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path, webhook_attempts=1) as app:
        url = "http://127.0.0.1:9/hook?x=ä'"
        run = await app.post(f"/v1/Run/{MODEL}", json={"prompt": "x", "size": "64x64", "callbackUrl": url})
        with caplog.at_level(logging.WARNING, logger="dreamserve.webhooks"):
            await app.post("/v1/Task/Cancel", json={"taskid": run.json()["taskid"]})
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any("failed after" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.1)
        lines = [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()]
        assert lines and repr(url) in lines[0], lines


# -- 7: headers --------------------------------------------------------------------------------------------------


async def test_security_headers_favicon_and_allowed_hosts(tmp_path: Path) -> None:
    async with running(tmp_path, allowed_hosts=["127.0.0.1", "dream.example.com"]) as app:
        page = await app.client.get("/")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        script = await app.client.get("/static/app.js")
        assert script.status_code == 200 and "frame-ancestors 'none'" in script.headers["content-security-policy"]

        icon = await app.client.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(icon.content)).size == (32, 32)

        upload = (await app.post("/v1/File/Upload", files=[("file", ("a.png", png_bytes()))])).json()["list"][0]
        file = await app.client.get(upload["url"].removeprefix("http://127.0.0.1:8000"))
        assert file.status_code == 200 and file.headers["content-type"] == "image/png"
        assert file.headers["x-content-type-options"] == "nosniff"
        assert file.headers["content-security-policy"] == "sandbox"
        assert file.headers["cross-origin-resource-policy"] == "cross-origin"

        # DNS rebinding: a page on evil.example whose name now points here sends its own Host header.
        rebound = await app.client.get("/", headers={"host": "evil.example"})
        assert rebound.status_code == 400
        listing = await app.client.post("/v1/Task/List", headers={"host": "evil.example:8000"}, json={})
        assert listing.status_code == 400
        named = await app.client.get("/favicon.ico", headers={"host": "dream.example.com"})
        assert named.status_code == 200


# -- 8: operational endpoints ------------------------------------------------------------------------------------


async def test_ops_endpoints_behind_a_token(tmp_path: Path) -> None:
    async with running(tmp_path, ops_token="ops-secret-123") as app:
        for path in ("/metrics", "/healthz", "/docs", "/openapi.json", "/redoc"):
            refused = await app.client.get(path)
            assert refused.status_code == 401 and "ops_token" in _error(refused), path
            wrong = await app.client.get(path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
            allowed = await app.client.get(path, headers={"authorization": "Bearer ops-secret-123"})
            assert allowed.status_code == 200, path
        probe = await app.client.get("/readyz")
        assert probe.status_code == 200 and probe.json() == {"ready": True}
        full = await app.client.get("/readyz", headers={"authorization": "Bearer ops-secret-123"})
        assert full.json() == {"ready": True, "waiting": [], "loops": []}
        # The API itself does not take the ops token, nor does the ops token need API credentials.
        assert (await app.post("/v1/Task/List", json={})).status_code == 200

    async with running(tmp_path / "open") as app:
        for path in ("/metrics", "/healthz", "/openapi.json"):
            assert (await app.client.get(path)).status_code == 200, path


async def _cancel_with_callback(app: App, url: str) -> None:
    run = await app.post(f"/v1/Run/{MODEL}", json={"prompt": "x", "size": "64x64", "callbackUrl": url})
    await app.post("/v1/Task/Cancel", json={"taskid": run.json()["taskid"]})


async def _deliveries(app: App, taskid: str = "1") -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log: list[dict[str, Any]] = (await app.post("/v1/Task/Webhooks", json={"taskid": taskid})).json()["deliveries"]
        if log and log[0]["state"] in ("delivered", "failed"):
            return log
        await asyncio.sleep(0.1)
    raise AssertionError("no delivery settled")


async def test_callbacks_have_their_own_allow_list(tmp_path: Path, receiver: Receiver) -> None:
    """Allowing an internal image host for fetches does not let clients POST callbacks to it, and back."""
    url = receiver.url("/hook")
    async with running(tmp_path / "a", fetch_allow_hosts=["127.0.0.1"], webhook_attempts=1) as app:
        await _cancel_with_callback(app, url)
        log = await _deliveries(app)
        assert log[0]["state"] == "failed" and "loopback" in log[0]["lasterror"] and not receiver.posts
    async with running(tmp_path / "b", callback_allow_hosts=["127.0.0.1"], webhook_attempts=1) as app:
        await _cancel_with_callback(app, url)
        log = await _deliveries(app)
        assert log[0]["state"] == "delivered" and len(receiver.posts) == 1
        # Signed with the project's webhook secret, which the server reads sealed from the database.
        posted = receiver.posts[0]
        headers = posted["headers"]
        assert verify_webhook(
            app.creds.webhook_secret,
            headers["x-dreamserve-timestamp"],
            posted["raw"],
            headers["x-dreamserve-signature"],
        )


# -- 4 and 8 through a scripted app and the tiny server: a model error, the PNGs, what Detail shows ---------------


def test_model_errors_output_pngs_and_details_through_the_server(
    scripted: Any, tiny_server: LiveServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    # The model process cannot write its outputs (their folder is a file): a real error inside the model process.
    # The scripted engine's (no torch: its model process starts in a second), written as the diffusers engine
    # writes its files; the supervisor turns any such error into the same short message.
    outputs = data / "files" / "outputs"
    outputs.parent.mkdir(parents=True)
    outputs.write_text("not a folder")
    server = scripted(steps=2, data_dir=data, model={"max_pixels": 64 * 64})

    failed = server.wait(server.run({"prompt": "a secret prompt", "size": "64x64"})["taskid"])
    assert failed["pexit"] == "1", failed
    message = failed["debugerror"]
    assert message.startswith("The model failed on this task (") and "error id " in message, message
    error_id = message.split("error id ")[1].split(")")[0]
    assert "Traceback" not in json.dumps(failed) and str(data) not in json.dumps(failed)
    # Nor in the event log that sockets replay: only the short message was recorded.
    with sqlite3.connect(data / "dreamserve.db") as db:
        events = [row[0] or "" for row in db.execute("SELECT message FROM task_events")]
    assert events and not any("Traceback" in event or str(data) in event for event in events)
    assert any(error_id in event for event in events)
    # The log has it all, under the same id.
    log = server.log()
    assert f"error id {error_id}" in log and "Traceback" in log

    outputs.unlink()
    recovered = server.wait(server.run({"prompt": "a secret prompt", "size": "64x64"})["taskid"])
    assert recovered["pexit"] == "0", recovered

    # The PNGs and what Detail shows of a finished task: the tiny pipeline's, on the session's tiny server.
    server, data = tiny_server, tiny_server.settings.data_dir
    done = server.wait(server.run({"prompt": "a secret prompt", "size": "1K", "seed": "7"})["taskid"])
    assert done["pexit"] == "0", done
    assert "worker" not in done["details"] and "timings" in done["details"]
    # The worker id is "host:pid:model:slot"; look for that shape, since a short host name ("vm" in CI) can
    # occur by chance inside a random token.
    assert not re.search(re.escape(socket.gethostname()) + r":\d+:", json.dumps(done)), done
    image = server.http.get(done["outputs"][0]["url"])
    assert (
        image.headers["x-content-type-options"] == "nosniff" and image.headers["content-security-policy"] == "sandbox"
    )
    with Image.open(io.BytesIO(image.content)) as png:
        meta = dict(png.text)  # type: ignore[attr-defined]
    assert meta["ai_generated"] == "true" and meta["seed"] == "7" and meta["model"] == MODEL, meta
    assert "trainedAlgorithmicMedia" in meta["DigitalSourceType"]
    assert "prompt" not in meta and "a secret prompt" not in json.dumps(meta)
    # The output's access key is shown and works, but is stored nowhere: not in its row, not in the event log.
    accesskey, token = done["outputs"][0]["accesskey"], done["socketaccesstoken"]
    stored = _bytes_of(data)
    assert accesskey.encode() not in stored and token.encode() not in stored
    assert not any(accesskey in str(path) for path in data.rglob("*"))
