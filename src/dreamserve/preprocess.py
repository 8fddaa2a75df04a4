"""The preprocess stage: a queued task's URL inputs are fetched before it can take a model process.

A task with URL inputs is queued with ``inputs_ready`` false, so no worker can claim it. This loop
takes the right to fetch it (``TaskStore.claim_inputs``, a lease), fetches all its URLs at once
under one deadline for the task, checks each image off the event loop, stores them in the blob
store like uploads and makes the task claimable (``stage_inputs``). The model process then only
reads blobs: it never waits on a stranger's server. Bad or slow URLs end the task with pexit 2.

One project gets at most ``preprocess_tasks_per_project`` of the ``preprocess_tasks`` slots, so a
tenant's slow URLs leave room for everyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable

from dreamserve.blobs import BlobStore
from dreamserve.errors import InvalidRequest
from dreamserve.facts import FileMeta
from dreamserve.fetch import fetch
from dreamserve.filerows import input_row
from dreamserve.images import check_image
from dreamserve.jobs import StoredReference, TaskJob
from dreamserve.queue.db import File, Task
from dreamserve.queue.store import TaskStore, new_blob_folder
from dreamserve.settings import Settings

log = logging.getLogger(__name__)


class Preprocessor:
    def __init__(self, settings: Settings, store: TaskStore, blobs: BlobStore, on_ready: Callable[[str], None]) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        #: Called with the model of a task that became claimable (wakes its supervisors).
        self.on_ready = on_ready
        #: Called after each completed iteration (the liveness registry behind ``/readyz``).
        self.on_tick: Callable[[], None] = lambda: None
        self._fetches = asyncio.Semaphore(settings.preprocess_fetches)
        self._active: dict[int, tuple[int, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._start_due()
                except Exception:
                    log.exception("preprocess loop failed; retrying")
                else:
                    self.on_tick()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
        finally:
            for _, job in self._active.values():
                job.cancel()

    async def _start_due(self) -> None:
        free = self.settings.preprocess_tasks - len(self._active)
        if free <= 0:
            return
        busy = Counter(project for project, _ in self._active.values())
        lease = self.settings.fetch_timeout_seconds + 30.0
        for task in await self.store.claim_inputs(free, busy, self.settings.preprocess_tasks_per_project, lease):
            job = asyncio.create_task(self._stage(task), name=f"preprocess {task.id}")
            self._active[task.id] = (task.project_id, job)
            job.add_done_callback(functools.partial(self._done, task.id))

    def _done(self, task_id: int, _: asyncio.Task[None]) -> None:
        self._active.pop(task_id, None)
        self._wake.set()  # a slot is free

    async def _stage(self, task: Task) -> None:
        started = time.monotonic()
        try:
            job, files = await self._fetch_all(task)
        except InvalidRequest as exc:
            await self.store.fail_inputs(task.id, exc.message)
            return
        except Exception:
            log.exception("task %s: preprocessing failed", task.id)
            await self.store.fail_inputs(task.id, "The URL inputs could not be prepared (an internal error).")
            return
        job = job.model_copy(update={"fetch_seconds": round(time.monotonic() - started, 4)})
        if await self.store.stage_inputs(task.id, job, files):
            self.on_ready(task.model)
            return
        # Cancelled (or failed) while its inputs were on their way: nothing points at the blobs.
        for file in files:
            await asyncio.to_thread(self.blobs.delete, file.blob_key)

    async def _fetch_all(self, task: Task) -> tuple[TaskJob, list[File]]:
        """Every URL input fetched, checked and stored as a blob, all at once under one deadline."""
        job = task.read_job()
        references = list(job.references)
        folder = new_blob_folder()
        deadline = time.monotonic() + self.settings.fetch_timeout_seconds
        wanted = [(position, ref.url) for position, ref in enumerate(references) if ref.url and not ref.fetched]
        pending = dict(wanted)
        fetches = [
            asyncio.create_task(self._fetch_one(task, position, url, folder, deadline, pending))
            for position, url in wanted
        ]
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_seconds):
                files = await asyncio.gather(*fetches)
        except BaseException as exc:
            await self._undo(fetches)
            if not isinstance(exc, TimeoutError):
                raise
            raise self._late(pending) from None
        for (position, url), file in zip(wanted, files, strict=True):
            references[position] = StoredReference(blob_key=file.blob_key, url=url)
        return job.model_copy(update={"references": tuple(references)}), list(files)

    async def _undo(self, fetches: list[asyncio.Task[File]]) -> None:
        """Stop the fetches still running and delete the blobs of those that were done."""
        for fetching in fetches:
            fetching.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        for fetching in fetches:
            if not fetching.cancelled() and fetching.exception() is None:
                await asyncio.to_thread(self.blobs.delete, fetching.result().blob_key)

    def _late(self, pending: dict[int, str]) -> InvalidRequest:
        late = ", ".join(repr(url[:60]) for url in list(pending.values())[:3])
        more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        limit = self.settings.fetch_timeout_seconds
        return InvalidRequest(
            f"The inputImage URLs of this task did not all arrive within {limit:.0f} s (fetch_timeout_seconds, "
            f"one deadline for all of a task's URLs): still waiting for {late}{more}. "
            "Upload the images instead, or serve them from a faster host."
        )

    async def _fetch_one(
        self, task: Task, position: int, url: str, folder: str, deadline: float, pending: dict[int, str]
    ) -> File:
        settings = self.settings
        async with self._fetches:
            # The task's deadline (``_fetch_all``) is the one that expires: this one is a second later, or a fetch
            # timing out a hair first would report itself instead of the task's limit.
            remaining = max(0.1, deadline - time.monotonic()) + 1.0
            data = await fetch(
                url,
                max_bytes=settings.max_upload_bytes,
                timeout=remaining,
                allow_private=settings.fetch_allow_private,
                allow_hosts=settings.fetch_allow_hosts,
            )
        label = f"{position + 1} ({url[:60]})"
        ext, width, height = await asyncio.to_thread(
            check_image, data, label, settings.max_upload_bytes, settings.max_input_pixels
        )
        file = input_row(
            task.project_id, folder, position, ext, len(data), FileMeta(width=width, height=height, url=url)
        )
        await asyncio.to_thread(self.blobs.put, file.blob_key, data)
        pending.pop(position, None)
        return file
