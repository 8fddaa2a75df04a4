"""The database engine (``queue/db.make_engine``) on SQLite on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from dreamserve.queue.db import make_engine, make_sessionmaker

POOL = 6


async def test_a_busy_api_keeps_its_connections_instead_of_opening_new_ones(tmp_path: Path) -> None:
    """SQLAlchemy's default pool (5, and 10 more closed on their return) opened a connection, and with aiosqlite a
    thread, for nearly every request past the fifth at once: about 5 a second in the soak (issue 11). Now a burst
    opens at most ``pool_size`` connections, the next burst opens none, and nothing past the pool is opened: the
    others wait their turn."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=POOL)
    sessions = make_sessionmaker(engine)
    opened = 0
    busy = 0
    most_busy = 0

    @event.listens_for(engine.sync_engine, "connect")
    def count(*_: Any) -> None:
        nonlocal opened
        opened += 1

    async def request() -> None:
        nonlocal busy, most_busy
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            busy += 1
            most_busy = max(most_busy, busy)
            await asyncio.sleep(0.02)  # a request's other awaits, holding its connection
            busy -= 1

    try:
        await asyncio.gather(*(request() for _ in range(4 * POOL)))
        assert (opened, most_busy) == (POOL, POOL)
        await asyncio.gather(*(request() for _ in range(4 * POOL)))
        assert opened == POOL, f"the second burst opened {opened - POOL} connections"
    finally:
        await engine.dispose()


MODEL = "bytedance/seedream-v4"


async def _fleet_writes(tmp_path: Path, busy_ms: int | None, runs: int, workers: int, processes: int) -> None:
    """Runs, claims, transitions, heartbeats and callback bookkeeping (which reads its row before it writes) at
    once on one SQLite file, from ``processes`` sets of services (each its own engine and gate, as another process
    would have); ``busy_ms``: each connection of the first waits that long for the lock (a loaded machine's
    queue of writers, in miniature). Asserts no error, no task lost, every task run once and ended."""
    from sqlalchemy import func, select

    from dreamserve.facts import Progress, TaskDetails
    from dreamserve.jobs import TaskJob
    from dreamserve.queue.db import Project, Task, TaskEvent, WebhookDelivery
    from dreamserve.queue.migrate import upgrade
    from dreamserve.queue.store import Quota
    from dreamserve.services import Services
    from dreamserve.settings import ModelSpec, Settings
    from dreamserve.status import DeliveryState, TaskStatus
    from dreamserve.webhooks import _attempt

    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)}, database_pool_size=8)
    every = [Services(settings, workers="none") for _ in range(processes)]
    api = every[0]
    await upgrade(api.engine)
    if busy_ms is not None:

        @event.listens_for(api.engine.sync_engine, "connect")
        def _short_wait(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        await api.engine.dispose()  # the connections made so far waited longer
    async with api.sessions.begin() as session:
        session.add(Project(id=1, name="p", api_key_hash="h", api_key_prefix="k", created=0.0))
    job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1)
    quota = Quota(max_tasks=10 * runs, max_megapixels=1e6)

    async def run(services: Services) -> int:
        store = services.store
        task = await store.create(
            project_id=1, model=MODEL, job=job, callback_url="http://127.0.0.1:9/", priority=0, inputs=[], quota=quota
        )
        return task.id

    async def worker(services: Services, number: int) -> int:
        done, name, store = 0, f"host:1:model:{number}", services.store
        while (task := await store.claim_next(name, [MODEL], 60)) is not None:
            assert await store.assign(task.id, name) and await store.start(task.id, name)
            for step in range(1, 5):
                assert await store.progress(task.id, name, Progress(step=step, total=4, elapsed=0.1 * step))
                assert (await store.heartbeat(task.id, name, 60)).held
            assert await store.begin_postprocess(task.id, name, "")
            assert await store.succeed(task.id, name, [], "", TaskDetails())
            done += 1
        return done

    async def sender(services: Services, until: asyncio.Event) -> int:
        """The webhook sender's bookkeeping of each delivery (no format is given, so each attempt fails at once)."""
        attempts = 0
        pending = select(WebhookDelivery).where(WebhookDelivery.state == DeliveryState.PENDING).limit(8)
        while not until.is_set():
            async with services.sessions() as session:
                rows = list((await session.execute(pending)).scalars())
            await asyncio.gather(*(_attempt(services.sessions, settings, services.keys, {}, row) for row in rows))
            attempts += len(rows)
            await asyncio.sleep(0)
        return attempts

    def each(number: int) -> Services:
        return every[number % processes]

    try:
        ids = await asyncio.gather(*(run(each(n)) for n in range(runs)))
        working = asyncio.Event()
        senders = [asyncio.ensure_future(sender(each(n), working)) for n in range(4)]
        ended = await asyncio.gather(
            *(run(api) for _ in range(runs // 2)), *(worker(each(n), n) for n in range(workers))
        )
        working.set()
        assert sum(await asyncio.gather(*senders)) > 0, "no callback was attempted while the workers ran"
        ids += ended[: runs // 2]
        # Tasks queued while the last workers were leaving are run now.
        leftover = sum(await asyncio.gather(*(worker(api, n) for n in range(4))))
        assert sum(ended[runs // 2 :]) + leftover == len(ids) == len(set(ids)) == runs + runs // 2
        async with api.sessions() as session:
            statuses = dict((await session.execute(select(Task.status, func.count()).group_by(Task.status))).all())
            starts = select(func.count()).where(TaskEvent.type == TaskStatus.START)
            started = (await session.execute(starts)).scalar_one()
        assert statuses == {TaskStatus.POSTPROCESS_END: len(ids)}
        assert started == len(ids), "a task started twice, or a start was lost"
    finally:
        for services in every:
            await services.engine.dispose()


async def test_a_process_s_concurrent_writers_never_see_database_is_locked(tmp_path: Path) -> None:
    """Issue 27: under load, concurrent write transactions of one process raced for SQLite's one write lock, each
    connection polling for it in its busy handler, and some waited past busy_timeout (``database is locked``, a 5xx).
    Now a process's write transactions pass its gate one at a time, in arrival order, and none waits in the busy
    handler for another of its own: with a busy_timeout of 100 ms (where the racing writers failed within a
    second) none fails. What races is the 12 workers and 4 senders at once, not the count of tasks: without the
    gate the first burst of Runs fails in half a second, so 24 Runs (36 tasks, 3 each) prove what 60 did."""
    await _fleet_writes(tmp_path, busy_ms=100, runs=24, workers=12, processes=1)


async def test_writers_of_two_processes_wait_for_each_other_on_one_sqlite_file(tmp_path: Path) -> None:
    """Each write transaction takes the lock up front (``BEGIN IMMEDIATE``), so the writers of another process (here
    a second set of services with a gate of its own) are waited for within the busy_timeout. 16 Runs (24 tasks,
    3 for each of the 8 workers) keep both processes' writers overlapping: with no busy_timeout the first burst
    already fails, as it did with 40."""
    await _fleet_writes(tmp_path, busy_ms=None, runs=16, workers=8, processes=2)


async def test_a_write_transaction_inside_another_of_the_same_task_is_refused_not_a_deadlock(tmp_path: Path) -> None:
    """The gate is one lock per process: a nested write transaction would wait for itself for ever."""
    import pytest
    from sqlalchemy import text

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=2)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
        async with sessions.begin() as session:
            await session.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(RuntimeError, match="inside another"):
                async with sessions.begin():
                    pass
        async with sessions() as session:
            assert (await session.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_an_urgent_write_transaction_goes_before_the_others_waiting(tmp_path: Path) -> None:
    """A worker's claim (``Lane.CLAIM``) takes the next turn of the gate, ahead of writes queued before it; within
    a lane, arrival order."""
    from dreamserve.queue.db import Lane, begin_in

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=5)
    sessions = make_sessionmaker(engine)
    order: list[str] = []
    try:
        async with sessions.begin() as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
        holding, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with sessions.begin():
                holding.set()
                await release.wait()
            order.append("first")

        async def write(name: str, lane: Lane = Lane.OTHER) -> None:
            async with begin_in(sessions, lane):
                order.append(name)

        held = asyncio.create_task(first())
        await holding.wait()
        waiting = []
        for name, lane in (("plain 1", Lane.OTHER), ("plain 2", Lane.OTHER), ("claim", Lane.CLAIM)):
            waiting.append(asyncio.create_task(write(name, lane)))
            await asyncio.sleep(0.05)  # queued at the gate in this order
        release.set()
        await asyncio.gather(held, *waiting)
        assert order == ["first", "claim", "plain 1", "plain 2"]
    finally:
        await engine.dispose()
