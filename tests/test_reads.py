"""The direct reads (``queue/reads.py``) on a real SQLite file: for every task state they load what the async
session loads (every column, the records, the files, the queue position), a read that runs too long or finds no
database falls back to the async path with the same answer, and a server database has no direct path."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, inspect, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from dreamserve.auth import lookup_project
from dreamserve.facts import Progress, TaskDetails
from dreamserve.jobs import TaskJob
from dreamserve.projects import add_project, find_project
from dreamserve.queue.base import Fallback
from dreamserve.queue.db import (
    QUEUE_BUCKET_BITS,
    File,
    Project,
    QueueCount,
    Task,
    TaskEvent,
    make_engine,
    make_sessionmaker,
)
from dreamserve.queue.keyring import digest
from dreamserve.queue.migrate import upgrade
from dreamserve.queue.reads import COUNT_TRIGGERS, Reads
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import FileRole, TaskStatus

MODEL = "bytedance/seedream-v4"


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)})
    services = Services(settings, workers="none")
    await upgrade(services.engine)
    yield services
    await services.engine.dispose()


def _columns(row: Task | File | Project) -> dict[str, Any]:
    return {attr.key: getattr(row, attr.key) for attr in inspect(type(row)).column_attrs}


def _file(task: Task, role: FileRole, position: int) -> File:
    return File(
        project_id=task.project_id,
        task_id=task.id,
        role=role,
        position=position,
        name=f"{role}-{position}.png",
        contenttype="image/png",
        size=10 + position,
        blob_key=f"{role}/{task.id}/{position}.png",
        meta={"seed": 7 + position, "width": 64, "height": 64},
        created=time.time(),
    )


async def _seed(services: Services) -> tuple[int, list[int]]:
    """Two projects; a task of the first in every state (with files and progress), and queued ones of both at two
    priorities, one still fetching its inputs."""
    store = services.store
    first = await add_project(services.sessions, services.keys, "a", signature=True)
    second = await add_project(services.sessions, services.keys, "b", signature=False)
    ids = []
    for number in range(12):
        project = first if number % 3 else second
        job = TaskJob(prompt=f"p {number}", width=64, height=64, num_images=1, seed=number, asked_size="64x64")
        task = await store.create(
            project_id=project.project_id, model=MODEL, job=job, callback_url="", priority=number % 2, inputs=[]
        )
        ids.append(task.id)
    statuses = [status for status in TaskStatus if status != TaskStatus.QUEUE]
    async with services.sessions.begin() as session:
        for task_id, status in zip(ids, statuses, strict=False):
            values: dict[str, Any] = {"status": status, "starttime": time.time(), "attempts": 1}
            values["progress"] = Progress(step=2, total=4, elapsed=0.5)
            values["details"] = TaskDetails(method="t2i", seeds=[3])
            await session.execute(update(Task).where(Task.id == task_id).values(**values))
        await session.execute(update(Task).where(Task.id == ids[-1]).values(inputs_ready=False))
    async with services.sessions.begin() as session:
        for task_id in ids[:4]:
            task = await session.get(Task, task_id)
            assert task is not None
            for position, role in enumerate((FileRole.OUTPUT, FileRole.INPUT, FileRole.PARTIAL, FileRole.OUTPUT)):
                session.add(_file(task, role, position))
    return first.project_id, ids


async def _async_answers(services: Services, task_id: int, project_id: int) -> dict[str, Any]:
    store, reads = services.store, services.store.reads
    store.reads = None
    try:
        return await _answers(services, task_id, project_id)
    finally:
        store.reads = reads


async def _answers(services: Services, task_id: int, project_id: int) -> dict[str, Any]:
    store = services.store
    by_id = await store.get_by_id(task_id)
    assert by_id is not None
    token = services.keys.token(by_id)
    own = await store.get(project_id=by_id.project_id, taskid=task_id)
    by_token = await store.get(project_id=by_id.project_id, token=token)
    other = await store.get(project_id=by_id.project_id + 100, taskid=task_id)
    files = await store.files([task_id], (FileRole.OUTPUT, FileRole.INPUT))
    partial = await store.files([task_id], FileRole.PARTIAL)
    assert own is not None and by_token is not None
    return {
        "by_id": _columns(by_id),
        "own": _columns(own),
        "by_token": _columns(by_token),
        "by_bare_token": _columns(await store.get_by_token(token) or by_id),
        "other_project": other,
        "files": [_columns(f) for f in files[task_id]],
        "partial": [_columns(f) for f in partial[task_id]],
        "position": await store.queue_position(by_id),
        "events": await store.events(task_id),
        "events_after": await store.events(task_id, after=1),
    }


async def test_direct_reads_agree_with_the_sessions_for_every_state(services: Services) -> None:
    project_id, ids = await _seed(services)
    reads = services.store.reads
    assert reads is not None
    seen = set()
    for task_id in ids:
        direct = await _answers(services, task_id, project_id)
        assert direct == await _async_answers(services, task_id, project_id)
        seen.add(direct["by_id"]["status"])
        # Loaded as a closed session leaves a row: records, enums and booleans typed, detached with its identity.
        task = reads.task(task_id)
        assert task is not None and inspect(task).detached
        assert isinstance(task.details, TaskDetails) and isinstance(task.inputs_ready, bool)
    assert seen == set(TaskStatus)
    positions = [(await _answers(services, i, project_id))["position"] for i in ids]
    assert positions[-1] > 0 and len(set(positions)) > 1  # the counts are not all one value
    files = reads.task_files(ids[0], (FileRole.OUTPUT, FileRole.INPUT))
    assert [f.role for f in files] == [FileRole.OUTPUT, FileRole.INPUT, FileRole.OUTPUT]
    assert all(isinstance(f.role, FileRole) and f.meta.seed is not None for f in files)
    assert reads.task(10**9) is None and reads.task(ids[0], project_id + 100) is None


async def test_a_detached_row_of_the_direct_path_updates_its_row_when_added(services: Services) -> None:
    _, ids = await _seed(services)
    reads = services.store.reads
    assert reads is not None
    task = reads.task(ids[0])
    assert task is not None
    async with services.sessions.begin() as session:
        session.add(task)  # an update of its row, never an insert of a second one
        task.debugoutput = "changed"
    fresh = await services.store.get_by_id(ids[0])
    assert fresh is not None and fresh.debugoutput == "changed"


async def test_the_project_of_a_key_is_read_directly_and_revoked_ones_are_unknown(services: Services) -> None:
    creds = await add_project(services.sessions, services.keys, "k", signature=True)
    reads = services.store.reads
    direct = await lookup_project(services.sessions, reads, creds.api_key)
    through_session = await find_project(services.sessions, creds.api_key)
    assert direct is not None and through_session is not None
    assert _columns(direct) == _columns(through_session)
    async with services.sessions.begin() as session:
        await session.execute(update(Project).where(Project.id == creds.project_id).values(revoked=True))
    assert await lookup_project(services.sessions, reads, creds.api_key) is None
    assert await lookup_project(services.sessions, reads, "no such key") is None


async def test_a_read_past_its_steps_falls_back_to_the_async_path(services: Services) -> None:
    project_id, ids = await _seed(services)
    queued = ids[-2]
    expected = await _async_answers(services, queued, project_id)
    assert services.store.reads is not None
    slow = Reads(str(services.settings.data_dir / "dreamserve.db"), services.engine.dialect, max_steps=5, every=1)
    task = await services.store.get_by_id(queued)
    assert task is not None
    with pytest.raises(Fallback):
        slow.queue_position(task)
    with pytest.raises(Fallback):
        slow.task(queued)
    services.store.reads = slow
    assert await _answers(services, queued, project_id) == expected


async def test_no_database_yet_falls_back_and_a_server_database_has_no_direct_path(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'later.db'}", 1)
    reads = Reads.of(make_sessionmaker(engine))
    assert reads is not None
    with pytest.raises(Fallback):
        reads.task(1)  # the file does not exist: the async path answers (and creates it)
    await upgrade(engine)
    assert reads.project(digest("x")) is None  # a fresh connection once it does
    await engine.dispose()
    postgres = make_engine("postgresql+asyncpg://u:p@127.0.0.1:1/db", 1)
    assert Reads.of(make_sessionmaker(postgres)) is None
    memory = create_async_engine("sqlite+aiosqlite://")
    assert Reads.of(make_sessionmaker(memory)) is None


async def _recount(services: Services) -> list[tuple[Any, ...]]:
    """``queue_counts`` as it must be: the claimable tasks grouped by model, priority, project and bucket."""
    bucket = Task.id.op(">>")(QUEUE_BUCKET_BITS)
    query = (
        select(Task.model, Task.priority, Task.project_id, bucket, func.count())
        .where(Task.status == TaskStatus.QUEUE, Task.inputs_ready.is_(True))
        .group_by(Task.model, Task.priority, Task.project_id, bucket)
    )
    kept = select(QueueCount.model, QueueCount.priority, QueueCount.project_id, QueueCount.bucket, QueueCount.queued)
    async with services.sessions() as session:
        expected = sorted(tuple(row) for row in (await session.execute(query)).all())
        assert sorted(tuple(row) for row in (await session.execute(kept)).all()) == expected
    return expected


async def test_positions_from_the_counts_equal_the_index_counts_through_claims_cancels_and_requeues(
    services: Services,
) -> None:
    """Three projects at two priorities over several buckets of ids, their claim clocks tied and not; after each
    round of claims, cancels, requeues, inputs going unready and back, and deleted rows, the maintained counts equal
    a recount and every queued task's position equals the one counted on the claim index."""
    store = services.store
    rng = random.Random(27)
    projects = [await add_project(services.sessions, services.keys, f"p{n}", signature=False) for n in range(3)]
    ids = []
    for number in range(700):
        project = projects[rng.choice((0, 0, 0, 1, 1, 2))].project_id
        job = TaskJob(prompt=f"p {number}", width=64, height=64, num_images=1, seed=number, asked_size="64x64")
        task = await store.create(
            project_id=project, model=MODEL, job=job, callback_url="", priority=rng.choice((0, 0, 1)), inputs=[]
        )
        ids.append(task.id)
    assert ids[-1] >> QUEUE_BUCKET_BITS >= 2
    for round_ in range(4):
        for _ in range(15):
            assert await store.claim_next("w:1", [MODEL], 60) is not None
        async with services.sessions.begin() as session:
            clocks = {p.project_id: rng.choice((0.0, 5.0, float(round_))) for p in projects}
            for project_id, clock in clocks.items():
                await session.execute(update(Project).where(Project.id == project_id).values(last_claimed=clock))
            picked = rng.sample(ids, 30)
            await session.execute(update(Task).where(Task.id.in_(picked[:10])).values(inputs_ready=False))
            await session.execute(update(Task).where(Task.id.in_(picked[10:15])).values(inputs_ready=True))
            await session.execute(update(Task).where(Task.id.in_(picked[15:18])).values(priority=2))
            await session.execute(delete(TaskEvent).where(TaskEvent.task_id.in_(picked[18:20])))
            await session.execute(delete(Task).where(Task.id.in_(picked[18:20])))
        ids = [i for i in ids if i not in picked[18:20]]
        for task_id in picked[20:25]:
            await store.cancel_queued(task_id)
        claimed = await store.claim_next("w:2", [MODEL], 60)
        assert claimed is not None and await store.start(claimed.id, "w:2")
        assert await store.progress(claimed.id, "w:2", Progress(step=1, total=4, elapsed=0.1))
        assert await store.requeue(claimed.id, "lost", "w:2")
        direct_events = await store.events(claimed.id)
        store.reads, reads_before = None, store.reads
        try:
            assert direct_events == await store.events(claimed.id)
        finally:
            store.reads = reads_before
        assert any(isinstance(event.message, Progress) for event in direct_events)
        await _recount(services)
        reads = store.reads
        assert reads is not None
        for task_id in ids[::7]:
            task = reads.task(task_id)
            assert task is not None
            direct = reads.queue_position(task)
            store.reads = None
            try:
                assert direct == await store.queue_position(task), (round_, task_id)
            finally:
                store.reads = reads


@pytest.mark.skipif(not os.environ.get("DREAMSERVE_TEST_POSTGRES"), reason="needs scripts/scaleout-env")
async def test_postgres_keeps_the_session_path(tmp_path: Path) -> None:
    url = os.environ["DREAMSERVE_TEST_POSTGRES"]
    services = Services(Settings(data_dir=tmp_path, database_url=url, models={MODEL: ModelSpec(workers=0)}), "none")
    try:
        assert services.store.reads is None
        await upgrade(services.engine)
        creds = await add_project(services.sessions, services.keys, "pg", signature=True)
        model = f"test/reads-{secrets.token_hex(4)}"  # its own queue in a shared database
        job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1, asked_size="64x64")
        ids = [
            (
                await services.store.create(
                    project_id=creds.project_id, model=model, job=job, callback_url="", priority=0, inputs=[]
                )
            ).id
            for _ in range(3)
        ]
        task = await services.store.get(project_id=creds.project_id, taskid=ids[2])
        assert task is not None and task.status == TaskStatus.QUEUE
        assert await services.store.queue_position(task) == 2
        project = await lookup_project(services.sessions, services.store.reads, creds.api_key)
        assert project is not None and project.id == creds.project_id
    finally:
        await services.engine.dispose()


async def test_positions_leave_the_counts_when_a_trigger_is_missing(services: Services) -> None:
    """A migration that rebuilds ``tasks`` (Alembic's batch mode on SQLite) drops its triggers: the counts would go
    stale, so the direct path stops reading them and the claim index answers, until they are back."""
    project_id, ids = await _seed(services)
    reads = services.store.reads
    assert reads is not None
    task = reads.task(ids[-2])
    assert task is not None and task.status == TaskStatus.QUEUE
    expected = reads.queue_position(task)
    async with services.engine.begin() as connection:
        names = [
            row[0] for row in await connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        ]
        assert sorted(names) == sorted(COUNT_TRIGGERS)
        await connection.exec_driver_sql("DROP TRIGGER tr_queue_counts_leave")
    fresh = Reads(str(services.settings.data_dir / "dreamserve.db"), services.engine.dialect)
    with pytest.raises(Fallback):
        fresh.queue_position(task)
    services.store.reads = fresh
    assert await services.store.queue_position(task) == expected  # from the claim index


async def test_a_process_whose_first_database_use_is_a_direct_read(services: Services) -> None:
    """No query has configured the mappers there: the direct read configures them before making instances."""
    _, ids = await _seed(services)
    path = services.settings.data_dir / "dreamserve.db"
    script = (
        "import sys\nfrom dreamserve.queue.db import make_engine\nfrom dreamserve.queue.reads import Reads\n"
        f"reads = Reads({str(path)!r}, make_engine('sqlite+aiosqlite:///{path}', 1).dialect)\n"
        f"task = reads.task({ids[0]})\nprint(task.id, task.status, task.details.method)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ids[0]), "task_accept", "t2i"]
