"""One transition being written: the task's locked row, changed in place, the events it appends (each with the
callback it owes) and the file rows it deletes, in one transaction (``transitions.Transitions._transition`` opens
it, publishes its events and deletes the rows' bytes once it commits)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.facts import DeletedInput, LogText
from dreamserve.queue.base import Outbox
from dreamserve.queue.db import File, Task, TaskEvent
from dreamserve.queue.events import Event, Message, dump_message
from dreamserve.queue.files import delete_rows
from dreamserve.queue.quotas import release_task
from dreamserve.status import FINAL, LIFECYCLE, FileRole, Frame, Pexit, StopKind, TaskStatus

#: The task's column each status stamps with the time it was reached.
TIMESTAMP = {
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


@dataclass
class Change:
    """A transition being written: the task's locked row, changed in place, and the events appended, published
    once the transaction commits."""

    outbox: Outbox
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
        await self.outbox.event(self.session, self.task, event_type, self.now)

    async def advance(self, status: TaskStatus, message: Message = None) -> None:
        """Move the task to ``status`` (stamping its time), and append that event. Leaving the running statuses
        gives the lease up; ending takes the task off its project's unfinished counters."""
        task = self.task
        if status in FINAL and task.status not in FINAL:
            await release_task(self.session, task)
        task.status = status
        stamp = TIMESTAMP.get(status)
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
        self.dropped += await delete_rows(self.session, [self.task.id], (role,))

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
