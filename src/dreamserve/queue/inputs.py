"""URL inputs, fetched before a task can be claimed (``preprocess.py``): the right to fetch a queued task's
inputs is a lease of its own (``inputs_lease_until``), taken fairly across projects; once fetched, they are
staged (stored rows, the job pointed at them) and the task becomes claimable."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from sqlalchemy import or_, select, update

from dreamserve.jobs import TaskJob
from dreamserve.queue.base import StoreBase
from dreamserve.queue.db import File, Task
from dreamserve.queue.files import add_files
from dreamserve.status import TaskStatus


class Inputs(StoreBase):
    async def claim_inputs(
        self, limit: int, busy: Mapping[int, int], per_project: int, lease_seconds: float
    ) -> list[Task]:
        """Take the right to fetch the URL inputs of up to ``limit`` queued tasks, oldest first by priority.

        ``busy`` counts the tasks each project already has being fetched here; a project gets at most
        ``per_project``, so one tenant's slow URLs leave room for the others'. The right is a lease
        (``inputs_lease_until``): a replica that dies while fetching leaves the task to another.
        """
        now = time.time()
        query = (
            select(Task.id, Task.project_id)
            .where(
                Task.status == TaskStatus.QUEUE,
                Task.inputs_ready.is_(False),
                or_(Task.inputs_lease_until.is_(None), Task.inputs_lease_until < now),
            )
            .order_by(Task.priority.desc(), Task.id)
            .limit(limit + per_project * 8)
        )
        async with self.sessions() as session:
            candidates = (await session.execute(query)).all()
        taken = dict(busy)
        chosen: list[int] = []
        for task_id, project_id in candidates:
            if len(chosen) >= limit:
                break
            if taken.get(project_id, 0) < per_project:
                taken[project_id] = taken.get(project_id, 0) + 1
                chosen.append(task_id)
        claimed: list[Task] = []
        for task_id in chosen:
            stmt = (
                update(Task)
                .where(
                    Task.id == task_id,
                    Task.status == TaskStatus.QUEUE,
                    Task.inputs_ready.is_(False),
                    or_(Task.inputs_lease_until.is_(None), Task.inputs_lease_until < now),
                )
                .values(inputs_lease_until=now + lease_seconds)
                .returning(Task.id)
            )
            async with self.sessions.begin() as session:
                if (await session.execute(stmt)).scalar_one_or_none() is not None:
                    task = await session.get(Task, task_id)
                    if task is not None:
                        claimed.append(task)
        return claimed

    async def stage_inputs(self, task_id: int, job: TaskJob, files: Sequence[File]) -> bool:
        """Point the task at its fetched inputs (now blobs) and make it claimable; False if it left the queue."""
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.status == TaskStatus.QUEUE, Task.inputs_ready.is_(False))
            .values(job=job.dump(), inputs_ready=True, inputs_lease_until=None)
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            if (await session.execute(stmt)).scalar_one_or_none() is None:
                return False
            for file in files:
                file.task_id = task_id
            await add_files(session, self.keys, files)
        return True
