"""One Alembic tree for every database: after ``upgrade head`` the schema equals the models, with no diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from dreamserve.queue.db import Base, Task
from dreamserve.queue.migrate import alembic_config, upgrade
from dreamserve.wiro.render import input_marker, request_parameters

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
