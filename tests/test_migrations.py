"""One Alembic tree for every database: after ``upgrade head`` the schema equals the models, with no diff."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from dreamserve.dialects.ark.render import image_error
from dreamserve.dialects.wiro.render import event_message, file_item, input_marker, request_parameters
from dreamserve.dialects.wiro.tasks import task_object_of
from dreamserve.facts import FileMeta, ImageReport, LogText, Progress, TaskDetails
from dreamserve.projects import hash_key
from dreamserve.queue.db import Base, File, Task
from dreamserve.queue.migrate import alembic_config, upgrade
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import FileRole, Frame, TaskStatus
from tests.conftest import png_bytes

URLS = ["sqlite"]
if os.environ.get("DREAMSERVE_TEST_POSTGRES"):
    URLS.append("postgresql")


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


@pytest.mark.parametrize("dialect", URLS)
async def test_upgrade_head_matches_the_models(dialect: str, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/db.sqlite" if dialect == "sqlite" else os.environ["DREAMSERVE_TEST_POSTGRES"]
    engine = create_async_engine(url)
    try:
        await upgrade(engine)
        await upgrade(engine)  # idempotent: a second replica starting finds nothing to do
        async with engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
    finally:
        await engine.dispose()


def _upgrade_to(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def test_queue_columns_are_filled_in_for_unfinished_tasks(tmp_path: Path) -> None:
    """Tasks queued before the shape columns existed are claimed like new ones: shape from their job, and
    URL inputs left for the preprocess loop."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")
    job = {"prompt": "p", "width": 96, "height": 64, "num_images": 3, "seed": 1, "watermark": False}
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "9bc1bd1e81df")
            await connection.execute(
                text(
                    "INSERT INTO projects (id, name, api_key_hash, api_key_prefix, signature_required, webhook_secret,"
                    " revoked, created) VALUES (1, 'p', 'h', 'k', 1, '', 0, 0)"
                )
            )
            for task_id, inputs in ((1, []), (2, [{"url": "https://example.com/a.png"}]), (3, [{"blob_key": "k"}])):
                await connection.execute(
                    text(
                        "INSERT INTO tasks (id, project_id, token, model, status, priority, parameters, job,"
                        " callback_url, callback_events, pexit, debugoutput, debugerror, details, createtime,"
                        " attempts, stop_requested) VALUES (:id, 1, :token, 'm', 'task_queue', 0, '{}', :job,"
                        " '', '[]', '', '', '', '{}', 0, 0, '')"
                    ),
                    {"id": task_id, "token": f"t{task_id}", "job": json.dumps({**job, "inputs": inputs})},
                )
        await upgrade(engine)
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    text("SELECT id, width, height, num_images, has_inputs, inputs_ready FROM tasks ORDER BY id")
                )
            ).all()
        assert [tuple(row) for row in rows] == [(1, 96, 64, 3, 0, 1), (2, 96, 64, 3, 1, 0), (3, 96, 64, 3, 1, 1)]
    finally:
        await engine.dispose()


async def test_the_unfinished_counters_start_from_the_rows(tmp_path: Path) -> None:
    """Issue 27: the counters a Run's quota check reads are filled, once, from the tasks already unfinished."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "d7f3a9c2e5b1")
            for project in (1, 2):
                await connection.execute(
                    text(
                        "INSERT INTO projects (id, name, api_key_hash, api_key_prefix, signature_required,"
                        " webhook_secret, webhook_secret_sealed, revoked, created) VALUES (:id, 'p', :h, 'k', 1, '',"
                        " '', 0, 0)"
                    ),
                    {"id": project, "h": f"h{project}"},
                )
            shapes = [(1, "task_queue", 2), (1, "task_start", 1), (1, "task_postprocess_end", 4), (1, "task_cancel", 1)]
            for number, (project, status, images) in enumerate(shapes, start=1):
                await connection.execute(
                    text(
                        "INSERT INTO tasks (id, project_id, model, status, priority, parameters, job, width, height,"
                        " num_images, has_inputs, inputs_ready, callback_url, callback_events, pexit, debugoutput,"
                        " debugerror, details, createtime, attempts, stop_requested) VALUES (:id, :project, 'm',"
                        " :status, 0, '{}', '{}', 100, 50, :images, 0, 1, '', '[]', '', '', '', '{}', 0, 0, '')"
                    ),
                    {"id": number, "project": project, "status": status, "images": images},
                )
        await upgrade(engine)
        async with engine.connect() as connection:
            query = text("SELECT id, unfinished_tasks, unfinished_pixels FROM projects ORDER BY id")
            rows = [tuple(row) for row in (await connection.execute(query)).all()]
        assert rows == [(1, 2, 3 * 100 * 50), (2, 0, 0)]
    finally:
        await engine.dispose()


def test_detail_parameters_of_rows_stored_before_the_job_kept_the_request() -> None:
    """A row of an earlier version shows the echo stored with it (its upload's marker as the file's URL); a
    newer row's echo is rendered from its job, with the same keys."""
    url = "http://127.0.0.1:8000/v1/File/key/inputImage-1.png"
    job = {"prompt": "p", "width": 1024, "height": 1024, "num_images": 2, "seed": 7, "watermark": False}
    refs = [{"url": "https://example.com/a.png"}, {"blob_key": "inputs/x/inputImage-1.png"}]
    stored = {"prompt": "p", "size": "1K", "maxImages": "2", "watermark": "false", "seed": "7"}
    legacy = Task(
        job={**job, "inputs": refs},
        parameters={**stored, "inputImage": ["https://example.com/a.png", input_marker(1)]},
    )
    assert request_parameters(legacy, {1: url}) == {**stored, "inputImage": ["https://example.com/a.png", url]}
    current = Task(job={**job, "references": refs, "asked_size": "1K", "asked_callback": "not a url"}, parameters={})
    rendered = request_parameters(current, {1: url})
    assert rendered == {**stored, "inputImage": ["https://example.com/a.png", url], "callbackUrl": "not a url"}
    assert list(rendered) == ["prompt", "size", "maxImages", "watermark", "seed", "inputImage", "callbackUrl"]
    broken = Task(job={"prompt": "no shape"}, parameters=stored)
    assert request_parameters(broken, {}) == stored, "a row whose job does not load still shows its echo"


def test_clear_secrets_of_old_rows_are_sealed_and_still_work(make_app: Any, tmp_path: Path) -> None:
    """A database of the first schema holds clear task tokens, file access keys and webhook secrets; after the
    server's start none of them is left in the SQLite file's bytes, and the old token and file URL still work."""
    token, accesskey = "T" * 6 + secrets.token_hex(12), "-".join(secrets.token_hex(4) for _ in range(8))
    webhook_secret, api_key = "whsec" + secrets.token_hex(16), secrets.token_hex(16)
    blob_key = "outputs/oldfolder/0.png"
    (tmp_path / "files/outputs/oldfolder").mkdir(parents=True)
    (tmp_path / "files" / blob_key).write_bytes(png_bytes())
    job = {"prompt": "old", "width": 96, "height": 64, "num_images": 1, "seed": 1, "watermark": False, "inputs": []}

    async def old_database() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/dreamserve.db")
        try:
            async with engine.begin() as connection:
                await connection.run_sync(_upgrade_to, "9bc1bd1e81df")
                await connection.execute(
                    text(
                        "INSERT INTO projects (id, name, api_key_hash, api_key_prefix, signature_required,"
                        " webhook_secret, revoked, created) VALUES (1, 'old', :hash, 'k', 0, :secret, 0, 0)"
                    ),
                    {"hash": hash_key(api_key), "secret": webhook_secret},
                )
                await connection.execute(
                    text(
                        "INSERT INTO tasks (id, project_id, token, model, status, priority, parameters, job,"
                        " callback_url, callback_events, pexit, debugoutput, debugerror, details, createtime,"
                        " attempts, stop_requested) VALUES (1, 1, :token, 'bytedance/seedream-v4',"
                        " 'task_postprocess_end', 0, '{}', :job, '', '[]', '0', '', '', '{}', 0, 1, '')"
                    ),
                    {"token": token, "job": json.dumps(job)},
                )
                await connection.execute(
                    text(
                        "INSERT INTO files (id, project_id, task_id, role, position, name, contenttype, size,"
                        " accesskey, blob_key, meta, created) VALUES (1, 1, 1, 'output', 0, '0.png', 'image/png',"
                        " :size, :key, :blob, '{}', :now)"
                    ),
                    {
                        "size": (tmp_path / "files" / blob_key).stat().st_size,
                        "key": accesskey,
                        "blob": blob_key,
                        "now": time.time(),
                    },
                )
        finally:
            await engine.dispose()

    asyncio.run(old_database())
    clear = [token.encode(), accesskey.encode(), webhook_secret.encode()]
    assert all(value in _stored_bytes(tmp_path) for value in clear), "the old shape holds them in clear"

    app = make_app(data_dir=tmp_path, model={"workers": 0})
    detail = app.http.post("/v1/Task/Detail", headers={"x-api-key": api_key}, json={"tasktoken": token}).json()
    (task,) = detail["tasklist"]
    assert task["socketaccesstoken"] == token, "the old token is kept, sealed, not rotated"
    url = task["outputs"][0]["url"]
    assert f"/v1/File/{accesskey}/0.png" in url and app.http.get(url).status_code == 200
    app.client.__exit__(None, None, None)  # closed: what is on disk is all there is
    stored = _stored_bytes(tmp_path)
    assert [value for value in clear if value in stored] == []
    conn = sqlite3.connect(tmp_path / "dreamserve.db")
    try:
        assert conn.execute("SELECT count(*) FROM tasks WHERE token IS NOT NULL").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM files WHERE accesskey IS NOT NULL").fetchone() == (0,)
        assert conn.execute("SELECT webhook_secret, webhook_secret_sealed != '' FROM projects").fetchall()[0] == ("", 1)
    finally:
        conn.close()


def _stored_bytes(data_dir: Path) -> bytes:
    """The database file and its WAL, as bytes on disk."""
    return b"".join(p.read_bytes() for p in data_dir.glob("dreamserve.db*"))


#: Wiro's progress object as earlier versions stored it (on the task row and in the event log): step 7 of 20, 3.3 s in.
OLD_PROGRESS = {
    "type": "progressGenerate",
    "task": "Generate",
    "percentage": "35",
    "stepCurrent": "7",
    "stepTotal": "20",
    "speed": "2.12",
    "speedType": "it/s",
    "elapsedTime": "3s",
    "remainingTime": "6s",
}
OLD_DETAILS = {
    "method": "native 64x64",
    "seeds": [5, 6],
    "timings": {"queue": 0.01, "load": 1.5, "denoise": 0.25, "my_stage": 0.5, "batch_wait": 0.0},
    "batched_with": [],
    "failed_images": [{"index": 1, "seed": 6, "message": "could not be finished (the server log has why)"}],
    "worker": "host:1:m:0",
}
OLD_IMAGE_ERROR = {"code": "InternalServiceError", "message": "Image 1 could not be finished (error id e-1)."}


async def test_facts_stored_as_dicts_by_earlier_versions_read_as_records(tmp_path: Path) -> None:
    """Rows of earlier versions kept Wiro's progress object, a details dict, file metadata dicts and Ark's error
    object of an image in their JSON; they read back as the records, and render byte for byte as they did."""
    services = Services(Settings(data_dir=tmp_path, models={"m/m": ModelSpec(workers=0)}), workers="none")
    await upgrade(services.engine)
    stored = [
        (Frame.OUTPUT, OLD_PROGRESS),
        (Frame.OUTPUT_IMAGE, {"index": 0, "name": "0.png"}),
        (Frame.OUTPUT_IMAGE, {"index": 1, "error": OLD_IMAGE_ERROR}),
        (Frame.OUTPUT_FULL, {"raw": "step 7/20"}),
        (TaskStatus.CANCEL, "cancelled"),
    ]
    try:
        async with services.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO projects (id, name, api_key_hash, api_key_prefix, signature_required,"
                    " webhook_secret, revoked, created) VALUES (1, 'p', 'h', 'k', 0, '', 0, 0)"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO tasks (id, project_id, model, status, priority, parameters, job, callback_url,"
                    " callback_events, pexit, debugoutput, debugerror, details, progress, createtime, attempts,"
                    " stop_requested) VALUES (1, 1, 'm/m', 'task_postprocess_end', 0, '{}', '{}', '', '[]', '0',"
                    " '', '', :details, :progress, 0, 1, '')"
                ),
                {"details": json.dumps(OLD_DETAILS), "progress": json.dumps(OLD_PROGRESS)},
            )
            for meta in ({}, {"seed": 5, "width": 64, "height": 64}):
                await connection.execute(
                    text(
                        "INSERT INTO files (project_id, task_id, role, position, name, contenttype, size, key_salt,"
                        " blob_key, meta, created) VALUES (1, 1, 'output', 0, '0.png', 'image/png', 1, 's', 'k',"
                        " :meta, 0)"
                    ),
                    {"meta": json.dumps(meta)},
                )
            for event_type, message in stored:
                await connection.execute(
                    text("INSERT INTO task_events (task_id, type, message, created) VALUES (1, :type, :message, 0)"),
                    {"type": event_type, "message": json.dumps(message)},
                )
        task = await services.store.get_by_id(1)
        assert task is not None and isinstance(task.progress, Progress) and isinstance(task.details, TaskDetails)
        assert (task.progress.step, task.progress.total, task.progress.elapsed) == (7, 20, 3.0)
        assert task.details.timings is not None and task.details.timings.stages()["my_stage"] == 0.5
        assert json.dumps(task.details.dump()) == json.dumps(OLD_DETAILS), "same keys, same order, kept extras"
        rendered = await task_object_of(services, task)
        assert json.dumps(rendered["progress"]) == json.dumps(OLD_PROGRESS)
        assert rendered["details"] == {name: value for name, value in OLD_DETAILS.items() if name != "worker"}

        events = await services.store.events(1)
        kinds = [type(event.message) for event in events]
        assert kinds == [Progress, ImageReport, ImageReport, LogText, str]
        assert [json.dumps(event_message(event.message)) for event in events[:1] + events[3:]] == [
            json.dumps(message) for _, message in stored[:1] + stored[3:]
        ]
        report = events[2].message
        assert isinstance(report, ImageReport) and report.failure is not None
        assert json.dumps(image_error(report.failure)) == json.dumps(OLD_IMAGE_ERROR)

        (*_, old, seeded) = (await services.store.files([1], FileRole.OUTPUT))[1]
        assert isinstance(old.meta, FileMeta) and old.role is FileRole.OUTPUT and old.meta == FileMeta()
        assert "seed" not in file_item("", old, services.keys)
        assert (file_item("", seeded, services.keys)["seed"], seeded.meta.width) == ("5", 64)
        # A row built with a dict (as callers of earlier versions did) holds the record at once.
        assert File(meta={"width": 2, "height": 3}).meta == FileMeta(width=2, height=3)
    finally:
        await services.engine.dispose()


SCHEMAS = Path(__file__).with_name("migration_schemas.json")


CONSTRAINT = re.compile(r"(PRIMARY KEY|FOREIGN KEY|UNIQUE|CHECK|CONSTRAINT) ?\(")


def _ddl(sql: str | None) -> str:
    """A table's DDL with its constraints sorted: a batch rewrite of a table lists them in an order that varies
    from run to run (a set's), which SQLite does not mind; its columns keep their order."""
    if not sql or not sql.startswith("CREATE TABLE"):
        return str(sql)
    head, _, body = sql.partition("(\n\t")
    items = body.removesuffix("\n)").split(", \n\t")
    columns = [item for item in items if not CONSTRAINT.match(item)]
    constraints = sorted(item for item in items if CONSTRAINT.match(item))
    return f"{head}(\n\t" + ", \n\t".join(columns + constraints) + "\n)"


def _schema(connection: Connection) -> list[list[str]]:
    rows = connection.execute(text("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"))
    return [[kind, name, table, _ddl(sql)] for kind, name, table, sql in rows]


def _walk(connection: Connection) -> dict[str, list[list[str]]]:
    """sqlite_master after each revision on the way up, then after each one on the way back down to base."""
    script = ScriptDirectory.from_config(alembic_config(connection))
    revisions = [revision.revision for revision in reversed(list(script.walk_revisions()))]
    schemas = {}
    for revision in revisions:
        command.upgrade(alembic_config(connection), revision)
        schemas[f"up {revision}"] = _schema(connection)
    for revision in reversed(revisions):
        command.downgrade(alembic_config(connection), "-1")
        schemas[f"down {revision}"] = _schema(connection)
    return schemas


def _walked(path: Path) -> dict[str, list[list[str]]]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            return _walk(connection)
    finally:
        engine.dispose()


def test_every_revision_up_and_down_leaves_the_schema_it_always_left(tmp_path: Path) -> None:
    """The revisions' SQL, step by step both ways, is the one dumped before they were rewritten (the DDL of
    every table, index and trigger in sqlite_master): a change to how a revision is written changes no schema.
    ``python -m tests.test_migrations`` rewrites the dump, only for a revision that is meant to change."""
    expected = json.loads(SCHEMAS.read_text())
    assert _walked(tmp_path / "db.sqlite") == expected


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        SCHEMAS.write_text(json.dumps(_walked(Path(folder) / "db.sqlite"), indent=1) + "\n")
