"""Creating and reading tasks: queueing one (within its project's quotas, with its uploaded inputs), finding it by
id or token, and Task/List's pages."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute

from dreamserve.facts import TaskDetails
from dreamserve.jobs import TaskJob
from dreamserve.queue.base import UNANSWERED, StoreBase, direct
from dreamserve.queue.db import File, Task, TaskEvent
from dreamserve.queue.events import Event
from dreamserve.queue.files import add_files
from dreamserve.queue.keyring import digest, new_salt
from dreamserve.queue.quotas import Quota, check_storage, count_task
from dreamserve.queue.writes import NewTask
from dreamserve.status import TaskStatus

#: Task/List's sort keys (Wiro sends ``sort: "id"``); ties are broken by id.
LIST_SORTS: dict[str, InstrumentedAttribute[Any]] = {
    "id": Task.id,
    "createtime": Task.createtime,
    "starttime": Task.starttime,
    "endtime": Task.endtime,
    "status": Task.status,
}


class Tasks(StoreBase):
    async def create(
        self,
        *,
        project_id: int,
        model: str,
        job: TaskJob,
        callback_url: str,
        priority: int,
        inputs: Sequence[File],
        callback_events: Sequence[str] = ("completed",),
        quota: Quota | None = None,
        refused_callback: tuple[str, str] | None = None,
    ) -> Task:
        """Queue a task; ``QuotaExceeded`` (nothing stored) when it would take the project past ``quota``.

        A task with URL inputs is queued with ``inputs_ready`` false: the preprocess loop fetches them
        (``stage_inputs``) before any worker can claim it. ``refused_callback`` (value, reason): a callbackUrl
        that is never called, logged as a failed delivery and noted in ``debugoutput`` (``job.notes``
        carries the note through to the worker's output).
        """
        now = time.time()
        task = Task(
            project_id=project_id,
            token_salt=new_salt(),
            model=model,
            status=TaskStatus.QUEUE,
            priority=priority,
            parameters={},  # legacy: Task/Detail renders new rows' request from their job
            job=job.dump(),
            width=job.width,
            height=job.height,
            num_images=job.num_images,
            has_inputs=bool(job.references),
            inputs_ready=job.inputs_ready,
            callback_url=callback_url,
            callback_events=list(callback_events),
            details=TaskDetails(),
            createtime=now,
            debugoutput="\n".join(job.notes),
        )
        refused = None if refused_callback is None else self.outbox.refused_row(0, *refused_callback, now)
        row = TaskEvent(type=TaskStatus.QUEUE, message=None, created=now)
        new = NewTask(task, inputs, job.work, quota, self.storage, refused, row)
        if self.writes is not None:  # SQLite: the same rows in one hop to the connection's thread
            await self.writes.create(new)
        else:
            await self._create_in_session(new)
        await self.hub.publish(Event(row.id, task.id, row.type, None))
        return task

    async def _create_in_session(self, new: NewTask) -> None:
        """``create``'s rows through the ORM session (PostgreSQL; ``writes.Writes`` writes the same on SQLite)."""
        task, inputs = new.task, new.inputs
        async with self.sessions.begin() as session:
            await count_task(session, task.project_id, new.quota, new.work)
            if inputs:
                await check_storage(session, task.project_id, new.storage, sum(f.size for f in inputs), len(inputs))
            session.add(task)
            await session.flush()
            task.token_digest = digest(self.keys.token(task))
            for file in inputs:
                file.task_id = task.id
            await add_files(session, self.keys, inputs)
            if new.refused is not None:
                new.refused.task_id = task.id
                session.add(new.refused)
            new.event.task_id = task.id
            session.add(new.event)
            await session.flush()

    async def get(self, *, project_id: int, taskid: int | None = None, token: str | None = None) -> Task | None:
        if taskid is None and token is None:
            return None
        if taskid is not None:
            found = direct(self.reads, lambda reads: reads.task(taskid, project_id))
        else:
            found = direct(self.reads, lambda reads: reads.task_by_token(digest(token or ""), project_id))
        if found is not UNANSWERED:
            return found
        query = select(Task).where(Task.project_id == project_id)
        if taskid is not None:
            query = query.where(Task.id == taskid)
        else:
            query = query.where(Task.token_digest == digest(token or ""))
        async with self.sessions() as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def get_by_token(self, token: str) -> Task | None:
        found = direct(self.reads, lambda reads: reads.task_by_token(digest(token)))
        if found is not UNANSWERED:
            return found
        async with self.sessions() as session:
            query = select(Task).where(Task.token_digest == digest(token))
            return (await session.execute(query)).scalar_one_or_none()

    async def get_by_id(self, taskid: int) -> Task | None:
        found = direct(self.reads, lambda reads: reads.task(taskid))
        if found is not UNANSWERED:
            return found
        async with self.sessions() as session:
            return await session.get(Task, taskid)

    async def list_ids(
        self,
        project_id: int,
        *,
        start: int,
        limit: int,
        model_part: str = "",
        sort: str = "id",
        descending: bool = True,
    ) -> tuple[list[int], int]:
        """One page of a project's tasks; ``model_part`` is a case-insensitive part of the owner/model slug."""
        conditions = [Task.project_id == project_id]
        if model_part:
            conditions.append(Task.model.contains(model_part.lower(), autoescape=True))
        column = LIST_SORTS[sort]
        order = [column.desc(), Task.id.desc()] if descending else [column.asc(), Task.id.asc()]
        async with self.sessions() as session:
            total = (await session.execute(select(func.count(Task.id)).where(*conditions))).scalar_one()
            query = select(Task.id).where(*conditions).order_by(*order).offset(start).limit(limit)
            return list((await session.execute(query)).scalars()), int(total)
