"""Task state: the SQL tasks table is the queue, claims are leases, every change is logged.

Every status change goes through ``TaskStore.record``, which updates the task row and appends the
event to ``task_events`` in one transaction, then wakes live sockets. A conditional ``WHERE status
IN (...)`` makes each transition safe against races (a cancel and a claim, say): the loser changes
nothing and learns so from the ``None`` it gets back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.db import File, Task, TaskEvent, WebhookDelivery
from dreamserve.events import LIFECYCLE, RUNNING, TERMINAL, Event, Hub
from dreamserve.keyring import ServerKey, digest, new_salt

# Process exit codes reported as ``pexit`` (Wiro: "0" is success, anything else failure).
PEXIT_OK = "0"
PEXIT_MODEL_ERROR = "1"
PEXIT_INPUT_ERROR = "2"
PEXIT_WORKER_LOST = "3"
PEXIT_CANCELED = "130"
PEXIT_KILLED = "137"


def new_blob_folder() -> str:
    """The blob-store folder of a task's inputs or outputs: random, and unrelated to any access key."""
    return secrets.token_hex(16)


async def add_files(session: AsyncSession, keys: ServerKey, files: Iterable[File]) -> None:
    """Insert file rows with a salt, then store the digest of the access key their id and salt derive."""
    rows = list(files)
    for file in rows:
        file.key_salt = new_salt()
        session.add(file)
    await session.flush()
    for file in rows:
        file.key_digest = digest(keys.accesskey(file))


class TaskStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], hub: Hub, keys: ServerKey) -> None:
        self.sessions = sessions
        self.hub = hub
        self.keys = keys

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
    ) -> Task:
        now = time.time()
        async with self.sessions.begin() as session:
            task = Task(
                project_id=project_id,
                token_salt=new_salt(),
                model=model,
                status="task_queue",
                priority=priority,
                parameters=parameters,
                job=job,
                callback_url=callback_url,
                callback_events=list(callback_events),
                details={},
                createtime=now,
            )
            session.add(task)
            await session.flush()
            task.token_digest = digest(self.keys.token(task))
            for file in inputs:
                file.task_id = task.id
            await add_files(session, self.keys, inputs)
            row = TaskEvent(task_id=task.id, type="task_queue", message=None, created=now)
            session.add(row)
            await session.flush()
            event = Event(row.id, task.id, row.type, None)
        await self.hub.publish(event)
        return task

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
        """How many queued tasks of the same model run before this one (0 = next)."""
        query = select(func.count(Task.id)).where(
            Task.status == "task_queue",
            Task.model == task.model,
            or_(Task.priority > task.priority, (Task.priority == task.priority) & (Task.id < task.id)),
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

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

    async def claim_next(self, worker_id: str, models: Sequence[str], lease_seconds: float) -> Task | None:
        """Take the highest-priority, oldest queued task of one of ``models``; None if there is none."""
        candidate = (
            select(Task.id)
            .where(Task.status == "task_queue", Task.model.in_(list(models)))
            .order_by(Task.priority.desc(), Task.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        return await self._claim(candidate, worker_id, lease_seconds)

    async def claim(self, task_id: int, worker_id: str, lease_seconds: float) -> Task | None:
        """Take one given task (a dispatched message names it); None if it is no longer queued."""
        return await self._claim(task_id, worker_id, lease_seconds)

    async def claim_similar(
        self, worker_id: str, model: str, width: int, height: int, room: int, lease_seconds: float
    ) -> list[Task]:
        """Claim queued text-to-image tasks of ``model`` at ``width`` x ``height`` until ``room`` images are taken.

        They run in the same pipeline calls as a task this worker already holds (batching across requests).
        Candidates are read oldest-first by priority, then each is claimed conditionally like any claim.
        """
        query = (
            select(Task.id, Task.job)
            .where(Task.status == "task_queue", Task.model == model)
            .order_by(Task.priority.desc(), Task.id)
            .limit(50)
        )
        async with self.sessions() as session:
            candidates = (await session.execute(query)).all()
        claimed: list[Task] = []
        for task_id, job in candidates:
            fits = (job["width"], job["height"]) == (width, height) and not job.get("inputs")
            if not fits or job["num_images"] > room:
                continue
            task = await self.claim(task_id, worker_id, lease_seconds)
            if task is not None:
                claimed.append(task)
                room -= job["num_images"]
            if room <= 0:
                break
        return claimed

    async def _claim(self, which: Any, worker_id: str, lease_seconds: float) -> Task | None:
        now = time.time()
        claim = (
            update(Task)
            .where(Task.id == which, Task.status == "task_queue")
            .values(
                status="task_accept",
                accepttime=now,
                worker_id=worker_id,
                lease_until=now + lease_seconds,
                attempts=Task.attempts + 1,
            )
            .returning(Task.id)
        )
        async with self.sessions.begin() as session:
            task_id = (await session.execute(claim)).scalar_one_or_none()
            if task_id is None:
                return None
            row = TaskEvent(task_id=task_id, type="task_accept", message=None, created=now)
            session.add(row)
            await session.flush()
            event = Event(row.id, task_id, row.type, None)
            task = await session.get(Task, task_id)
        await self.hub.publish(event)
        return task

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
            .where(Task.status == "task_queue", Task.dispatched_at.is_(None))
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

    async def list_ids(self, project_id: int, *, start: int, limit: int) -> tuple[list[int], int]:
        """Newest first."""
        async with self.sessions() as session:
            total = (
                await session.execute(select(func.count(Task.id)).where(Task.project_id == project_id))
            ).scalar_one()
            query = (
                select(Task.id).where(Task.project_id == project_id).order_by(Task.id.desc()).offset(start).limit(limit)
            )
            return list((await session.execute(query)).scalars()), int(total)


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
