"""The named transitions of a task: one guarded transaction each.

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
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.facts import ImageReport, LogText, Progress, TaskDetails
from dreamserve.queue.base import StoreBase, log
from dreamserve.queue.change import Change
from dreamserve.queue.db import File, Task
from dreamserve.queue.files import add_files
from dreamserve.queue.steps import Step, StepWriter
from dreamserve.status import RUNNING, FileRole, Frame, Pexit, StopKind, TaskStatus

#: What a transition does to the task it has locked.
ChangeStep = Callable[[Change], Awaitable[None]]


@dataclass(frozen=True)
class Success:
    """What a task's success records (``succeed``): its output rows, its log and its details."""

    task_id: int
    outputs: Sequence[File]
    output: str
    details: TaskDetails


class Transitions(StoreBase):
    @functools.cached_property
    def steps(self) -> StepWriter:
        """This process's steps of running tasks, written together (``steps.py``)."""
        return StepWriter(self._write_steps, self._write_step)

    async def _lock(
        self,
        session: AsyncSession,
        task_id: int,
        *,
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
    ) -> Change | None:
        """The task's row locked in ``session`` if it passes the guard (else ``None``), as a ``Change``."""
        conditions = [Task.id == task_id]
        if expect is not None:
            conditions.append(Task.status.in_(list(expect)))
        if worker_id is not None:
            conditions.append(Task.worker_id == worker_id)
        # A write that changes nothing locks the row (PostgreSQL; on SQLite the transaction holds the database)
        # for the rest of the transaction, and returns it: one statement, where a lock and a read were two.
        lock = update(Task).where(*conditions).values(lease_until=Task.lease_until).returning(Task)
        task = (await session.execute(lock)).scalar_one_or_none()
        return None if task is None else Change(self.outbox, session, task, time.time())

    async def _lock_all(self, session: AsyncSession, held: Iterable[tuple[int, str]]) -> dict[tuple[int, str], Task]:
        """The rows of the tasks that these workers hold (task id, worker id), locked in ``session`` by one statement
        (as ``_lock``'s), by (task id, worker id); a task whose guard fails is not among them."""
        keys = sorted(set(held))
        if not keys:
            return {}
        lock = (
            update(Task)
            .where(tuple_(Task.id, Task.worker_id).in_(keys))
            .values(lease_until=Task.lease_until)
            .returning(Task)
        )
        return {(task.id, task.worker_id or ""): task for task in (await session.execute(lock)).scalars()}

    @contextlib.asynccontextmanager
    async def _transition(
        self,
        task_id: int,
        *,
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
    ) -> AsyncIterator[Change | None]:
        """One transaction on one task, if it passes the guard (else ``None``): ``expect`` the statuses it may be
        in, ``worker_id`` the worker that must hold its lease. The task's steps posted before it are written
        first, so its events follow theirs. Once it commits, the blobs of the file rows it deleted go (rows first:
        a crash leaves bytes without a row, never a row without bytes) and its events are published."""
        await self.steps.settle(task_id)
        async with self.sessions.begin() as session:
            change = await self._lock(session, task_id, expect=expect, worker_id=worker_id)
            yield change
            if change is not None:
                await session.flush()
        if change is not None:
            await self._committed(change)

    async def _committed(self, change: Change) -> None:
        """After a transition's commit: the blobs of the file rows it deleted go, and its events are published."""
        await self._delete_blobs(change.dropped)
        for event in change.published():
            await self.hub.publish(event)

    async def _apply_all(self, steps: Sequence[tuple[int, ChangeStep]], worker_id: str) -> list[bool]:
        """A transition of each task (its id, its step), all in one transaction (a batch's members move together),
        each under its own guard (the worker must hold it): whether each passed. Published as ``_transition``."""
        for task_id, _ in steps:
            await self.steps.settle(task_id)
        changes: list[Change | None] = []
        async with self.sessions.begin() as session:
            locked = await self._lock_all(session, [(task_id, worker_id) for task_id, _ in steps])
            now = time.time()
            for task_id, step in steps:
                task = locked.get((task_id, worker_id))
                change = None if task is None else Change(self.outbox, session, task, now)
                if change is not None:
                    await step(change)
                changes.append(change)
            await session.flush()
        for change in changes:
            if change is not None:
                await self._committed(change)
        return [change is not None for change in changes]

    async def _advance_all(self, task_ids: Sequence[int], status: TaskStatus, worker_id: str) -> list[bool]:
        return await self._apply_all(
            [(task_id, lambda change: change.advance(status)) for task_id in task_ids], worker_id
        )

    async def _apply(
        self,
        task_id: int,
        step: Callable[[Change], Awaitable[None]],
        *,
        expect: Iterable[str] | None = None,
        worker_id: str | None = None,
    ) -> bool:
        """A transition of one step (``_transition``'s guard, then ``step``); False if the guard failed."""
        async with self._transition(task_id, expect=expect, worker_id=worker_id) as change:
            if change is None:
                return False
            await step(change)
        return True

    async def _advance(self, task_id: int, status: TaskStatus, worker_id: str) -> bool:
        return await self._apply(task_id, lambda change: change.advance(status), worker_id=worker_id)

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

    async def assign_all(self, task_ids: Sequence[int], worker_id: str) -> list[bool]:
        """``assign`` of a batch's members in one transaction: whether each passed its guard."""
        return await self._advance_all(task_ids, TaskStatus.ASSIGN, worker_id)

    def post_start(self, task_id: int, worker_id: str) -> asyncio.Future[bool]:
        """``start`` without waiting for it to be written: with the process's steps, before the task's first."""
        return self.steps.post(Step(task_id, worker_id, status=TaskStatus.START))

    async def progress(self, task_id: int, worker_id: str, progress: Progress) -> bool:
        """A denoising step (``task_output``), written with the other steps of this process (``steps.py``): it is
        kept on the row and in the log without its preview (large, short-lived), which only goes to live
        subscribers. Returns once written: whether the worker still held the task."""
        written = self.post_progress(task_id, worker_id, progress)
        await self.steps.settle(task_id)
        return await written

    def post_progress(self, task_id: int, worker_id: str, progress: Progress) -> asyncio.Future[bool]:
        """``progress`` without waiting for it to be written (a supervisor goes on reading its model process)."""
        return self.steps.post(Step(task_id, worker_id, progress=progress))

    async def _write_steps(self, take: Callable[[], list[Step]]) -> list[bool]:
        """The steps handed over until the transaction began, in it, each guarded as its own transition was: each
        task's row locked once, then each step's rows, event and callback in order (the latest progress is
        written once, at the flush)."""
        changes: list[Change | None] = []
        async with self.sessions.begin() as session:
            steps = take()
            locked = await self._lock_all(session, [(step.task_id, step.worker_id) for step in steps])
            for step in steps:
                task = locked.get((step.task_id, step.worker_id))
                changes.append(
                    None if task is None else await self._step(Change(self.outbox, session, task, step.posted), step)
                )
            await session.flush()
        for change in changes:
            for event in change.published() if change is not None else ():
                try:
                    await self.hub.publish(event)
                except Exception:  # written: a socket reads it from the log; writing it again would double it
                    log.exception("could not publish event %s of task %s", event.id, event.task_id)
        return [change is not None for change in changes]

    async def _write_step(self, step: Step) -> bool:
        return (await self._write_steps(lambda: [step]))[0]

    async def _step(self, change: Change, step: Step) -> Change:
        """One step's rows and event, on its task's locked row (as it stands after the steps before it)."""
        if step.status is not None:
            await change.advance(step.status)
        elif step.image is not None:
            await add_files(change.session, self.keys, [step.image])
            await change.event(Frame.OUTPUT_IMAGE, ImageReport(index=step.image.position, name=step.image.name))
        elif step.progress is not None:
            stored = step.progress.stored()
            change.task.progress = stored
            await change.event(Frame.OUTPUT, stored, live=step.progress if step.progress.preview else None)
        return change

    async def image_saved(self, task_id: int, worker_id: str, file: File) -> bool:
        """One image of the running attempt is stored: its ``partial`` row makes its URL work at once; the event
        (``Frame.OUTPUT_IMAGE``, no URL nor key: the API renders them from the row) tells followers (Ark's stream).
        Written with the process's steps (``post_image``); returns once written."""
        written = self.post_image(task_id, worker_id, file)
        await self.steps.settle(task_id)
        return await written

    def post_image(self, task_id: int, worker_id: str, file: File) -> asyncio.Future[bool]:
        """``image_saved`` without waiting for it to be written; the future says whether the worker held the task."""
        return self.steps.post(Step(task_id, worker_id, image=file))

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
        return (await self.begin_postprocess_all([(task_id, output)], worker_id))[0]

    async def begin_postprocess_all(self, outputs: Sequence[tuple[int, str]], worker_id: str) -> list[bool]:
        """``begin_postprocess`` of a batch's members (task id, its log), in one transaction."""

        def step(output: str) -> ChangeStep:
            async def begin(change: Change) -> None:
                await change.event(Frame.OUTPUT_FULL, LogText(raw=output))
                await change.advance(TaskStatus.END)
                await change.advance(TaskStatus.POSTPROCESS_START)

            return begin

        return await self._apply_all([(task_id, step(output)) for task_id, output in outputs], worker_id)

    async def succeed(
        self, task_id: int, worker_id: str, outputs: Sequence[File], output: str, details: TaskDetails
    ) -> bool:
        """The task's end (``task_postprocess_end``, pexit 0) with its output rows (the attempt's ``partial`` rows
        become outputs here) and its details; the ``completed`` callback."""
        return (await self.succeed_all([Success(task_id, outputs, output, details)], worker_id))[0]

    async def succeed_all(self, successes: Sequence[Success], worker_id: str) -> list[bool]:
        """``succeed`` of a batch's members, in one transaction."""

        def step(success: Success) -> ChangeStep:
            async def succeed(change: Change) -> None:
                await add_files(change.session, self.keys, success.outputs)
                change.task.pexit, change.task.debugoutput = Pexit.OK, success.output
                change.task.details = success.details
                await change.advance(TaskStatus.POSTPROCESS_END)

            return succeed

        return await self._apply_all([(success.task_id, step(success)) for success in successes], worker_id)

    async def cancel(self, task_id: int, kind: StopKind, worker_id: str) -> bool:
        """A running task stopped as asked: ``task_cancel`` with pexit 130 (cancel) or 137 (kill)."""
        return await self._apply(task_id, lambda change: change.cancel(kind), worker_id=worker_id)

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
        return await self._apply(
            task_id,
            lambda change: change.close_failed(pexit, message, raw=raw, output=output),
            expect=expect,
            worker_id=worker_id,
        )

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
