"""A claimed task's references, from the blob store onto local disk for the model process.

URL inputs were fetched before the task could be claimed (``preprocess.py``): here every reference is a blob.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from dreamserve.blobs import BlobStore
from dreamserve.queue.store import TaskStore
from dreamserve.status import Pexit
from dreamserve.worker.running import RunningTask


async def local_references(
    store: TaskStore, blobs: BlobStore, worker_id: str, entry: RunningTask, scratch: Path
) -> list[str] | None:
    """The local paths of the task's references, in order (``task_preprocess_*`` around them when it has any);
    None if the task failed instead."""
    references = entry.stored.references
    if not references:
        return []
    await store.begin_preprocess(entry.id, worker_id)
    paths = []
    for number, reference in enumerate(references, start=1):
        key = reference.blob_key
        if key is None:
            # Only a task whose URL inputs were stored can be claimed; this is a row written some other way.
            message = f"Input {number} was not fetched before the task was claimed; send the task again."
            await store.fail(entry.id, Pexit.BAD_INPUT, message, worker_id=worker_id)
            return None
        local = blobs.local_path(key)
        if local is None:
            local = scratch / f"reference-{number}{Path(key).suffix}"
            await asyncio.to_thread(blobs.download, key, local)
        paths.append(str(local))
    await store.end_preprocess(entry.id, worker_id)
    return paths
