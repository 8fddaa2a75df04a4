"""Reads of the task event log (``task_events``): one task's events, several tasks' after their own cursors, and
the ids of every event after a point (the socket feeds' poller, for writers that could not reach this hub).
Events are written by ``tasks.create``, the claims and the transitions (``change.Change``), in the transaction
of the change they report."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import and_, func, or_, select

from dreamserve.queue.base import UNANSWERED, StoreBase, direct
from dreamserve.queue.db import TaskEvent
from dreamserve.queue.events import Event, load_message


def stored_event(row: TaskEvent) -> Event:
    return Event(row.id, row.task_id, row.type, load_message(row.type, row.message))


class EventLog(StoreBase):
    async def events(self, task_id: int, after: int = 0) -> list[Event]:
        rows = direct(self.reads, lambda reads: reads.task_events(task_id, after))
        if rows is not UNANSWERED:
            return [stored_event(row) for row in rows]
        query = select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.id > after).order_by(TaskEvent.id)
        async with self.sessions() as session:
            return [stored_event(row) for row in (await session.execute(query)).scalars()]

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
            return [stored_event(row) for row in (await session.execute(query.order_by(TaskEvent.id))).scalars()]
