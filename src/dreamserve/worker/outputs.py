"""What a running task leaves: its images as file rows (bytes in the blob store first) and the facts of a success
(``details``). Facts only: how a client sees them is its dialect's renderer's business."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dreamserve.blobs import BlobStore
from dreamserve.facts import FailedImage, FileMeta, StageTimings, TaskDetails
from dreamserve.jobs import GeneratedImage, GenerationResult
from dreamserve.queue.db import File, Task
from dreamserve.status import FileRole
from dreamserve.worker.running import RunningTask

#: What a succeeded task's details say of an image that could not be finished (the error id is in the log).
FAILED_IMAGE = "could not be finished (the server log has why)"


async def output_file(blobs: BlobStore, entry: RunningTask, image: GeneratedImage, role: FileRole) -> File:
    """The row of one saved image (``partial`` while the task runs, ``output`` at its end), its bytes stored first."""
    key = f"outputs/{entry.folder}/{image.name}"
    # Local store: the child wrote in place (put_file is a no-op). S3: upload before any row points at it.
    await asyncio.to_thread(blobs.put_file, key, Path(image.path))
    return File(
        project_id=entry.task.project_id,
        task_id=entry.id,
        role=role,
        position=image.index,
        name=image.name,
        contenttype="image/jpeg" if image.name.endswith(".jpeg") else "image/png",
        size=image.size_bytes,
        blob_key=key,
        meta=FileMeta(seed=image.seed, width=image.width, height=image.height),
        created=time.time(),
    )


def success_details(
    entry: RunningTask, result: GenerationResult, fresh: Task | None, batch_wait: float, batched_with: list[int]
) -> TaskDetails:
    """``details`` of a task that succeeded: how it was generated, its seeds, its stage timings, its companions.

    ``fresh`` is the task's row as it stands now (its preprocessing times), ``batched_with`` the project's own
    tasks that shared its pipeline calls (another tenant's task ids are none of its business)."""
    task, now = entry.task, time.time()
    timings = {"queue": (task.accepttime or now) - task.createtime, **result.timings}
    timings["batch_wait"] = batch_wait
    if entry.stored.fetch_seconds is not None:
        timings["fetch"] = entry.stored.fetch_seconds
    if fresh is not None and fresh.preprocessstarttime and fresh.preprocessendtime:
        timings["preprocess"] = fresh.preprocessendtime - fresh.preprocessstarttime
    failed = [FailedImage(index=f.index, seed=f.seed, message=FAILED_IMAGE) for f in result.failed]
    return TaskDetails(
        method=result.method,
        seeds=[image.seed for image in result.images],
        timings=StageTimings.model_validate({name: round(seconds, 4) for name, seconds in timings.items()}),
        batched_with=batched_with,
        failed_images=failed or None,
    )
