"""The queue's named transitions on a real SQLite database and blob store, in process: the stored job and its
older shape, a re-queue that removes the dead attempt's images, and a failure that ends the task once."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dreamserve.jobs import StoredReference, TaskJob
from dreamserve.queue.db import File, Project, Task, TaskEvent, WebhookDelivery
from dreamserve.queue.migrate import upgrade
from dreamserve.queue.store import TaskStore
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import Pexit, TaskStatus

MODEL = "bytedance/seedream-v4"
WORKER = "test-host:1:model:0"


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    """The store of a process that runs no loops: the test plays the worker."""
    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)})
    services = Services(settings, workers="none")
    await upgrade(services.engine)
    async with services.sessions.begin() as session:
        session.add(Project(id=1, name="p", api_key_hash="h", api_key_prefix="k", created=0.0))
    yield services
    await services.engine.dispose()


async def _queue(store: TaskStore, job: TaskJob, callback_url: str = "") -> Task:
    return await store.create(
        project_id=1,
        model=MODEL,
        job=job,
        callback_url=callback_url,
        priority=0,
        inputs=[],
    )


def _partial(task: Task, index: int, folder: str) -> File:
    return File(
        project_id=task.project_id,
        task_id=task.id,
        role="partial",
        position=index,
        name=f"{index}.png",
        contenttype="image/png",
        size=5,
        blob_key=f"outputs/{folder}/{index}.png",
        meta={"seed": 1 + index, "width": 64, "height": 64},
        created=time.time(),
    )


async def _types(store: TaskStore, task_id: int) -> list[str]:
    return [event.type for event in await store.events(task_id)]


async def test_a_job_stored_in_the_older_shape_loads_and_is_written_back_in_the_new_one(services: Services) -> None:
    """Rows queued before ``TaskJob`` named the references ``inputs`` and had no format or notes."""
    old = {"prompt": "p", "width": 96, "height": 64, "num_images": 2, "seed": 5, "watermark": True}
    old["inputs"] = [{"url": "https://example.com/a.png"}, {"blob_key": "inputs/f/inputImage-1.png"}]
    async with services.sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO tasks (id, project_id, model, status, priority, parameters, job, width, height,"
                " num_images, has_inputs, inputs_ready, callback_url, callback_events, pexit, debugoutput,"
                " debugerror, details, createtime, attempts, stop_requested) VALUES (7, 1, :model, 'task_queue', 0,"
                " '{}', :job, 96, 64, 2, 1, 0, '', '[]', '', '', '', '{}', 0, 0, '')"
            ),
            {"model": MODEL, "job": json.dumps(old)},
        )
    [task] = await services.store.claim_inputs(1, {}, 1, 60.0)
    job = task.read_job()
    assert job.references == (
        StoredReference(url="https://example.com/a.png"),
        StoredReference(blob_key="inputs/f/inputImage-1.png"),
    )
    assert (job.output_format, job.notes, job.output_size, job.watermark) == ("png", (), None, True)
    assert not job.inputs_ready and job.work == 2 * 96 * 64 and job.size == (96, 64)

    fetched = (StoredReference(blob_key="inputs/g/inputImage-0.png", url=job.references[0].url), job.references[1])
    staged = job.model_copy(update={"references": fetched, "fetch_seconds": 0.25})
    assert await services.store.stage_inputs(task.id, staged, [])
    stored = (await services.store.get_by_id(task.id)) or task
    assert "inputs" not in stored.job and stored.job["references"][0]["blob_key"] == "inputs/g/inputImage-0.png"
    assert stored.read_job() == staged and stored.read_job().inputs_ready


async def test_a_requeue_removes_the_dead_attempts_images_rows_and_bytes(services: Services) -> None:
    store, blobs = services.store, services.blobs
    task = await _queue(store, TaskJob(prompt="p", width=64, height=64, num_images=2, seed=1))
    claimed = await store.claim_next(WORKER, [MODEL], 30.0)
    assert claimed is not None and claimed.id == task.id
    assert await store.assign(task.id, WORKER) and await store.start(task.id, WORKER)
    first = _partial(task, 0, "attempt-1")
    blobs.put(first.blob_key, b"first")
    assert await store.image_saved(task.id, WORKER, first)
    assert [f.name for f in (await store.files([task.id], "partial"))[task.id]] == ["0.png"]

    # The model process died (or the lease ran out): the reaper gives the task back to the queue.
    assert await store.reap(lambda worker: False, max_attempts=3) == [task.id]
    requeued = await store.get_by_id(task.id)
    assert requeued is not None and requeued.status == TaskStatus.QUEUE and requeued.worker_id is None
    assert "was lost during attempt 1" in requeued.debugerror
    assert (await store.files([task.id], "partial"))[task.id] == []
    with pytest.raises(FileNotFoundError):
        blobs.read(first.blob_key)
    # The dead worker's late report changes nothing: the task is not its own any more.
    assert not await store.image_saved(task.id, WORKER, _partial(task, 1, "attempt-1"))

    # The next attempt's images are the task's only outputs.
    again = await store.claim_next("other-worker", [MODEL], 30.0)
    assert again is not None and again.attempts == 2
    outputs = [_partial(task, index, "attempt-2") for index in (0, 1)]
    for file in outputs:
        blobs.put(file.blob_key, b"second")
        assert await store.image_saved(task.id, "other-worker", file)
        file.role = "output"
    assert await store.begin_postprocess(task.id, "other-worker", "step 1/1")
    assert await store.succeed(task.id, "other-worker", outputs, "step 1/1", {"seeds": [1, 2]})
    rows = (await store.files([task.id], "output"))[task.id]
    assert [(f.name, f.blob_key) for f in rows] == [
        ("0.png", "outputs/attempt-2/0.png"),
        ("1.png", "outputs/attempt-2/1.png"),
    ]
    assert (await store.files([task.id], "partial"))[task.id] == []
    types = await _types(store, task.id)
    assert types.count(TaskStatus.QUEUE) == 2 and types[-1] == TaskStatus.POSTPROCESS_END


async def test_an_attempt_that_was_not_the_tasks_own_does_not_count(services: Services) -> None:
    """DREAMSERVE_SLOW's chaos run: a task re-queued because the model process was gone before the task reached
    it was claimed again with its attempt still counted, and a server kill later left it at 3 of 2 attempts."""
    store = services.store
    task = await _queue(store, TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1))
    claimed = await store.claim_next(WORKER, [MODEL], 30.0)
    assert claimed is not None and claimed.attempts == 1
    assert await store.requeue(task.id, "Re-queued: the model process had exited.\n", WORKER, refund=True)
    again = await store.claim_next(WORKER, [MODEL], 30.0)
    assert again is not None and again.attempts == 1, "the attempt given back is not counted"

    # A lost worker's attempt counts: at max_attempts the reaper fails the task instead of re-queuing it.
    assert await store.reap(lambda worker: False, max_attempts=2) == [task.id]
    third = await store.claim_next(WORKER, [MODEL], 30.0)
    assert third is not None and third.attempts == 2
    assert await store.reap(lambda worker: False, max_attempts=2) == [task.id]
    ended = await store.get_by_id(task.id)
    assert ended is not None and ended.status == TaskStatus.POSTPROCESS_END and ended.attempts == 2
    assert "attempt 2 of 2" in ended.debugerror


async def test_a_failure_ends_the_task_once_in_wiros_order(services: Services) -> None:
    """Failing while the images are saved: the statuses it passed are not written again, one callback."""
    store = services.store
    job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1)
    task = await _queue(store, job, callback_url="https://example.com/hook")
    assert await store.claim_next(WORKER, [MODEL], 30.0) is not None
    assert await store.begin_postprocess(task.id, WORKER, "")
    assert await store.fail(task.id, Pexit.FAILED, "It broke.", worker_id=WORKER)
    assert not await store.fail(task.id, Pexit.FAILED, "Again.", worker_id=WORKER), "ended already"
    assert await _types(store, task.id) == [
        "task_queue",
        "task_accept",
        "task_output_full",
        "task_end",
        "task_postprocess_start",
        "task_error",
        "task_output_full",
        "task_error_full",
        "task_postprocess_end",
    ]
    ended = await store.get_by_id(task.id)
    assert ended is not None and (ended.status, ended.pexit, ended.debugerror) == (
        "task_postprocess_end",
        "1",
        "It broke.",
    )
    async with services.sessions() as session:
        hooks = (await session.execute(select(WebhookDelivery.event).where(WebhookDelivery.task_id == task.id))).all()
        events = (await session.execute(select(TaskEvent.id).where(TaskEvent.task_id == task.id))).all()
    assert [hook for (hook,) in hooks] == ["completed"] and len(events) == 9


async def _counters(services: Services) -> tuple[tuple[int, int], tuple[int, int]]:
    """The project's kept counters, and the sums over its unfinished tasks they stand for."""
    from sqlalchemy import func

    from dreamserve.status import FINAL

    async with services.sessions() as session:
        kept = (await session.execute(select(Project.unfinished_tasks, Project.unfinished_pixels))).one()
        work = func.coalesce(func.sum(Task.num_images * Task.width * Task.height), 0)
        unfinished = select(func.count(Task.id), work).where(Task.status.not_in(sorted(FINAL)))
        summed = (await session.execute(unfinished)).one()
    return (int(kept[0]), int(kept[1])), (int(summed[0]), int(summed[1]))


async def test_the_unfinished_counters_follow_every_way_a_task_ends(services: Services) -> None:
    """Issue 27: a Run's quota check read a sum over the project's unfinished tasks (its whole backlog). The counters
    the project's row keeps instead are what the sum was after creates, a cancel while queued, a cancel and a
    failure while running, a re-queue, and a success, and a task that is ended twice is taken off them once."""
    from dreamserve.errors import QuotaExceeded
    from dreamserve.facts import TaskDetails
    from dreamserve.queue.store import Quota
    from dreamserve.status import StopKind

    store = services.store
    jobs = [TaskJob(prompt=f"{n}", width=64 * (n + 1), height=64, num_images=n + 1, seed=1) for n in range(6)]
    tasks = [await _queue(store, job) for job in jobs]
    kept, summed = await _counters(services)
    assert kept == summed == (6, sum(job.work for job in jobs))

    assert await store.cancel_queued(tasks[0].id) is not None
    for _ in range(4):
        claimed = await store.claim_next(WORKER, [MODEL], 30.0)
        assert claimed is not None
    assert await store.cancel(tasks[1].id, StopKind.KILL, WORKER)
    assert await store.fail(tasks[2].id, Pexit.FAILED, "broke", worker_id=WORKER)
    assert not await store.fail(tasks[2].id, Pexit.FAILED, "again", worker_id=WORKER)  # ended once
    assert await store.requeue(tasks[3].id, "lost", WORKER)
    assert await store.succeed(tasks[4].id, WORKER, [], "", TaskDetails())
    kept, summed = await _counters(services)
    assert kept == summed == (2, jobs[3].work + jobs[5].work)

    # As strict as the sum: at the cap the next task is refused (and not counted), after an end it is accepted.
    quota = Quota(max_tasks=3)
    await store.create(project_id=1, model=MODEL, job=jobs[0], callback_url="", priority=0, inputs=[], quota=quota)
    with pytest.raises(QuotaExceeded, match="has 3 unfinished tasks and may have 3"):
        await store.create(project_id=1, model=MODEL, job=jobs[0], callback_url="", priority=0, inputs=[], quota=quota)
    assert (await _counters(services))[0] == (3, jobs[0].work + jobs[3].work + jobs[5].work)
    assert await store.cancel_queued(tasks[5].id) is not None
    await store.create(project_id=1, model=MODEL, job=jobs[0], callback_url="", priority=0, inputs=[], quota=quota)
    pixels = Quota(max_megapixels=(jobs[0].work * 3 + jobs[3].work - 1) / 1e6)  # one pixel short
    with pytest.raises(QuotaExceeded, match="max_queued_megapixels"):
        await store.create(project_id=1, model=MODEL, job=jobs[0], callback_url="", priority=0, inputs=[], quota=pixels)
    kept, summed = await _counters(services)
    assert kept == summed == (3, 2 * jobs[0].work + jobs[3].work)


async def test_concurrent_runs_of_one_project_fill_its_quota_exactly(services: Services) -> None:
    """40 Runs at once against a cap of 25: exactly 25 are queued, the others refused."""
    import asyncio

    from dreamserve.errors import QuotaExceeded
    from dreamserve.queue.store import Quota

    job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1)

    async def run() -> bool:
        try:
            await services.store.create(
                project_id=1, model=MODEL, job=job, callback_url="", priority=0, inputs=[], quota=Quota(max_tasks=25)
            )
        except QuotaExceeded:
            return False
        return True

    accepted = await asyncio.gather(*(run() for _ in range(40)))
    assert sum(accepted) == 25
    kept, summed = await _counters(services)
    assert kept == summed == (25, 25 * job.work)
