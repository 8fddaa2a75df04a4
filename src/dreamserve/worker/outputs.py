"""What a running task leaves: its images as file rows (bytes in the blob store first), the facts of a success
(``details``), and the progress object of each step."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dreamserve.blobs import BlobStore
from dreamserve.jobs import GeneratedImage, GenerationResult
from dreamserve.queue.db import File, Task
from dreamserve.worker.running import RunningTask


async def output_file(blobs: BlobStore, entry: RunningTask, image: GeneratedImage, role: str) -> File:
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
        meta={"seed": image.seed, "width": image.width, "height": image.height},
        created=time.time(),
    )


def success_details(
    entry: RunningTask, result: GenerationResult, fresh: Task | None, batch_wait: float, batched_with: list[int]
) -> dict[str, Any]:
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
    details: dict[str, Any] = {
        "method": result.method,
        "seeds": [image.seed for image in result.images],
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        "batched_with": batched_with,
    }
    if result.failed:
        details["failed_images"] = [
            {"index": f.index, "seed": f.seed, "message": "could not be finished (the server log has why)"}
            for f in result.failed
        ]
    return details


def progress(step: int, total: int, elapsed: float) -> dict[str, str]:
    """Wiro's progress object: every value a string."""
    speed = step / elapsed if elapsed > 0 else 0.0
    remaining = (total - step) / speed if speed > 0 else 0.0
    return {
        "type": "progressGenerate",
        "task": "Generate",
        "percentage": str(int(100 * step / max(total, 1))),
        "stepCurrent": str(step),
        "stepTotal": str(total),
        "speed": f"{speed:.2f}",
        "speedType": "it/s",
        "elapsedTime": f"{elapsed:.0f}s",
        "remainingTime": f"{remaining:.0f}s",
    }
