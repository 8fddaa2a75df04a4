"""Task state: the SQL tasks table is the queue, claims are leases, every change is logged.

Every status change goes through ``TaskStore.record``, which updates the task row and appends the
event to ``task_events`` in one transaction, then wakes live sockets. A conditional ``WHERE status
IN (...)`` makes each transition safe against races (a cancel and a claim, say): the loser changes
nothing and learns so from the ``None`` it gets back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import BigInteger, Subquery, case, cast, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from dreamserve.db import File, Project, Task, TaskEvent, WebhookDelivery
from dreamserve.errors import QuotaExceeded
from dreamserve.events import LIFECYCLE, RUNNING, TERMINAL, Event, Hub
from dreamserve.keyring import ServerKey, digest, new_salt

log = logging.getLogger(__name__)


# Process exit codes reported as ``pexit`` (Wiro: "0" is success, anything else failure).
PEXIT_OK = "0"
PEXIT_MODEL_ERROR = "1"
PEXIT_INPUT_ERROR = "2"
PEXIT_WORKER_LOST = "3"
PEXIT_CANCELED = "130"
PEXIT_KILLED = "137"


@dataclass(frozen=True)
class Quota:
    """Caps on one project's unfinished tasks (0 = none): their number, and their work in megapixels."""

    max_tasks: int = 0
    max_megapixels: float = 0.0


def new_blob_folder() -> str:
    """The blob-store folder of a task's inputs or outputs: random, and unrelated to any access key."""
    return secrets.token_hex(16)


async def add_files(session: AsyncSession, keys: ServerKey, files: Iterable[File]) -> None:
    """Insert file rows with a salt, then store the digest of the access key their id and salt derive."""
    rows = list(files)
    for file in rows:
        # A row stored before (a partial output becoming an output) keeps its salt, so its URL stays valid.
        if file.key_salt is None:
            file.key_salt = new_salt()
        session.add(file)
    await session.flush()
    for file in rows:
        file.key_digest = digest(keys.accesskey(file))


class Blobs(Protocol):
    """What the store needs of ``blobs.BlobStore`` (a tier above it, passed in): deleting a task's files."""

    def delete(self, key: str) -> None: ...


#: Task/List's sort keys (Wiro sends ``sort: "id"``); ties are broken by id.
LIST_SORTS: dict[str, InstrumentedAttribute[Any]] = {
    "id": Task.id,
    "createtime": Task.createtime,
    "starttime": Task.starttime,
    "endtime": Task.endtime,
    "status": Task.status,
}


class TaskStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], hub: Hub, keys: ServerKey, blobs: Blobs) -> None:
        self.sessions = sessions
        self.hub = hub
        self.keys = keys
        #: Where the bytes of the task files live: inputs of failed and cancelled tasks are deleted at their end.
        self.blobs = blobs

    # -- creating and reading -------------------------------------------------------------------

    async def create(
        self,
        *,
        project_id: int,
        model: str,
        parameters: dict[str, Any],
        job: dict[str, Any],
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
        that is never called, logged as a failed delivery and noted in ``debugoutput`` (``job["notes"]``
        carries the note through to the worker's output).
        """
        now = time.time()
        references = list(job.get("inputs") or [])
        async with self.sessions.begin() as session:
            if quota is not None and (quota.max_tasks or quota.max_megapixels):
                await self._check_quota(session, project_id, quota, _work(job))
            task = Task(
                project_id=project_id,
                token_salt=new_salt(),
                model=model,
                status="task_queue",
                priority=priority,
                parameters=parameters,
                job=job,
                width=int(job["width"]),
                height=int(job["height"]),
                num_images=int(job["num_images"]),
                has_inputs=bool(references),
                inputs_ready=not any("url" in item for item in references),
                callback_url=callback_url,
                callback_events=list(callback_events),
                details={},
                createtime=now,
                debugoutput="\n".join(job.get("notes", [])),
            )
            session.add(task)
            await session.flush()
            task.token_digest = digest(self.keys.token(task))
            for file in inputs:
                file.task_id = task.id
            await add_files(session, self.keys, inputs)
            if refused_callback is not None:
                value, reason = refused_callback
                refused = WebhookDelivery(
                    task_id=task.id, url=value, state="failed", last_error=reason, next_attempt=now, created=now
                )
                session.add(refused)
            row = TaskEvent(task_id=task.id, type="task_queue", message=None, created=now)
            session.add(row)
            await session.flush()
            event = Event(row.id, task.id, row.type, None)
        await self.hub.publish(event)
        return task

    @staticmethod
    async def _check_quota(session: AsyncSession, project_id: int, quota: Quota, pixels: int) -> None:
        # A no-op write first: it locks the project's row (PostgreSQL) or the database (SQLite) until this
        # transaction ends, so concurrent submissions of one project are counted one after another.
        await session.execute(update(Project).where(Project.id == project_id).values(last_claimed=Project.last_claimed))
        work = func.coalesce(func.sum(cast(Task.num_images, BigInteger) * Task.width * Task.height), 0)
        query = select(func.count(Task.id), work).where(
            Task.project_id == project_id, Task.status.not_in(sorted(TERMINAL))
        )
        count, queued = (await session.execute(query)).one()
        if quota.max_tasks and count + 1 > quota.max_tasks:
            raise QuotaExceeded(
                f"Concurrency limit reached: this project has {count} unfinished tasks and may have "
                f"{quota.max_tasks} (max_queued_tasks). Send this task again when some of them have ended."
            )
        if quota.max_megapixels and (int(queued) + pixels) / 1e6 > quota.max_megapixels:
            raise QuotaExceeded(
                f"Concurrency limit reached: this project's unfinished tasks add up to {int(queued) / 1e6:,.0f} "
                f"megapixels (images x width x height) and this one to {pixels / 1e6:,.0f}; the limit is "
                f"{quota.max_megapixels:,.0f} (max_queued_megapixels). Ask for fewer or smaller images, or send "
                "it again when some of them have ended."
            )

    async def get(self, *, project_id: int, taskid: int | None = None, token: str | None = None) -> Task | None:
        query = select(Task).where(Task.project_id == project_id)
        if taskid is not None:
            query = query.where(Task.id == taskid)
        elif token is not None:
            query = query.where(Task.token_digest == digest(token))
        else:
            return None
        async with self.sessions() as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def get_by_token(self, token: str) -> Task | None:
        async with self.sessions() as session:
            query = select(Task).where(Task.token_digest == digest(token))
            return (await session.execute(query)).scalar_one_or_none()

    async def get_by_id(self, taskid: int) -> Task | None:
        async with self.sessions() as session:
            return await session.get(Task, taskid)

    async def files(self, task_ids: Iterable[int], role: str) -> dict[int, list[File]]:
        ids = list(task_ids)
        result: dict[int, list[File]] = {i: [] for i in ids}
        if not ids:
            return result
        query = select(File).where(File.task_id.in_(ids), File.role == role).order_by(File.position)
        async with self.sessions() as session:
            for file in (await session.execute(query)).scalars():
                result[file.task_id or 0].append(file)
        return result

    async def events(self, task_id: int, after: int = 0) -> list[Event]:
        query = select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.id > after).order_by(TaskEvent.id)
        async with self.sessions() as session:
            rows = (await session.execute(query)).scalars()
            return [Event(r.id, r.task_id, r.type, r.message) for r in rows]

    async def queue_position(self, task: Task) -> int:
        """How many queued tasks of the same model are claimed before this one (0 = next), in today's claim order.

        Exact within a priority; a claim at a higher one can move a project behind another on equal turns.
        """
        ranked = self._ranked([task.model])
        order = func.row_number().over(order_by=self._claim_order(ranked)) - 1
        positions = select(ranked.c.id, order.label("position")).subquery()
        query = select(positions.c.position).where(positions.c.id == task.id)
        async with self.sessions() as session:
            position = (await session.execute(query)).scalar_one_or_none()
            if position is not None:
                return int(position)
            # Its URL inputs are still being fetched: every claimable task is ahead of it.
            return int((await session.execute(select(func.count()).select_from(ranked))).scalar_one())

    # -- transitions ----------------------------------------------------------------------------

    async def record(  # noqa: C901 -- to become named transitions (issue 10, section 3)
        self,
        task_id: int,
        event_type: str,
        message: Any = None,
        *,
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
        outputs: Sequence[File] = (),
        live_extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Task | None:
        """Append an event and apply ``fields`` (plus the status, for lifecycle events) atomically.

        ``expect`` restricts the statuses the task may be in; ``worker_id`` requires that worker to
        still hold the lease. ``live_extra`` is merged into the published copy of a dict message only: large,
        short-lived data (step previews) that subscribers see live and the event log does not keep.
        Returns the updated task, or ``None`` when the guard failed.
        """
        now = time.time()
        values = dict(fields)
        if event_type in LIFECYCLE:
            values["status"] = event_type
            stamp = _TIMESTAMP.get(event_type)
            if stamp:
                values.setdefault(stamp, now)
        if event_type in TERMINAL or event_type == "task_queue":
            values.update(worker_id=None, lease_until=None)
        async with self.sessions.begin() as session:
            conditions = [Task.id == task_id]
            if expect is not None:
                conditions.append(Task.status.in_(list(expect)))
            if worker_id is not None:
                conditions.append(Task.worker_id == worker_id)
            if values:
                guarded: Any = update(Task).where(*conditions).values(**values).returning(Task.id)
            else:
                guarded = select(Task.id).where(*conditions)
            if (await session.execute(guarded)).scalar_one_or_none() is None:
                return None
            task = await session.get(Task, task_id)
            if task is None:
                return None
            if outputs:
                await add_files(session, self.keys, outputs)
            if callable(message):
                message = message()
            hook = _WEBHOOK_EVENTS.get(event_type)
            wanted = bool(task.callback_url) and hook in (task.callback_events or ["completed"])
            if wanted and (hook != "progress" or await self._progress_due(session, task_id, now)):
                payload = {"event": hook, "taskid": str(task_id), "status": task.status, "progress": task.progress}
                delivery = WebhookDelivery(
                    task_id=task_id, url=task.callback_url, event=hook, payload=payload, next_attempt=now, created=now
                )
                session.add(delivery)
            row = TaskEvent(task_id=task_id, type=event_type, message=message, created=now)
            session.add(row)
            await session.flush()
            if live_extra and isinstance(message, dict):
                message = {**message, **live_extra}
            event = Event(row.id, task_id, event_type, message)
            unsuccessful = event_type == "task_cancel" or (event_type in TERMINAL and task.pexit != PEXIT_OK)
            dropped = await self._delete_files(session, [task_id], ("input",)) if unsuccessful else []
        await self._delete_blobs(dropped)
        await self.hub.publish(event)
        return task

    @staticmethod
    async def _progress_due(session: AsyncSession, task_id: int, now: float) -> bool:
        """Progress callbacks are throttled to one a second per task (steps can be much faster)."""
        query = select(func.max(WebhookDelivery.created)).where(
            WebhookDelivery.task_id == task_id, WebhookDelivery.event == "progress"
        )
        last = (await session.execute(query)).scalar_one_or_none()
        return last is None or now - last >= PROGRESS_WEBHOOK_SECONDS

    def _ranked(self, models: Sequence[str], *conditions: Any) -> Subquery:
        """Claimable tasks of ``models`` with what orders them: priority first, then projects in turn.

        ``turn`` numbers each project's tasks of one priority oldest-first; between projects on the same
        turn, the one a worker served least recently goes first. So a project with 300 queued tasks and
        one with 1 alternate, instead of the second waiting for all 300.
        """
        turn = func.row_number().over(partition_by=(Task.project_id, Task.priority), order_by=Task.id)
        return (
            select(
                Task.id,
                Task.num_images,
                Task.priority,
                turn.label("turn"),
                Project.last_claimed.label("served"),
            )
            .join(Project, Project.id == Task.project_id)
            .where(
                Task.status == "task_queue",
                Task.model.in_(list(models)),
                Task.inputs_ready.is_(True),
                *conditions,
            )
            .subquery()
        )

    @staticmethod
    def _claim_order(ranked: Subquery) -> tuple[Any, ...]:
        return (ranked.c.priority.desc(), ranked.c.turn, ranked.c.served, ranked.c.id)

    async def claim_next(self, worker_id: str, models: Sequence[str], lease_seconds: float) -> Task | None:
        """Take the next claimable task of one of ``models`` (see ``_ranked``); None if there is none."""
        for _ in range(5):
            ranked = self._ranked(models)
            candidate = select(ranked.c.id).order_by(*self._claim_order(ranked)).limit(1)
            async with self.sessions() as session:
                task_id = (await session.execute(candidate)).scalar_one_or_none()
            if task_id is None:
                return None
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
        and across projects, which take turns as in ``claim_next``). One conditional UPDATE: the candidates
        in claim order whose running sum of images fits in ``room``.
        """
        if room <= 0:
            return []
        ranked = self._ranked([model], Task.width == width, Task.height == height, Task.has_inputs.is_(False))
        taken = func.sum(ranked.c.num_images).over(order_by=self._claim_order(ranked))
        running = select(ranked.c.id, taken.label("taken")).subquery()
        fitting = select(running.c.id).where(running.c.taken <= room)
        return await self._claim_where(Task.id.in_(fitting), worker_id, lease_seconds)

    async def waiting_for(self, model: str, width: int, height: int) -> tuple[int, bool]:
        """Claimable work of ``model``: the images of text-to-image tasks at ``width`` x ``height``, and whether
        any other task (another shape, or with references) is waiting. Read while a batch is being formed."""
        same = (Task.width == width) & (Task.height == height) & Task.has_inputs.is_(False)
        query = select(
            func.coalesce(func.sum(case((same, Task.num_images), else_=0)), 0),
            func.count(Task.id).filter(~same),
        ).where(Task.status == "task_queue", Task.model == model, Task.inputs_ready.is_(True))
        async with self.sessions() as session:
            images, others = (await session.execute(query)).one()
        return int(images), int(others) > 0

    async def _claim(self, task_id: int, worker_id: str, lease_seconds: float) -> Task | None:
        claimed = await self._claim_where(Task.id == task_id, worker_id, lease_seconds)
        return claimed[0] if claimed else None

    async def _claim_where(self, which: Any, worker_id: str, lease_seconds: float) -> list[Task]:
        now = time.time()
        claim = (
            update(Task)
            .where(which, Task.status == "task_queue", Task.inputs_ready.is_(True))
            .values(
                status="task_accept",
                accepttime=now,
                worker_id=worker_id,
                lease_until=now + lease_seconds,
                attempts=Task.attempts + 1,
            )
            .returning(Task.id, Task.project_id)
        )
        events: list[Event] = []
        async with self.sessions.begin() as session:
            rows = sorted((await session.execute(claim)).all())
            if not rows:
                return []
            projects = sorted({project_id for _, project_id in rows})
            await session.execute(update(Project).where(Project.id.in_(projects)).values(last_claimed=now))
            accepted = [
                TaskEvent(task_id=task_id, type="task_accept", message=None, created=now) for task_id, _ in rows
            ]
            session.add_all(accepted)
            await session.flush()
            events = [Event(row.id, row.task_id, row.type, None) for row in accepted]
            query = select(Task).where(Task.id.in_([task_id for task_id, _ in rows])).order_by(Task.id)
            tasks = list((await session.execute(query)).scalars())
        for event in events:
            await self.hub.publish(event)
        return tasks

    # -- URL inputs, fetched before a task can be claimed (preprocess.py) -----------------------------

    async def claim_inputs(
        self, limit: int, busy: dict[int, int], per_project: int, lease_seconds: float
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
                Task.status == "task_queue",
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
                    Task.status == "task_queue",
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

    async def stage_inputs(self, task_id: int, job: dict[str, Any], files: Sequence[File]) -> bool:
        """Point the task at its fetched inputs (now blobs) and make it claimable; False if it left the queue."""
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.status == "task_queue", Task.inputs_ready.is_(False))
            .values(job=job, inputs_ready=True, inputs_lease_until=None)
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            if (await session.execute(stmt)).scalar_one_or_none() is None:
                return False
            for file in files:
                file.task_id = task_id
            await add_files(session, self.keys, files)
        return True

    async def fail_inputs(self, task_id: int, message: str) -> bool:
        """End a queued task whose URL inputs could not be had: ``task_preprocess_start`` takes it out of the
        queue (so neither a cancel nor a claim can interleave), then Wiro's closing sequence with pexit 2."""
        started = await self.record(task_id, "task_preprocess_start", expect=["task_queue"], inputs_lease_until=None)
        if started is None:
            return False
        return await self.fail(task_id, PEXIT_INPUT_ERROR, message, expect=["task_preprocess_start"])

    async def heartbeat(self, task_id: int, worker_id: str, lease_seconds: float) -> str | None:
        """Extend the lease. Returns the pending stop request ("", "cancel", "kill"), or None if the lease is lost."""
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.worker_id == worker_id, Task.status.in_(list(RUNNING)))
            .values(lease_until=time.time() + lease_seconds)
            .returning(Task.stop_requested)
        )
        async with self.sessions.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def request_stop(self, task_id: int, kind: str) -> bool:
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.status.in_(list(RUNNING)))
            .values(stop_requested=kind)
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    async def cancel_queued(self, task_id: int) -> Task | None:
        return await self.record(
            task_id, "task_cancel", "cancelled", expect=["task_queue"], pexit=PEXIT_CANCELED, debugerror="Cancelled."
        )

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
            task = await self.record(
                task_id,
                "task_queue",
                None,
                expect=RUNNING,
                worker_id=worker_id,
                debugerror=f"Worker {worker_id} was lost during attempt {attempts}; the task was queued again.\n",
                stop_requested="",
                dispatched_at=None,
            )
            return task is not None
        message = f"Worker lost during attempt {attempts} of {max_attempts}; the task was not retried again."
        return await self.fail(task_id, PEXIT_WORKER_LOST, message, expect=RUNNING, worker_id=worker_id)

    async def fail(
        self,
        task_id: int,
        pexit: str,
        message: str,
        *,
        raw: str = "",
        output: str = "",
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
    ) -> bool:
        """End a task as failed, with Wiro's closing sequence: the error, the logs, then task_postprocess_end."""
        first = await self.record(task_id, "task_error", message, expect=expect, worker_id=worker_id)
        if first is None:
            return False
        # Each step keeps the lease guard: if the reaper re-queued the task in between (this worker froze past
        # its lease), the rest is not written and the task cannot end twice.
        closing: list[tuple[str, Any, dict[str, Any]]] = [
            ("task_output_full", {"raw": output}, {}),
            ("task_error_full", {"raw": raw or message}, {}),
            ("task_end", None, {}),
            ("task_postprocess_start", None, {}),
            ("task_postprocess_end", [], {"pexit": pexit, "debugerror": message, "debugoutput": output}),
        ]
        for event_type, event_message, fields in closing:
            if await self.record(task_id, event_type, event_message, worker_id=worker_id, **fields) is None:
                return False
        return True

    async def undispatched(self, limit: int = 100) -> list[tuple[int, str, int]]:
        """Queued tasks no dispatcher has sent yet (new, or re-queued by the reaper): (id, model, priority)."""
        query = (
            select(Task.id, Task.model, Task.priority)
            .where(Task.status == "task_queue", Task.dispatched_at.is_(None), Task.inputs_ready.is_(True))
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

    # -- deleting files ---------------------------------------------------------------------------

    async def delete_task_files(self, task_id: int) -> int:
        """Task/InputOutputDelete: the input and output files of a task, rows and bytes; returns how many."""
        async with self.sessions.begin() as session:
            keys = await self._delete_files(session, [task_id], ("input", "output"))
        await self._delete_blobs(keys)
        return len(keys)

    async def expire_files(self, before: float, limit: int = 500) -> int:
        """Retention: inputs and outputs of ended tasks created before ``before``; returns how many went."""
        ended = select(Task.id).where(Task.status.in_(list(TERMINAL)))
        query = (
            select(File.id, File.blob_key)
            .where(File.role.in_(["input", "output"]), File.created < before, File.task_id.in_(ended))
            .limit(limit)
        )
        async with self.sessions.begin() as session:
            rows = (await session.execute(query)).all()
            if rows:
                await session.execute(delete(File).where(File.id.in_([row.id for row in rows])))
        await self._delete_blobs([row.blob_key for row in rows])
        return len(rows)

    @staticmethod
    async def _delete_files(session: AsyncSession, task_ids: Sequence[int], roles: Sequence[str]) -> list[str]:
        """Delete the rows in the caller's transaction; returns their blob keys, deleted once it commits."""
        stmt = delete(File).where(File.task_id.in_(list(task_ids)), File.role.in_(list(roles))).returning(File.blob_key)
        return list((await session.execute(stmt)).scalars())

    async def _delete_blobs(self, keys: Sequence[str]) -> None:
        # Rows first, then bytes: a crash in between leaves unreferenced bytes, never a row without its file.
        for key in keys:
            try:
                await asyncio.to_thread(self.blobs.delete, key)
            except Exception:
                log.exception("could not delete blob %s", key)


def _work(job: dict[str, Any]) -> int:
    """A job's work for the quota: images x pixels."""
    return int(job["num_images"]) * int(job["width"]) * int(job["height"])


PROGRESS_WEBHOOK_SECONDS = 1.0
_WEBHOOK_EVENTS = {
    "task_start": "start",
    "task_output": "progress",
    "task_postprocess_end": "completed",
    "task_cancel": "completed",
}

_TIMESTAMP = {
    "task_accept": "accepttime",
    "task_preprocess_start": "preprocessstarttime",
    "task_preprocess_end": "preprocessendtime",
    "task_assign": "assigntime",
    "task_start": "starttime",
    "task_end": "endtime",
    "task_postprocess_start": "postprocessstarttime",
    "task_postprocess_end": "postprocessendtime",
    "task_cancel": "canceltime",
}
