"""Claims: a worker takes the next claimable task (``claim_next``), the same-shape tasks that batch with one it
holds (``claim_similar``), reads what is waiting while it forms a batch (``waiting_for``). A claim is one
conditional UPDATE that gives the worker the task's lease and appends ``task_accept``; the order is ``order``'s."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import false, func, or_, select, true, update

from dreamserve.queue.base import StoreBase
from dreamserve.queue.db import Project, Task, TaskEvent
from dreamserve.queue.events import Event
from dreamserve.queue.order import claimable, heads, in_claim_order, same_shape, top_priority
from dreamserve.status import TaskStatus


class Claims(StoreBase):
    async def claim_next(self, worker_id: str, models: Sequence[str], lease_seconds: float) -> Task | None:
        """Take the next claimable task of one of ``models`` (see ``order``); None if there is none."""
        for _ in range(5):
            ready = claimable(models)
            async with self.sessions() as session:
                priority = await top_priority(session, ready)
                if priority is None:
                    return None
                first = await heads(session, (*ready, Task.priority == priority))
            if not first:
                return None
            _, _, task_id = min(first, key=lambda head: (head[1], head[2]))  # the least recently served first
            task = await self._claim(task_id, worker_id, lease_seconds)
            if task is not None:
                return task
            # Another worker took it between the read and the conditional claim: read the queue again.
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
            fitting = [task_id for task_id, _ in await in_claim_order(session, same, room)]
        if not fitting:
            return []
        return await self._claim_where(Task.id.in_(fitting), worker_id, lease_seconds)

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

    async def _claim(self, task_id: int, worker_id: str, lease_seconds: float) -> Task | None:
        claimed = await self._claim_where(Task.id == task_id, worker_id, lease_seconds)
        return claimed[0] if claimed else None

    async def _claim_where(self, which: Any, worker_id: str, lease_seconds: float) -> list[Task]:
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
        events: list[Event] = []
        async with self.sessions.begin() as session:
            # The claimed rows come back from the claim itself (one statement, where a claim and a read were two).
            tasks = sorted((await session.execute(claim)).scalars(), key=lambda task: task.id)
            if not tasks:
                return []
            projects = sorted({task.project_id for task in tasks})
            await session.execute(update(Project).where(Project.id.in_(projects)).values(last_claimed=now))
            accepted = [TaskEvent(task_id=task.id, type=TaskStatus.ACCEPT, message=None, created=now) for task in tasks]
            session.add_all(accepted)
            await session.flush()
            events = [Event(row.id, row.task_id, row.type, None) for row in accepted]
        for event in events:
            await self.hub.publish(event)
        return tasks
