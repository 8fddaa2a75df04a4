"""Leases: a claimed task is its worker's while the worker's heartbeat extends the lease (reading the stop asked
for on the way); the reaper recovers tasks whose worker is gone. And the dispatch mark: the right, won by one API
replica, to send a queued task to a worker queue."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update

from dreamserve.queue.db import Task
from dreamserve.queue.transitions import Transitions
from dreamserve.status import RUNNING, Pexit, StopKind, TaskStatus


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: whether this worker still holds the task's lease, and the stop asked for."""

    held: bool
    stop: StopKind | None = None


class Leases(Transitions):
    """The reaper ends what it recovers through the named transitions (``requeue``, ``fail``)."""

    async def heartbeat(self, task_id: int, worker_id: str, lease_seconds: float) -> Beat:
        """Extend the lease, and read the stop asked for (Task/Cancel, Task/Kill) through the database."""
        return (await self.heartbeat_all([task_id], worker_id, lease_seconds))[task_id]

    async def heartbeat_all(self, task_ids: Sequence[int], worker_id: str, lease_seconds: float) -> dict[int, Beat]:
        """``heartbeat`` of a worker's tasks in one statement: each one's beat (not held: its lease is lost)."""
        stmt = (
            update(Task)
            .where(Task.id.in_(list(task_ids)), Task.worker_id == worker_id, Task.status.in_(list(RUNNING)))
            .values(lease_until=time.time() + lease_seconds)
            .returning(Task.id, Task.stop_requested)
        )
        async with self.sessions.begin() as session:
            found = {row[0]: row[1] for row in (await session.execute(stmt)).all()}
        return {
            task_id: Beat(held=True, stop=StopKind(found[task_id]) if found[task_id] else None)
            if task_id in found
            else Beat(held=False)
            for task_id in task_ids
        }

    async def request_stop(self, task_id: int, kind: StopKind) -> bool:
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.status.in_(list(RUNNING)))
            .values(stop_requested=kind)
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    async def reap(self, is_alive: Callable[[str], bool | None], max_attempts: int) -> list[int]:
        """Recover tasks whose worker is gone: re-queue them, or fail them after ``max_attempts`` starts.

        A worker is gone when its lease expired, or when ``is_alive(worker_id)`` says False (a worker
        of this host whose process no longer exists), which lets a restarted server recover at once.
        """
        now = time.time()
        query = select(Task.id, Task.worker_id, Task.lease_until, Task.attempts).where(Task.status.in_(list(RUNNING)))
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        recovered = []
        for task_id, worker_id, lease_until, attempts in rows:
            alive = is_alive(worker_id or "")
            expired = lease_until is None or lease_until < now
            gone = alive is False or (alive is None and expired)
            if gone and await self._recover(task_id, worker_id, attempts, max_attempts):
                recovered.append(task_id)
        return recovered

    async def _recover(self, task_id: int, worker_id: str | None, attempts: int, max_attempts: int) -> bool:
        if attempts < max_attempts:
            note = f"Worker {worker_id} was lost during attempt {attempts}; the task was queued again.\n"
            return await self.requeue(task_id, note, worker_id)
        message = f"Worker lost during attempt {attempts} of {max_attempts}; the task was not retried again."
        return await self.fail(task_id, Pexit.GAVE_UP, message, expect=RUNNING, worker_id=worker_id)

    async def undispatched(self, limit: int = 100) -> list[tuple[int, str, int]]:
        """Queued tasks no dispatcher has sent yet (new, or re-queued by the reaper): (id, model, priority)."""
        query = (
            select(Task.id, Task.model, Task.priority)
            .where(Task.status == TaskStatus.QUEUE, Task.dispatched_at.is_(None), Task.inputs_ready.is_(True))
            .order_by(Task.priority.desc(), Task.id)
            .limit(limit)
        )
        async with self.sessions() as session:
            return [(row.id, row.model, row.priority) for row in (await session.execute(query)).all()]

    async def mark_dispatched(self, task_id: int) -> bool:
        """Take the right to dispatch a task; only one API replica wins it."""
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.dispatched_at.is_(None))
            .values(dispatched_at=time.time())
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    async def unmark_dispatched(self, task_id: int) -> None:
        async with self.sessions.begin() as session:
            await session.execute(update(Task).where(Task.id == task_id).values(dispatched_at=None))
