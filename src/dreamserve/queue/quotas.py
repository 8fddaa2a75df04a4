"""What a project may queue and store: the caps, counted under the project's lock in the transaction that adds
(unfinished tasks from counters the project's row keeps, stored files by a sum)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, cast, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.errors import QuotaExceeded, StorageFull
from dreamserve.queue.db import File, Project, Task


@dataclass(frozen=True)
class Quota:
    """Caps on one project's unfinished tasks (0 = none): their number, and their work in megapixels."""

    max_tasks: int = 0
    max_megapixels: float = 0.0


@dataclass(frozen=True)
class StorageQuota:
    """Caps on what one project stores (0 = none): the bytes of all its files (uploads, task inputs and outputs,
    partial images), and their number. Checked where a client adds files (File/Upload, Run's uploaded inputs);
    a task's outputs are never refused, they count against the next upload."""

    max_bytes: int = 0
    max_files: int = 0

    @property
    def active(self) -> bool:
        return bool(self.max_bytes or self.max_files)


async def lock_project(session: AsyncSession, project_id: int) -> None:
    """A no-op write: it locks the project's row (PostgreSQL) or the database (SQLite) until the transaction ends,
    so that concurrent requests of one project are counted against its quotas one after another."""
    await session.execute(update(Project).where(Project.id == project_id).values(last_claimed=Project.last_claimed))


async def check_storage(session: AsyncSession, project_id: int, quota: StorageQuota, size: int, count: int) -> None:
    """``StorageFull`` if ``count`` more files of ``size`` bytes in all would take the project past ``quota``;
    counted in the caller's transaction, which stores the rows, under the project's lock."""
    if not quota.active:
        return
    await lock_project(session, project_id)
    query = select(func.count(File.id), func.coalesce(func.sum(cast(File.size, BigInteger)), 0))
    files, stored = (await session.execute(query.where(File.project_id == project_id))).one()
    refusal = storage_refusal(quota, files, int(stored), size, count)
    if refusal is not None:
        raise refusal


def storage_refusal(quota: StorageQuota, files: int, stored: int, size: int, count: int) -> StorageFull | None:
    """Why ``count`` more files of ``size`` bytes cannot join the project's ``files`` of ``stored`` bytes; None
    when they fit (every path that stores a Run's inputs refuses with these words)."""
    if quota.max_files and files + count > quota.max_files:
        return StorageFull(
            f"Storage full: this project stores {files:,} files and may store {quota.max_files:,} "
            "(max_project_files). Delete some (File/Delete, File/FolderDelete, Task/InputOutputDelete) first."
        )
    if quota.max_bytes and stored + size > quota.max_bytes:
        return StorageFull(
            f"Storage full: this project stores {stored:,} bytes, this adds {size:,} and the limit is "
            f"{quota.max_bytes:,} (max_project_bytes). Delete some files (File/Delete, File/FolderDelete, "
            "Task/InputOutputDelete) first."
        )
    return None


async def count_task(session: AsyncSession, project_id: int, quota: Quota | None, pixels: int) -> None:
    """Add a new task of ``pixels`` work to its project's unfinished counters, in the caller's transaction, which
    stores the task; ``QuotaExceeded`` (and the caller's transaction rolls back) if it takes the project past
    ``quota``. One UPDATE: it locks the project's row (PostgreSQL) or holds the database (SQLite) until the
    transaction ends, so concurrent requests of one project are counted one after another, and it returns the
    figures with this task counted, which the check reads instead of a sum over the project's backlog."""
    stmt = (
        update(Project)
        .where(Project.id == project_id)
        .values(unfinished_tasks=Project.unfinished_tasks + 1, unfinished_pixels=Project.unfinished_pixels + pixels)
        .returning(Project.unfinished_tasks, Project.unfinished_pixels)
    )
    counted = (await session.execute(stmt)).one_or_none()
    if quota is None or counted is None:
        return
    refusal = task_refusal(quota, counted[0], int(counted[1]), pixels)
    if refusal is not None:
        raise refusal


def task_refusal(quota: Quota, counted: int, counted_pixels: int, pixels: int) -> QuotaExceeded | None:
    """Why a new task of ``pixels`` work takes its project past ``quota``, from the project's counters with the
    task counted (what the counting UPDATE returns); None when it fits."""
    count, queued = counted - 1, counted_pixels - pixels  # the project's figures before this task
    if quota.max_tasks and count + 1 > quota.max_tasks:
        return QuotaExceeded(
            f"Concurrency limit reached: this project has {count} unfinished tasks and may have "
            f"{quota.max_tasks} (max_queued_tasks). Send this task again when some of them have ended."
        )
    if quota.max_megapixels and (queued + pixels) / 1e6 > quota.max_megapixels:
        return QuotaExceeded(
            f"Concurrency limit reached: this project's unfinished tasks add up to {queued / 1e6:,.0f} "
            f"megapixels (images x width x height) and this one to {pixels / 1e6:,.0f}; the limit is "
            f"{quota.max_megapixels:,.0f} (max_queued_megapixels). Ask for fewer or smaller images, or send "
            "it again when some of them have ended."
        )
    return None


async def release_task(session: AsyncSession, task: Task) -> None:
    """Take an ending task off its project's unfinished counters, in the transaction that ends it."""
    pixels = task.num_images * task.width * task.height
    await session.execute(
        update(Project)
        .where(Project.id == task.project_id)
        .values(unfinished_tasks=Project.unfinished_tasks - 1, unfinished_pixels=Project.unfinished_pixels - pixels)
    )
