"""What this process's running tasks report as they go (denoising steps, saved images), written for all of its
workers together (group commit).

Each was one write transaction of its own, awaited by its supervisor before it read the model process's next
message: with a fleet on one SQLite writer, 25 supervisors' steps and images took FIFO turns at the write gate,
each holding it across several turns of a busy event loop, each supervisor waited for every one of its own, and a
1 s batch took 2-3 s, so the queue grew (and claims waited behind the steps). Here a step is handed over (``post``)
and the supervisor goes on; one flusher writes every step handed over until its transaction began, in that
transaction, each with its own guard, rows, event and callback, then publishes their events in order. Flushes
start at most every ``tick`` seconds, so the steps of a whole fleet share a few transactions a second.

Order is kept: a task's steps are written in the order posted, and any other transition of the task waits for its
steps still unwritten (``settle``, which flushes them at once), so the event log, the socket's frames and the
callbacks come in the order they always did; only a step's frame may reach a socket up to ``tick`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dreamserve.facts import Progress
from dreamserve.queue.db import File
from dreamserve.status import TaskStatus

log = logging.getLogger(__name__)

#: Longest a posted step waits for others to share its transaction.
TICK_SECONDS = 0.05


@dataclass
class Step:
    """What the worker of a running task reported, and when: a denoising step's ``progress``, an ``image`` saved
    (its ``partial`` file row), or a ``status`` reached (the model process took the task: ``task_start``)."""

    task_id: int
    worker_id: str
    progress: Progress | None = None
    image: File | None = None
    status: TaskStatus | None = None
    posted: float = field(default_factory=time.time)
    #: Its place among the process's steps (``StepWriter.post``).
    number: int = 0
    #: Whether the step passed its guard (the worker still held the task), once written.
    written: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


#: Writes steps in one transaction, taking them from the callable once it holds the writer: their guards' results.
WriteSteps = Callable[[Callable[[], list[Step]]], Awaitable[list[bool]]]
#: Writes one step in a transaction of its own (when a shared one failed, so that one bad step fails alone).
WriteStep = Callable[[Step], Awaitable[bool]]


class StepWriter:
    def __init__(self, write_all: WriteSteps, write_one: WriteStep, tick: float = TICK_SECONDS) -> None:
        self._write_all = write_all
        self._write_one = write_one
        self.tick = tick
        self._pending: list[Step] = []
        #: Steps are numbered as posted and written in that order: every step up to ``_written_upto`` is written
        #: (or given up), and ``_last`` holds the number of the last step of each task that has one unwritten.
        self._numbered = 0
        self._written_upto = 0
        self._last: dict[int, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written = asyncio.Condition()
        #: Set by ``settle``: the next flush starts now, without waiting out the tick.
        self._urgent = asyncio.Event()

    def _bind(self) -> None:
        """The waits belong to the running loop (a store may outlive one: the tests' ``asyncio.run`` calls)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._written, self._urgent = loop, asyncio.Condition(), asyncio.Event()

    def post(self, step: Step) -> asyncio.Future[bool]:
        """Hand a step over to be written; the future says whether it passed its guard."""
        self._bind()
        self._numbered += 1
        step.number = self._numbered
        self._pending.append(step)
        self._last[step.task_id] = step.number
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="steps writer")
        return step.written

    async def settle(self, task_id: int) -> None:
        """Return once every step posted for ``task_id`` until now is written (at once if there is none); steps
        posted meanwhile (a running task goes on) are not waited for."""
        due = self._last.get(task_id, 0)
        if self._written_upto >= due:
            return
        self._bind()
        self._urgent.set()
        async with self._written:
            await self._written.wait_for(lambda: self._written_upto >= due)

    async def close(self) -> None:
        """Write what is pending (the process is stopping)."""
        if self._flusher is not None:
            self._urgent.set()
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush(self) -> None:
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), self.tick)
            self._urgent.clear()
            await self._flush_once()

    async def _flush_once(self) -> None:
        taken: list[Step] = []

        def take() -> list[Step]:
            """Called once the transaction holds the writer: the steps posted while it waited for it go too."""
            taken.extend(self._pending)
            self._pending.clear()
            return taken

        try:
            results = await self._write_all(take)
        except Exception:
            log.exception("writing %d steps together failed; writing each alone", len(taken))
            results = [await self._alone(step) for step in taken]
        await self._done(taken, results)

    async def _alone(self, step: Step) -> bool:
        try:
            return await self._write_one(step)
        except Exception:
            log.exception("a step of task %s could not be written", step.task_id)
            return False

    async def _done(self, steps: list[Step], results: list[bool]) -> None:
        for step, held in zip(steps, results, strict=True):
            if not step.written.done():
                step.written.set_result(held)
            self._written_upto = max(self._written_upto, step.number)
            if self._last.get(step.task_id) == step.number:  # the task's last step so far: nothing left to wait for
                del self._last[step.task_id]
        async with self._written:
            self._written.notify_all()
