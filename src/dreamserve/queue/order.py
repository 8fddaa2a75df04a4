"""The claim order (fair share): which claimable tasks go first, and a queued task's position in that order.

Priority first; within a priority, each project's tasks are numbered oldest-first (its turns), and between
projects on the same turn the one a worker served least recently goes first. Everything here is read from the
claim index, a priority at a time: never a ranking of the whole queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, false, func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.queue.base import UNANSWERED, StoreBase, direct
from dreamserve.queue.db import Project, Task
from dreamserve.status import TaskStatus


def claimable(models: Sequence[str], *conditions: Any) -> tuple[Any, ...]:
    """Queued tasks of ``models`` a worker may claim (their inputs are stored): the claim index's prefix."""
    return (Task.status == TaskStatus.QUEUE, Task.model.in_(list(models)), Task.inputs_ready == true(), *conditions)


def same_shape(width: int, height: int) -> tuple[Any, ...]:
    """Text-to-image tasks of one size: what may share a pipeline call."""
    return (Task.has_inputs == false(), Task.width == width, Task.height == height)


async def top_priority(session: AsyncSession, where: Sequence[Any], below: int | None = None) -> int | None:
    top = select(func.max(Task.priority)).where(*where)
    if below is not None:
        top = top.where(Task.priority < below)
    priority: int | None = (await session.execute(top)).scalar_one_or_none()
    return priority


async def heads(session: AsyncSession, level: Sequence[Any]) -> list[tuple[int, float, int]]:
    """Every project with claimable tasks at one priority (``level``): its id, its last claim and the id of its
    oldest such task (its first turn), one seek of the claim index each."""
    first = select(Task.id).where(*level, Task.project_id == Project.id).order_by(Task.id).limit(1)
    found = select(Project.id, Project.last_claimed, first.scalar_subquery().label("first")).subquery()
    rows = (await session.execute(select(found).where(found.c.first.is_not(None)))).all()
    return [(int(project_id), float(served), int(first_id)) for project_id, served, first_id in rows]


async def turns(session: AsyncSession, level: Sequence[Any], depth: int) -> list[tuple[int, int]]:
    """The first ``depth`` turns of every project at one priority (``level``), in claim order."""
    ranked: list[tuple[int, float, int, int]] = []
    for project_id, served, _ in await heads(session, level):
        query = select(Task.id, Task.num_images).where(*level, Task.project_id == project_id)
        for turn, (task_id, images) in enumerate(await session.execute(query.order_by(Task.id).limit(depth))):
            ranked.append((turn, served, int(task_id), int(images)))
    return [(task_id, images) for _, _, task_id, images in sorted(ranked)]


async def in_claim_order(session: AsyncSession, where: Sequence[Any], room: int) -> list[tuple[int, int]]:
    """The first claimable tasks (``where``) in claim order, ``(id, num_images)``, while their images fit in
    ``room``: priority first, then projects in turn.

    So a project with 300 queued tasks and one with 1 alternate, instead of the second waiting for all 300. At
    most ``room`` tasks of each project are read at each priority.
    """
    chosen: list[tuple[int, int]] = []
    taken = 0
    below: int | None = None
    while taken < room:
        priority = await top_priority(session, where, below)
        if priority is None:
            break
        level = (*where, Task.priority == priority)
        for task_id, images in await turns(session, level, room):
            if taken + images > room:
                return chosen
            taken += images
            chosen.append((task_id, images))
        below = priority
    return chosen


def turn_counts(level: Sequence[Any], turn: Any) -> Any:
    """Per project with claimable tasks (``level``: one priority): its last claim, the id of its task on
    ``turn`` (None when it has fewer), and how many of its tasks come on earlier turns."""
    mine = (*level, Task.project_id == Project.id)
    nth = select(Task.id).where(*mine).order_by(Task.id).offset(turn - 1).limit(1).scalar_subquery()
    fewer = select(func.count()).where(*mine).scalar_subquery()  # evaluated only when it has fewer than turn
    before = case((nth.is_not(None), turn - 1), else_=fewer)
    first = select(Task.id).where(*mine).order_by(Task.id).limit(1).scalar_subquery()
    rows = select(Project.id, Project.last_claimed, nth.label("nth"), before.label("before"), first.label("first"))
    ranked = rows.subquery()
    return select(ranked.c.id, ranked.c.last_claimed, ranked.c.nth, ranked.c.before).where(ranked.c.first.is_not(None))


def count_ahead(task: Task, ahead: int, rows: Sequence[Any]) -> int:
    """``ahead`` (the tasks at higher priorities) plus, from ``turn_counts``'s rows, every project's tasks on
    earlier turns and those on the same turn that go first."""
    served = {project_id: last for project_id, last, _, _ in rows}.get(task.project_id, 0.0)
    for project_id, last, nth, before in rows:
        ahead += int(before)  # its tasks on earlier turns
        if project_id != task.project_id and nth is not None and (last, nth) < (served, task.id):
            ahead += 1  # its task on the same turn goes first
    return ahead


class Positions(StoreBase):
    async def queue_position(self, task: Task) -> int:
        """How many queued tasks of the same model are claimed before this one (0 = next), in today's claim order.

        Exact within a priority; a claim at a higher one can move a project behind another on equal turns.
        Counted on the claim index, never by ranking the queue: the tasks at higher priorities, this task's turn
        ``t`` in its project, and per project its first ``t`` tasks at this priority (see ``in_claim_order``), so the
        cost follows the position, not the backlog behind it.
        """
        position = direct(self.reads, lambda reads: reads.queue_position(task))
        if position is not UNANSWERED:
            return position
        # PostgreSQL, or deep in a large backlog: counted off the event loop.
        ready = claimable([task.model])
        async with self.sessions() as session:
            if task.status != TaskStatus.QUEUE or not task.inputs_ready:
                # Its URL inputs are still being fetched: every claimable task is ahead of it.
                return int((await session.execute(select(func.count()).where(*ready))).scalar_one())
            higher = select(func.count()).where(*ready, Task.priority > task.priority)
            ahead = int((await session.execute(higher)).scalar_one())
            level = (*ready, Task.priority == task.priority)
            earlier = select(func.count()).where(*level, Task.project_id == task.project_id, Task.id < task.id)
            turn = int((await session.execute(earlier)).scalar_one()) + 1
            rows = (await session.execute(turn_counts(level, turn))).all()
        return count_ahead(task, ahead, rows)
