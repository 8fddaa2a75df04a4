"""Task state: the SQL tasks table is the queue, claims are leases, every change is logged.

Every change of a task is one named transition (``accept`` by the claims, ``begin_preprocess``, ``assign``,
``start``, ``progress``, ``image_saved``, ``begin_postprocess``, ``succeed``, ``cancel``, ``requeue``, ``fail``, ...):
one transaction that updates the row, appends its events to ``task_events`` and writes the callback outbox
rows they owe (``webhooks.Outbox``), then wakes live sockets. Each is guarded (the statuses the task may be
in, the worker that must hold its lease), so racing transitions (a cancel and a claim, say) are safe: the
loser changes nothing and learns so from what it gets back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import BigInteger, and_, case, cast, delete, false, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from dreamserve.errors import QuotaExceeded, StorageFull
from dreamserve.facts import DeletedInput, ImageReport, LogText, Progress, TaskDetails
from dreamserve.jobs import TaskJob
from dreamserve.queue.db import File, Folder, Project, Task, TaskEvent
from dreamserve.queue.events import Event, Hub, Message, dump_message, load_message
from dreamserve.queue.keyring import ServerKey, digest, new_salt
from dreamserve.status import FINAL, LIFECYCLE, RUNNING, FileRole, Frame, Pexit, StopKind, TaskStatus

log = logging.getLogger(__name__)


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


#: The roles of a task's file rows: Task/InputOutputDelete and retention delete every one of them. The fourth role,
#: ``upload`` (File/Upload), belongs to no task: File/Delete, File/FolderDelete and retention delete those.
TASK_ROLES = (FileRole.INPUT, FileRole.OUTPUT, FileRole.PARTIAL)


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
    if quota.max_files and files + count > quota.max_files:
        raise StorageFull(
            f"Storage full: this project stores {files:,} files and may store {quota.max_files:,} "
            "(max_project_files). Delete some (File/Delete, File/FolderDelete, Task/InputOutputDelete) first."
        )
    if quota.max_bytes and int(stored) + size > quota.max_bytes:
        raise StorageFull(
            f"Storage full: this project stores {int(stored):,} bytes, this adds {size:,} and the limit is "
            f"{quota.max_bytes:,} (max_project_bytes). Delete some files (File/Delete, File/FolderDelete, "
            "Task/InputOutputDelete) first."
        )


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


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: whether this worker still holds the task's lease, and the stop asked for."""

    held: bool
    stop: StopKind | None = None


class Blobs(Protocol):
    """What the store needs of ``blobs.BlobStore`` (a tier above it, passed in): deleting a task's files."""

    def delete(self, key: str) -> None: ...


class Outbox(Protocol):
    """What the store needs of ``webhooks.Outbox`` (a tier above it, passed in): the callback rows an event owes,
    written in the event's transaction."""

    async def event(self, session: AsyncSession, task: Task, event_type: str, now: float) -> None: ...

    def refused(self, session: AsyncSession, task_id: int, url: str, reason: str, now: float) -> None: ...


#: Task/List's sort keys (Wiro sends ``sort: "id"``); ties are broken by id.
LIST_SORTS: dict[str, InstrumentedAttribute[Any]] = {
    "id": Task.id,
    "createtime": Task.createtime,
    "starttime": Task.starttime,
    "endtime": Task.endtime,
    "status": Task.status,
}


class TaskStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        hub: Hub,
        keys: ServerKey,
        blobs: Blobs,
        outbox: Outbox,
        storage: StorageQuota | None = None,
    ) -> None:
        self.sessions = sessions
        self.hub = hub
        self.keys = keys
        #: Where the bytes of the task files live: inputs of failed and cancelled tasks are deleted at their end.
        self.blobs = blobs
        self.outbox = outbox
        #: What a project may store: Run's uploaded inputs are counted against it as the task is created.
        self.storage = storage or StorageQuota()

    # -- creating and reading -------------------------------------------------------------------

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
        async with self.sessions.begin() as session:
            if quota is not None and (quota.max_tasks or quota.max_megapixels):
                await self._check_quota(session, project_id, quota, job.work)
            if inputs:
                await check_storage(session, project_id, self.storage, sum(f.size for f in inputs), len(inputs))
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
            session.add(task)
            await session.flush()
            task.token_digest = digest(self.keys.token(task))
            for file in inputs:
                file.task_id = task.id
            await add_files(session, self.keys, inputs)
            if refused_callback is not None:
                self.outbox.refused(session, task.id, *refused_callback, now)
            row = TaskEvent(task_id=task.id, type=TaskStatus.QUEUE, message=None, created=now)
            session.add(row)
            await session.flush()
            event = Event(row.id, task.id, row.type, None)
        await self.hub.publish(event)
        return task

    @staticmethod
    async def _check_quota(session: AsyncSession, project_id: int, quota: Quota, pixels: int) -> None:
        await lock_project(session, project_id)
        work = func.coalesce(func.sum(cast(Task.num_images, BigInteger) * Task.width * Task.height), 0)
        query = select(func.count(Task.id), work).where(
            Task.project_id == project_id, Task.status.not_in(sorted(FINAL))
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

    async def files(self, task_ids: Iterable[int], role: FileRole | Sequence[FileRole]) -> dict[int, list[File]]:
        """The file rows of ``role`` (or of any of several roles, in one query) of each task, by position."""
        ids = list(task_ids)
        result: dict[int, list[File]] = {i: [] for i in ids}
        if not ids:
            return result
        roles = [role] if isinstance(role, str) else list(role)
        query = select(File).where(File.task_id.in_(ids), File.role.in_(roles)).order_by(File.position)
        async with self.sessions() as session:
            for file in (await session.execute(query)).scalars():
                result[file.task_id or 0].append(file)
        return result

    async def events(self, task_id: int, after: int = 0) -> list[Event]:
        query = select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.id > after).order_by(TaskEvent.id)
        async with self.sessions() as session:
            return [_stored_event(row) for row in (await session.execute(query)).scalars()]

    async def event_ids_after(self, after: int) -> list[tuple[int, int]]:
        """``(event id, task id)`` of every event after ``after``, of all tasks: a range of the primary key."""
        query = select(TaskEvent.id, TaskEvent.task_id).where(TaskEvent.id > after).order_by(TaskEvent.id)
        async with self.sessions() as session:
            return [(int(id_), int(task_id)) for id_, task_id in (await session.execute(query)).all()]

    async def last_event_id(self) -> int:
        async with self.sessions() as session:
            return int((await session.execute(select(func.max(TaskEvent.id)))).scalar_one_or_none() or 0)

    async def events_after(self, cursors: Mapping[int, int]) -> list[Event]:
        """The events of several tasks, each after its own id (``{task_id: last id seen}``), in id order: one
        query where a follower per task would make one each."""
        if not cursors:
            return []
        query = select(TaskEvent).where(
            or_(*(and_(TaskEvent.task_id == task_id, TaskEvent.id > after) for task_id, after in cursors.items()))
        )
        async with self.sessions() as session:
            return [_stored_event(row) for row in (await session.execute(query.order_by(TaskEvent.id))).scalars()]

    async def queue_position(self, task: Task) -> int:
        """How many queued tasks of the same model are claimed before this one (0 = next), in today's claim order.

        Exact within a priority; a claim at a higher one can move a project behind another on equal turns.
        Counted on the claim index, never by ranking the queue: the tasks at higher priorities, this task's turn
        ``t`` in its project, and per project its first ``t`` tasks at this priority (see ``_in_claim_order``), so the
        cost follows the position, not the backlog behind it.
        """
        claimable = self._claimable([task.model])
        async with self.sessions() as session:
            if task.status != TaskStatus.QUEUE or not task.inputs_ready:
                # Its URL inputs are still being fetched: every claimable task is ahead of it.
                return int((await session.execute(select(func.count()).where(*claimable))).scalar_one())
            higher = select(func.count()).where(*claimable, Task.priority > task.priority)
            ahead = int((await session.execute(higher)).scalar_one())
            level = (*claimable, Task.priority == task.priority)
            earlier = select(func.count()).where(*level, Task.project_id == task.project_id, Task.id < task.id)
            turn = int((await session.execute(earlier)).scalar_one()) + 1
            rows = (await session.execute(self._turn_counts(level, turn))).all()
        served = {project_id: last for project_id, last, _, _ in rows}.get(task.project_id, 0.0)
        for project_id, last, nth, before in rows:
            ahead += int(before)  # its tasks on earlier turns
            if project_id != task.project_id and nth is not None and (last, nth) < (served, task.id):
                ahead += 1  # its task on the same turn goes first
        return ahead

    @staticmethod
    def _turn_counts(level: Sequence[Any], turn: int) -> Any:
        """Per project with claimable tasks (``level``: one priority): its last claim, the id of its task on
        ``turn`` (None when it has fewer), and how many of its tasks come on earlier turns."""
        mine = (*level, Task.project_id == Project.id)
        nth = select(Task.id).where(*mine).order_by(Task.id).offset(turn - 1).limit(1).scalar_subquery()
        fewer = select(func.count()).where(*mine).scalar_subquery()  # evaluated only when it has fewer than turn
        before = case((nth.is_not(None), turn - 1), else_=fewer)
        first = select(Task.id).where(*mine).order_by(Task.id).limit(1).scalar_subquery()
        rows = select(Project.id, Project.last_claimed, nth.label("nth"), before.label("before"), first.label("first"))
        ranked = rows.subquery()
        return select(ranked.c.id, ranked.c.last_claimed, ranked.c.nth, ranked.c.before).where(
            ranked.c.first.is_not(None)
        )

    # -- transitions of a claimed task (the worker's) -----------------------------------------------

    @contextlib.asynccontextmanager
    async def _transition(
        self, task_id: int, *, expect: Iterable[str] | None = None, worker_id: str | None = None
    ) -> AsyncIterator[_Change | None]:
        """One transaction on one task, if it passes the guard (else ``None``): ``expect`` the statuses it may be
        in, ``worker_id`` the worker that must hold its lease. Once it commits, the blobs of the file rows it
        deleted go (rows first: a crash leaves bytes without a row, never a row without bytes) and its events
        are published."""
        async with self.sessions.begin() as session:
            conditions = [Task.id == task_id]
            if expect is not None:
                conditions.append(Task.status.in_(list(expect)))
            if worker_id is not None:
                conditions.append(Task.worker_id == worker_id)
            # A write that changes nothing, to lock the row (the database, on SQLite) for the rest of the transaction.
            lock = update(Task).where(*conditions).values(lease_until=Task.lease_until).returning(Task.id)
            found = (await session.execute(lock)).scalar_one_or_none() is not None
            task = await session.get(Task, task_id) if found else None
            change = None if task is None else _Change(self, session, task, time.time())
            yield change
            if change is not None:
                await session.flush()
        if change is not None:
            await self._delete_blobs(change.dropped)
            for event in change.published():
                await self.hub.publish(event)

    async def _advance(self, task_id: int, status: TaskStatus, worker_id: str) -> bool:
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            await change.advance(status)
        return True

    async def begin_preprocess(self, task_id: int, worker_id: str) -> bool:
        """The worker puts the task's references on local disk (``task_preprocess_start``)."""
        return await self._advance(task_id, TaskStatus.PREPROCESS_START, worker_id)

    async def end_preprocess(self, task_id: int, worker_id: str) -> bool:
        return await self._advance(task_id, TaskStatus.PREPROCESS_END, worker_id)

    async def assign(self, task_id: int, worker_id: str) -> bool:
        """The task's job is built and about to be handed to the model process (``task_assign``)."""
        return await self._advance(task_id, TaskStatus.ASSIGN, worker_id)

    async def start(self, task_id: int, worker_id: str) -> bool:
        """The model process took the job (``task_start``; the ``start`` callback)."""
        return await self._advance(task_id, TaskStatus.START, worker_id)

    async def progress(self, task_id: int, worker_id: str, progress: Progress) -> bool:
        """A denoising step (``task_output``): it is kept on the row and in the log without its preview (large,
        short-lived), which only goes to live subscribers."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            change.task.progress = progress.stored()
            await change.event(Frame.OUTPUT, progress.stored(), live=progress if progress.preview else None)
        return True

    async def image_saved(self, task_id: int, worker_id: str, file: File) -> bool:
        """One image of the running attempt is stored: its ``partial`` row makes its URL work at once; the event
        (``Frame.OUTPUT_IMAGE``, no URL nor key: the API renders them from the row) tells followers (Ark's stream)."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            await add_files(change.session, self.keys, [file])
            await change.event(Frame.OUTPUT_IMAGE, ImageReport(index=file.position, name=file.name))
        return True

    async def image_failed(self, task_id: int, worker_id: str, index: int, failure: str) -> bool:
        """One image could not be finished (``failure``: what the client is told); the task's other images go on."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            # Validated, not built: a caller that still hands Ark's error object gets its message read.
            await change.event(Frame.OUTPUT_IMAGE, ImageReport.model_validate({"index": index, "failure": failure}))
        return True

    async def begin_postprocess(self, task_id: int, worker_id: str, output: str) -> bool:
        """The model is done: its log (``task_output_full``), ``task_end``, then ``task_postprocess_start`` while
        the worker stores the images."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            await change.event(Frame.OUTPUT_FULL, LogText(raw=output))
            await change.advance(TaskStatus.END)
            await change.advance(TaskStatus.POSTPROCESS_START)
        return True

    async def succeed(
        self, task_id: int, worker_id: str, outputs: Sequence[File], output: str, details: TaskDetails
    ) -> bool:
        """The task's end (``task_postprocess_end``, pexit 0) with its output rows (the attempt's ``partial`` rows
        become outputs here) and its details; the ``completed`` callback."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            await add_files(change.session, self.keys, outputs)
            change.task.pexit, change.task.debugoutput, change.task.details = Pexit.OK, output, details
            await change.advance(TaskStatus.POSTPROCESS_END)
        return True

    async def cancel(self, task_id: int, kind: StopKind, worker_id: str) -> bool:
        """A running task stopped as asked: ``task_cancel`` with pexit 130 (cancel) or 137 (kill)."""
        async with self._transition(task_id, worker_id=worker_id) as change:
            if change is None:
                return False
            await change.cancel(kind)
        return True

    async def cancel_queued(self, task_id: int) -> Task | None:
        """Task/Cancel (or Kill) of a task still queued; None if it is not queued any more."""
        async with self._transition(task_id, expect=[TaskStatus.QUEUE]) as change:
            if change is None:
                return None
            await change.cancel(StopKind.CANCEL)
        return change.task

    async def requeue(self, task_id: int, note: str, worker_id: str | None, *, refund: bool = False) -> bool:
        """Put a claimed task back in the queue (its worker was lost, or its model process died before or while
        it ran): the note says why (``debugerror``). The attempt's images (``partial`` rows and their bytes) go,
        so the next attempt's are the only ones. ``refund``: the attempt was not the task's own (the model
        process was gone before the task reached it, or another task's kill took it down) and does not count
        against ``max_attempts``."""
        async with self._transition(task_id, expect=RUNNING, worker_id=worker_id) as change:
            if change is None:
                return False
            task = change.task
            task.debugerror, task.stop_requested, task.dispatched_at = note, "", None
            if refund:
                task.attempts = max(0, task.attempts - 1)
            await change.drop_files(FileRole.PARTIAL)
            await change.advance(TaskStatus.QUEUE)
        return True

    async def fail(
        self,
        task_id: int,
        pexit: Pexit,
        message: str,
        *,
        raw: str = "",
        output: str = "",
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
    ) -> bool:
        """End a task as failed, with Wiro's closing sequence in one transaction: the error, the logs, the statuses
        the task has not passed yet, then ``task_postprocess_end`` with ``pexit``. False if the guard failed."""
        async with self._transition(task_id, expect=expect, worker_id=worker_id) as change:
            if change is None:
                return False
            await change.close_failed(pexit, message, raw=raw, output=output)
        return True

    async def fail_inputs(self, task_id: int, message: str) -> bool:
        """End a queued task whose URL inputs could not be had: ``task_preprocess_start`` takes it out of the
        queue (in the same transaction, so neither a cancel nor a claim can interleave), then Wiro's closing
        sequence with pexit 2."""
        async with self._transition(task_id, expect=[TaskStatus.QUEUE]) as change:
            if change is None:
                return False
            change.task.inputs_lease_until = None
            await change.advance(TaskStatus.PREPROCESS_START)
            await change.close_failed(Pexit.BAD_INPUT, message)
        return True

    @staticmethod
    def _claimable(models: Sequence[str], *conditions: Any) -> tuple[Any, ...]:
        """Queued tasks of ``models`` a worker may claim (their inputs are stored): the claim index's prefix."""
        return (Task.status == TaskStatus.QUEUE, Task.model.in_(list(models)), Task.inputs_ready == true(), *conditions)

    async def _in_claim_order(self, session: AsyncSession, where: Sequence[Any], room: int) -> list[tuple[int, int]]:
        """The first claimable tasks (``where``) in claim order, ``(id, num_images)``, while their images fit in
        ``room``: priority first, then projects in turn.

        Each project's tasks of one priority are numbered oldest-first (its turns); between projects on the same
        turn, the one a worker served least recently goes first. So a project with 300 queued tasks and one
        with 1 alternate, instead of the second waiting for all 300. Read from the claim index, a priority at a
        time, at most ``room`` tasks of each project: never a ranking of the whole queue.
        """
        chosen: list[tuple[int, int]] = []
        taken = 0
        below: int | None = None
        while taken < room:
            priority = await self._top_priority(session, where, below)
            if priority is None:
                break
            level = (*where, Task.priority == priority)
            for task_id, images in await self._turns(session, level, room):
                if taken + images > room:
                    return chosen
                taken += images
                chosen.append((task_id, images))
            below = priority
        return chosen

    @staticmethod
    async def _heads(session: AsyncSession, level: Sequence[Any]) -> list[tuple[int, float, int]]:
        """Every project with claimable tasks at one priority (``level``): its id, its last claim and the id of its
        oldest such task (its first turn), one seek of the claim index each."""
        first = select(Task.id).where(*level, Task.project_id == Project.id).order_by(Task.id).limit(1)
        heads = select(Project.id, Project.last_claimed, first.scalar_subquery().label("first")).subquery()
        rows = (await session.execute(select(heads).where(heads.c.first.is_not(None)))).all()
        return [(int(project_id), float(served), int(first_id)) for project_id, served, first_id in rows]

    async def _turns(self, session: AsyncSession, level: Sequence[Any], depth: int) -> list[tuple[int, int]]:
        """The first ``depth`` turns of every project at one priority (``level``), in claim order."""
        ranked: list[tuple[int, float, int, int]] = []
        for project_id, served, _ in await self._heads(session, level):
            query = select(Task.id, Task.num_images).where(*level, Task.project_id == project_id)
            for turn, (task_id, images) in enumerate(await session.execute(query.order_by(Task.id).limit(depth))):
                ranked.append((turn, served, int(task_id), int(images)))
        return [(task_id, images) for _, _, task_id, images in sorted(ranked)]

    @staticmethod
    async def _top_priority(session: AsyncSession, where: Sequence[Any], below: int | None = None) -> int | None:
        top = select(func.max(Task.priority)).where(*where)
        if below is not None:
            top = top.where(Task.priority < below)
        priority: int | None = (await session.execute(top)).scalar_one_or_none()
        return priority

    async def claim_next(self, worker_id: str, models: Sequence[str], lease_seconds: float) -> Task | None:
        """Take the next claimable task of one of ``models`` (see ``_in_claim_order``); None if there is none."""
        for _ in range(5):
            claimable = self._claimable(models)
            async with self.sessions() as session:
                priority = await self._top_priority(session, claimable)
                if priority is None:
                    return None
                heads = await self._heads(session, (*claimable, Task.priority == priority))
            if not heads:
                return None
            _, _, task_id = min(heads, key=lambda head: (head[1], head[2]))  # the least recently served first
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
        same = self._claimable([model], *_same_shape(width, height))
        async with self.sessions() as session:
            fitting = [task_id for task_id, _ in await self._in_claim_order(session, same, room)]
        if not fitting:
            return []
        return await self._claim_where(Task.id.in_(fitting), worker_id, lease_seconds)

    async def waiting_for(self, model: str, width: int, height: int, room: int | None = None) -> tuple[int, bool]:
        """Claimable work of ``model``: the images of text-to-image tasks at ``width`` x ``height`` (counted up to
        ``room`` tasks: enough to fill a batch of ``room`` images), and whether any other task (another shape,
        or with references) is waiting. Read while a batch is being formed, on the shape index: seeks only."""
        claimable = self._claimable([model])
        same = select(Task.num_images).where(*claimable, *_same_shape(width, height))
        counted = same.limit(room).subquery() if room is not None else same.subquery()
        images = select(func.coalesce(func.sum(counted.c.num_images), 0)).scalar_subquery()
        text = (*claimable, Task.has_inputs == false())
        others = or_(
            select(Task.id).where(*claimable, Task.has_inputs == true()).exists(),
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
                TaskEvent(task_id=task_id, type=TaskStatus.ACCEPT, message=None, created=now) for task_id, _ in rows
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

    async def heartbeat(self, task_id: int, worker_id: str, lease_seconds: float) -> Beat:
        """Extend the lease, and read the stop asked for (Task/Cancel, Task/Kill) through the database."""
        stmt = (
            update(Task)
            .where(Task.id == task_id, Task.worker_id == worker_id, Task.status.in_(list(RUNNING)))
            .values(lease_until=time.time() + lease_seconds)
            .returning(Task.stop_requested)
        )
        async with self.sessions.begin() as session:
            requested = (await session.execute(stmt)).scalar_one_or_none()
        if requested is None:
            return Beat(held=False)
        return Beat(held=True, stop=StopKind(requested) if requested else None)

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
        """Task/InputOutputDelete: every file of a task (inputs, outputs, and the partial images an attempt streamed
        before it was cancelled or failed), rows and bytes; returns how many."""
        async with self.sessions.begin() as session:
            keys = await self._delete_files(session, [task_id], TASK_ROLES)
        await self._delete_blobs(keys)
        return len(keys)

    async def delete_project_files(
        self, project_id: int, *, file_id: int | None = None, folders: Sequence[int] = ()
    ) -> int:
        """File/Delete and File/FolderDelete: the uploads of a project with id ``file_id``, or in ``folders``,
        rows and bytes, and the ``folders`` rows themselves; returns how many files went."""
        which = File.id == file_id if file_id is not None else File.folder_id.in_(list(folders))
        stmt = (
            delete(File)
            .where(File.project_id == project_id, File.role == FileRole.UPLOAD, which)
            .returning(File.blob_key)
        )
        async with self.sessions.begin() as session:
            keys = list((await session.execute(stmt)).scalars())
            if folders:
                await session.execute(
                    delete(Folder).where(Folder.project_id == project_id, Folder.id.in_(list(folders)))
                )
        await self._delete_blobs(keys)
        return len(keys)

    async def expire_files(self, before: float, limit: int = 500) -> int:
        """Retention: uploads, and every file of an ended task, created before ``before``; returns how many went."""
        ended = select(Task.id).where(Task.status.in_(list(FINAL)))
        expired = or_(File.role == FileRole.UPLOAD, and_(File.role.in_(TASK_ROLES), File.task_id.in_(ended)))
        query = select(File.id, File.blob_key).where(expired, File.created < before).limit(limit)
        async with self.sessions.begin() as session:
            rows = (await session.execute(query)).all()
            if rows:
                await session.execute(delete(File).where(File.id.in_([row.id for row in rows])))
        await self._delete_blobs([row.blob_key for row in rows])
        return len(rows)

    @staticmethod
    async def _delete_files(session: AsyncSession, task_ids: Sequence[int], roles: Sequence[FileRole]) -> list[str]:
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


@dataclass
class _Change:
    """A transition being written (``TaskStore._transition``): the task's locked row, changed in place, and the
    events appended, published once the transaction commits."""

    store: TaskStore
    session: AsyncSession
    task: Task
    now: float
    #: Each appended event's row, and the message its published copy carries (``live``, else the stored one).
    rows: list[tuple[TaskEvent, Message]] = field(default_factory=list)
    #: Blob keys of the file rows deleted, to delete once the transaction commits.
    dropped: list[str] = field(default_factory=list)

    async def event(self, event_type: str, message: Message = None, *, live: Message = None) -> None:
        """Append an event, and the callback it owes (as the task stands now)."""
        row = TaskEvent(task_id=self.task.id, type=event_type, message=dump_message(message), created=self.now)
        self.session.add(row)
        self.rows.append((row, live if live is not None else message))
        await self.store.outbox.event(self.session, self.task, event_type, self.now)

    async def advance(self, status: TaskStatus, message: Message = None) -> None:
        """Move the task to ``status`` (stamping its time), and append that event. Leaving the running statuses
        gives the lease up."""
        task = self.task
        task.status = status
        stamp = _TIMESTAMP.get(status)
        if stamp is not None:
            setattr(task, stamp, self.now)
        if not status.holds_lease:
            task.worker_id, task.lease_until = None, None
        await self.event(status, message)

    async def cancel(self, kind: StopKind) -> None:
        killed = kind is StopKind.KILL
        task = self.task
        task.pexit = Pexit.KILLED if killed else Pexit.CANCELLED
        task.debugerror = "Killed." if killed else "Cancelled."
        await self.drop_inputs()
        await self.advance(TaskStatus.CANCEL, "killed" if killed else "cancelled")

    async def close_failed(self, pexit: Pexit, message: str, *, raw: str = "", output: str = "") -> None:
        await self.event(Frame.ERROR, message)
        await self.event(Frame.OUTPUT_FULL, LogText(raw=output))
        await self.event(Frame.ERROR_FULL, LogText(raw=raw or message))
        # Statuses only move forward: a task that failed while saving its images does not end again.
        reached = LIFECYCLE.index(self.task.status) if self.task.status in LIFECYCLE else 0
        for status in (TaskStatus.END, TaskStatus.POSTPROCESS_START):
            if LIFECYCLE.index(status) > reached:
                await self.advance(status)
        task = self.task
        task.pexit, task.debugerror, task.debugoutput = pexit, message, output
        await self.drop_inputs()
        await self.advance(TaskStatus.POSTPROCESS_END, [])

    async def drop_files(self, role: FileRole) -> None:
        """Delete the task's file rows of ``role`` in this transaction; their bytes go once it commits."""
        self.dropped += await self.store._delete_files(self.session, [self.task.id], (role,))

    async def drop_inputs(self) -> None:
        """Delete the task's input files, keeping in its details what their URLs derive from: the task echoes the
        inputs it was given whether it ran or not."""
        query = select(File).where(File.task_id == self.task.id, File.role == FileRole.INPUT).order_by(File.position)
        gone = [
            DeletedInput(
                position=file.position,
                id=file.id,
                name=file.name,
                key_salt=file.key_salt,
                accesskey_sealed=file.accesskey_sealed,
            )
            for file in (await self.session.execute(query)).scalars()
        ]
        if gone:
            earlier = self.task.details.deleted_inputs or []
            self.task.details = self.task.details.model_copy(update={"deleted_inputs": [*earlier, *gone]})
        await self.drop_files(FileRole.INPUT)

    def published(self) -> list[Event]:
        """The appended events as published (after the flush gave them ids): with their live messages."""
        return [Event(row.id, row.task_id, row.type, message) for row, message in self.rows]


def _stored_event(row: TaskEvent) -> Event:
    return Event(row.id, row.task_id, row.type, load_message(row.type, row.message))


def _same_shape(width: int, height: int) -> tuple[Any, ...]:
    """Text-to-image tasks of one size: what may share a pipeline call."""
    return (Task.has_inputs == false(), Task.width == width, Task.height == height)


_TIMESTAMP = {
    TaskStatus.ACCEPT: "accepttime",
    TaskStatus.PREPROCESS_START: "preprocessstarttime",
    TaskStatus.PREPROCESS_END: "preprocessendtime",
    TaskStatus.ASSIGN: "assigntime",
    TaskStatus.START: "starttime",
    TaskStatus.END: "endtime",
    TaskStatus.POSTPROCESS_START: "postprocessstarttime",
    TaskStatus.POSTPROCESS_END: "postprocessendtime",
    TaskStatus.CANCEL: "canceltime",
}
