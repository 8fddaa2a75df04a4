"""SQLite's direct Run writer (``queue/writes.py``) against the ORM session path it replaces there: the same
tasks created both ways, each in a database of its own, leave the same rows column by column (types included:
JSON 'null' is not NULL, 1 is not 1.0), the same detached task, the same quota and storage refusals."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from dreamserve import filerows
from dreamserve.errors import QuotaExceeded, StorageFull
from dreamserve.facts import FileMeta
from dreamserve.filerows import input_row
from dreamserve.jobs import StoredReference, TaskJob
from dreamserve.queue import files, tasks, writes
from dreamserve.queue.db import File, Project, Task
from dreamserve.queue.migrate import upgrade
from dreamserve.queue.quotas import Quota, StorageQuota
from dreamserve.queue.writes import Writes
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings

MODEL = "bytedance/seedream-v4"
TABLES = ("projects", "tasks", "files", "task_events", "webhook_deliveries", "queue_counts")


async def _services(path: Path, *, direct: bool) -> Services:
    settings = Settings(data_dir=path, models={MODEL: ModelSpec(workers=0)}, server_secret="s" * 64)
    services = Services(settings, workers="none")
    await upgrade(services.engine)
    async with services.sessions.begin() as session:
        session.add(Project(id=1, name="p", api_key_hash="h", api_key_prefix="k", created=0.0))
    assert isinstance(services.store.writes, Writes)  # SQLite takes the direct path unless told not to
    if not direct:
        services.store.writes = None
    return services


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[tuple[Services, Services]]:
    """The session path's services, then the direct path's, each on a database of its own."""
    orm = await _services(tmp_path / "orm", direct=False)
    direct = await _services(tmp_path / "direct", direct=True)
    yield orm, direct
    for services in (orm, direct):
        await services.engine.dispose()


class Salts:
    """Repeatable salts, restarted for each path's run, so that both paths' rows can be compared whole."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.numbers = itertools.count()

    def __call__(self) -> str:
        return f"salt{next(self.numbers)}"


@pytest.fixture(autouse=True)
def salts(monkeypatch: pytest.MonkeyPatch) -> Salts:
    """Salts and the clocks of the task and file rows made repeatable."""
    made = Salts()
    for module in (tasks, files, writes):
        monkeypatch.setattr(module, "new_salt", made)
    clock = types.SimpleNamespace(time=lambda: 1_700_000_000.25)
    monkeypatch.setattr(tasks, "time", clock)
    monkeypatch.setattr(filerows, "time", clock)
    return made


def _rows(services: Services) -> dict[str, list[list[tuple[str, Any]]]]:
    """Every row of the tables a Run writes, each value with its type."""
    with sqlite3.connect(services.settings.data_dir / "dreamserve.db") as db:
        return {
            table: [[(type(value).__name__, value) for value in row] for row in db.execute(f"SELECT * FROM {table}")]
            for table in TABLES
        }


def _inputs(services: Services) -> list[File]:
    meta = FileMeta(width=64, height=48)
    return [input_row(1, "folder", position, "png", 100 + position, meta) for position in range(2)]


async def _create(services: Services, index: int, *, inputs: bool = False, quota: Quota | None = None) -> Task:
    refs = (StoredReference(blob_key="inputs/folder/inputImage-0.png"),) if inputs else ()
    job = TaskJob(prompt=f"p{index}", width=64, height=48, num_images=1 + index % 2, seed=index, references=refs)
    return await services.store.create(
        project_id=1,
        model=MODEL,
        job=job,
        callback_url="" if index % 2 else "https://example.com/hook",
        callback_events=("start", "completed"),
        priority=index % 3,
        inputs=_inputs(services) if inputs else [],
        quota=quota,
        refused_callback=("not a url", "callbackUrl is not a URL") if index == 2 else None,
    )


def _state(task: Task) -> dict[str, Any]:
    state = inspect(task)
    assert state.detached
    return {column.key: getattr(task, column.key) for column in Task.__table__.columns}


async def test_the_direct_path_writes_the_orms_rows_column_by_column(
    both: tuple[Services, Services], salts: Salts
) -> None:
    made: list[list[Task]] = []
    for services in both:
        salts.restart()
        made.append([await _create(services, index, inputs=index == 1, quota=Quota(10, 1000)) for index in range(4)])
    orm, direct = (_rows(services) for services in both)
    assert orm["tasks"] and orm["files"] and orm["webhook_deliveries"] and orm["queue_counts"]
    for table in TABLES:
        assert direct[table] == orm[table], table
    for by_orm, by_direct in zip(*made, strict=True):
        assert _state(by_direct) == _state(by_orm)
        assert both[1].keys.token(by_direct) == both[0].keys.token(by_orm)


async def test_the_task_quota_refuses_alike_and_stores_nothing(both: tuple[Services, Services], salts: Salts) -> None:
    refusals: list[list[str]] = []
    for services in both:
        salts.restart()
        await _create(services, 0, quota=Quota(max_tasks=1))
        said = []
        for quota in (Quota(max_tasks=1), Quota(max_megapixels=0.001)):
            with pytest.raises(QuotaExceeded) as refused:
                await _create(services, 1, quota=quota)
            assert refused.value.code == 96
            said.append(refused.value.message)
        refusals.append(said)
    assert refusals[0] == refusals[1]
    orm, direct = (_rows(services) for services in both)
    assert direct == orm
    assert len(orm["tasks"]) == 1
    assert [value for _, value in orm["projects"][0][-2:]] == [1, 64 * 48]  # the refused counted nothing


async def test_the_storage_quota_refuses_alike_and_stores_nothing(
    both: tuple[Services, Services], salts: Salts
) -> None:
    refusals = []
    for services in both:
        salts.restart()
        for quota in (StorageQuota(max_files=1), StorageQuota(max_bytes=150)):
            services.store.storage = quota
            with pytest.raises(StorageFull) as refused:
                await _create(services, 1, inputs=True)
            refusals.append(refused.value.message)
        services.store.storage = StorageQuota(max_files=2)
        await _create(services, 3, inputs=True)  # exactly at the cap: stored
    assert refusals[:2] == refusals[2:]
    orm, direct = (_rows(services) for services in both)
    assert direct == orm
    assert len(orm["tasks"]) == 1 and len(orm["files"]) == 2


async def test_a_failed_write_rolls_back_and_passes_the_turn_on(both: tuple[Services, Services]) -> None:
    _, services = both
    writer = services.store.writes
    assert writer is not None

    def broken(connection: Any) -> None:
        connection.execute("UPDATE projects SET name = 'changed'")
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        await writer.transaction(broken)
    task = await _create(services, 0)  # the next writer's turn came
    assert task.id == 1
    assert _rows(services)["projects"][0][1] == ("str", "p")


async def test_concurrent_runs_share_turns_and_are_each_counted_alone(both: tuple[Services, Services]) -> None:
    """Runs arriving together are written in fewer transactions than Runs (group commit), each in its savepoint:
    a cap of 6 queues exactly 6 of 10, the 4 refused leave no row and count nothing."""
    _, services = both
    writer = services.store.writes
    assert writer is not None
    turns = 0
    transaction = writer.transaction

    async def counted(write: Any) -> Any:
        nonlocal turns
        turns += 1
        return await transaction(write)

    writer.transaction = counted  # type: ignore[method-assign]
    outcomes = await asyncio.gather(
        *(_create(services, 0, quota=Quota(max_tasks=6)) for _ in range(10)), return_exceptions=True
    )
    refused = [outcome for outcome in outcomes if isinstance(outcome, QuotaExceeded)]
    made = [outcome for outcome in outcomes if isinstance(outcome, Task)]
    assert len(made) == 6 and len(refused) == 4
    assert sorted(task.id for task in made) == list(range(1, 7))
    assert 1 <= turns < 10
    rows = _rows(services)
    assert len(rows["tasks"]) == 6 and len(rows["task_events"]) == 6
    assert [value for _, value in rows["projects"][0][-2:]] == [6, 6 * 64 * 48]


async def test_a_run_cancelled_before_its_batch_is_taken_is_never_written(both: tuple[Services, Services]) -> None:
    """A Run waits for the batch being written to end; cancelled meanwhile (the server stopping), it is dropped
    from the next batch, so nothing of it is stored (its caller deletes its input blobs)."""
    _, services = both
    writer = services.store.writes
    assert writer is not None
    release = asyncio.Event()
    transaction = writer.transaction

    async def held(write: Any) -> Any:
        await release.wait()
        return await transaction(write)

    writer.transaction = held  # type: ignore[method-assign]
    first = asyncio.create_task(_create(services, 0))
    await asyncio.sleep(0.05)  # its batch taken and held
    second = asyncio.create_task(_create(services, 1))
    await asyncio.sleep(0.05)  # waiting for the next batch
    second.cancel()
    release.set()
    assert (await first).id == 1
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.sleep(0.05)
    rows = _rows(services)
    assert len(rows["tasks"]) == 1 and len(rows["task_events"]) == 1
    assert [value for _, value in rows["projects"][0][-2:]] == [1, 64 * 48]
