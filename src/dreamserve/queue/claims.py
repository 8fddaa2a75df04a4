"""Claims: a worker takes the next claimable task (``claim_next``), the same-shape tasks that batch with one it
holds (``claim_similar``), reads what is waiting while it forms a batch (``waiting_for``). A claim is one
conditional UPDATE that gives the worker the task's lease and appends ``task_accept``; the order is ``order``'s."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import false, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.queue.base import StoreBase
from dreamserve.queue.db import Lane, Project, Task, TaskEvent, begin_in
from dreamserve.queue.events import Event
from dreamserve.queue.order import claimable, heads, in_claim_order, same_shape, top_priority
from dreamserve.status import TaskStatus


class Claims(StoreBase):
    async def claim_next(self, worker_id: str, models: Sequence[str], lease_seconds: float) -> Task | None:
        """Take the next claimable task of one of ``models`` (see ``order``); None if there is none.

        The queue is read again inside the claiming transaction: on SQLite that transaction holds the writer, so
        what it reads is what it claims. A fleet's workers read the same head of the queue, and a read outside
        made all but one of them lose the claim and try again, each loss a write turn of its own (3-4 claim
        transactions per task claimed). PostgreSQL's claim can still lose to another's: then it tries again."""
        ready = claimable(models)
        async with self.sessions() as session:
            # A look outside the writer first: an idle worker's poll that finds nothing takes no write turn.
            if await top_priority(session, ready) is None:
                return None

        async def first(session: AsyncSession) -> Any:
            priority = await top_priority(session, ready)
            if priority is None:
                return None
            found = await heads(session, (*ready, Task.priority == priority))
            if not found:
                return None
            _, _, task_id = min(found, key=lambda head: (head[1], head[2]))  # the least recently served first
            return Task.id == task_id

        for _ in range(5):
            claimed = await self._claim_where(first, worker_id, lease_seconds)
            if claimed is not None:
                return claimed[0] if claimed else None
            # Another worker took it between the read and the conditional claim (PostgreSQL): read it again.
        return None

    async def claim_similar(
        self, worker_id: str, model: str, width: int, height: int, room: int, lease_seconds: float
    ) -> list[Task]:
        """Claim queued text-to-image tasks of ``model`` at ``width`` x ``height``, up to ``room`` images in all.

        They run in the same pipeline calls as a task this worker already holds (batching across requests,
        and across projects, which take turns as in ``claim_next``): the candidates in claim order whose
        running sum of images fits in ``room``, claimed in one conditional UPDATE.
        """
        if room <= 0:
            return []
        same = claimable([model], *same_shape(width, height))
        async with self.sessions() as session:
            # A look outside the writer first: a batch that no task could join takes no write turn.
            if not await in_claim_order(session, same, room):
                return []

        async def fitting(session: AsyncSession) -> Any:
            # Read in the claiming transaction, as ``claim_next``'s: workers forming batches at once read the same
            # candidates, and all but the first claimed none of them when they were read outside.
            chosen = [task_id for task_id, _ in await in_claim_order(session, same, room)]
            return Task.id.in_(chosen) if chosen else None

        return await self._claim_where(fitting, worker_id, lease_seconds) or []

    async def waiting_for(self, model: str, width: int, height: int, room: int | None = None) -> tuple[int, bool]:
        """Claimable work of ``model``: the images of text-to-image tasks at ``width`` x ``height`` (counted up to
        ``room`` tasks: enough to fill a batch of ``room`` images), and whether any other task (another shape,
        or with references) is waiting. Read while a batch is being formed, on the shape index: seeks only."""
        ready = claimable([model])
        same = select(Task.num_images).where(*ready, *same_shape(width, height))
        counted = same.limit(room).subquery() if room is not None else same.subquery()
        images = select(func.coalesce(func.sum(counted.c.num_images), 0)).scalar_subquery()
        text = (*ready, Task.has_inputs == false())
        others = or_(
            select(Task.id).where(*ready, Task.has_inputs == true()).exists(),
            select(Task.id).where(*text, Task.width < width).exists(),
            select(Task.id).where(*text, Task.width > width).exists(),
            select(Task.id).where(*text, Task.width == width, Task.height < height).exists(),
            select(Task.id).where(*text, Task.width == width, Task.height > height).exists(),
        )
        async with self.sessions() as session:
            found, other = (await session.execute(select(images, others))).one()
        return int(found), bool(other)

    async def _claim_where(
        self, choose: Callable[[AsyncSession], Awaitable[Any]], worker_id: str, lease_seconds: float
    ) -> list[Task] | None:
        """Claim the queued tasks that ``choose`` picks (a condition on ``Task``, read in the claiming transaction;
        None: there is nothing to claim, and ``[]`` is returned); None if none of them could be claimed."""
        events: list[Event] = []
        async with begin_in(self.sessions, Lane.CLAIM) as session:
            which = await choose(session)
            if which is None:
                return []
            now = time.time()
            claim = (
                update(Task)
                .where(which, Task.status == TaskStatus.QUEUE, Task.inputs_ready.is_(True))
                .values(
                    status=TaskStatus.ACCEPT,
                    accepttime=now,
                    worker_id=worker_id,
                    lease_until=now + lease_seconds,
                    attempts=Task.attempts + 1,
                )
                .returning(Task)
            )
            # The claimed rows come back from the claim itself (one statement, where a claim and a read were two).
            tasks = sorted((await session.execute(claim)).scalars(), key=lambda task: task.id)
            if not tasks:
                return None
            projects = sorted({task.project_id for task in tasks})
            await session.execute(update(Project).where(Project.id.in_(projects)).values(last_claimed=now))
            accepted = [TaskEvent(task_id=task.id, type=TaskStatus.ACCEPT, message=None, created=now) for task in tasks]
            session.add_all(accepted)
            await session.flush()
            events = [Event(row.id, row.task_id, row.type, None) for row in accepted]
        for event in events:
            await self.hub.publish(event)
        return tasks
