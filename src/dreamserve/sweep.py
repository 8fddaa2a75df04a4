"""The orphan sweep: what a crash leaves that no row names is deleted once it is older than a grace period.

A server killed while saving outputs leaves blobs no file row names (its model process finishes the image
after its parent is gone, or an S3 upload lands before its row), and the scratch folders of the tasks it
held. Blobs are listed a page at a time (``BlobStore.list_page``) and each page is compared with the
``files`` rows in one query, so a run holds one page, and a pass resumes where the last page ended.

The grace period, from the blob's mtime (local) or Last-Modified (S3), is what makes it safe: every writer
stores the bytes first and commits the row that names them right after, within one guarded transaction
of a worker that holds the task's lease (or of a request), so a blob older than ``orphan_grace_seconds``
(an hour, well past a lease, the database's busy timeout and an upload's time) without a row never gets one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobEntry, BlobStore
from dreamserve.queue.db import File, Task
from dreamserve.settings import Settings
from dreamserve.status import RUNNING

log = logging.getLogger(__name__)

#: The blob-store folders the server writes; anything else in a shared bucket is not its to delete.
PREFIXES = ("outputs", "inputs", "uploads")


class OrphanSweep:
    """Called by the reaper: each ``step`` sweeps one page; a pass over every prefix starts every
    ``orphan_sweep_seconds`` (the first at once)."""

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.blobs = blobs
        self.clock = clock
        self._prefix = 0
        self._after: str | None = None
        self._next_pass = 0.0
        #: Blobs deleted since start (logged with each pass).
        self.deleted = 0

    async def step(self) -> int:
        """Sweep the next page of the pass under way; returns how many blobs it deleted."""
        now = self.clock()
        if now < self._next_pass:
            return 0
        limit = self.settings.orphan_sweep_page
        page = await asyncio.to_thread(self.blobs.list_page, PREFIXES[self._prefix], self._after, limit)
        deleted = await self._delete_unnamed(page, now - self.settings.orphan_grace_seconds)
        self.deleted += deleted
        if len(page) == limit:
            self._after = page[-1].key
            return deleted
        self._after = None
        self._prefix = (self._prefix + 1) % len(PREFIXES)
        if self._prefix == 0:
            self._next_pass = now + self.settings.orphan_sweep_seconds
            scratch = await sweep_scratch(self.settings, self.sessions, self.clock())
            log.info("orphan sweep: %d blobs deleted since start, %d scratch folders now", self.deleted, scratch)
        return deleted

    async def run_pass(self) -> int:
        """A whole pass now (start-up, tests); returns how many blobs it deleted."""
        self._prefix, self._after, self._next_pass = 0, None, 0.0
        deleted = await self.step()
        while self._prefix or self._after is not None:
            deleted += await self.step()
        return deleted

    async def _delete_unnamed(self, page: Sequence[BlobEntry], before: float) -> int:
        old = [entry.key for entry in page if entry.modified < before]
        if not old:
            return 0
        async with self.sessions() as session:
            named = set((await session.execute(select(File.blob_key).where(File.blob_key.in_(old)))).scalars())
        orphans = [key for key in old if key not in named]
        for key in orphans:
            await asyncio.to_thread(self.blobs.delete, key)
        if orphans:
            log.info("orphan sweep: deleted %d blobs no file row names (%s, ...)", len(orphans), orphans[0])
        return len(orphans)


async def sweep_scratch(settings: Settings, sessions: async_sessionmaker[AsyncSession], now: float) -> int:
    """Remove the scratch folders (``<task id>-<random>``) of tasks no worker holds, older than the grace
    period; returns how many folders are left. A held task's folders stay: its worker may be using one."""
    root = settings.data_dir / "scratch"
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    folders: dict[str, int] = {}
    for name in names:
        task_id, _, _ = name.partition("-")
        if task_id.isdigit():
            folders[name] = int(task_id)
    held: set[int] = set()
    ids = sorted(set(folders.values()))
    for start in range(0, len(ids), 500):
        query = select(Task.id).where(Task.id.in_(ids[start : start + 500]), Task.status.in_(list(RUNNING)))
        async with sessions() as session:
            held.update((await session.execute(query)).scalars())
    left = 0
    for name, owner in folders.items():
        if owner in held or _modified(root / name) >= now - settings.orphan_grace_seconds:
            left += 1
            continue
        log.info("orphan sweep: removing the scratch folder %s of a task no worker holds", name)
        await asyncio.to_thread(shutil.rmtree, root / name, ignore_errors=True)
    return left


def _modified(path: Path) -> float:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mtime
    return 0.0
