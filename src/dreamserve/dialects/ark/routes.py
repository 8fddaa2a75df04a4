"""Ark's route, ``POST /api/v3/images/generations``, on the same task queue as every other dialect.

Code written for BytePlus ModelArk or Volcengine Ark (their SDKs, or the OpenAI SDK pointed at Ark) runs
with only ``base_url`` changed to ``<server>/api/v3``. A request becomes an ordinary task through
``submit.submit`` (named in the ``x-dreamserve-task-id`` header and the ``task_id`` field, so it can be
followed or cancelled like any other); bearer auth, the synchronous wait and the hang-up cancel are
``dialects/common.py``'s. With ``stream: true`` each image is sent as soon as the worker has saved it (its
``Frame.OUTPUT_IMAGE`` event), then ``image_generation.completed`` and ``data: [DONE]``; checks still answer
HTTP 400 JSON before the stream starts. A stream holds one of the project's synchronous slots
(``sync_max_per_project``) until it ends, as a waiting request does: past the cap, 429 before it starts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.dialects.ark.decode import ArkRequest, decode
from dreamserve.dialects.ark.render import answer, ark_error, image_error, image_item, sse, usage
from dreamserve.dialects.common import BearerProject, error_route, wait_for_task
from dreamserve.facts import ImageReport
from dreamserve.queue.db import File, Task
from dreamserve.services import Services
from dreamserve.status import FINAL, Frame, Pexit, TaskStatus
from dreamserve.submit import submit

TASK_HEADER = "x-dreamserve-task-id"

router = APIRouter(route_class=error_route(ark_error))


@router.post("/api/v3/images/generations")
async def generations(request: Request, project: BearerProject, services: ServicesDep) -> Response:
    ask = decode(services.settings, await read_fields(request, 0))
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(services.sync_slot(project.id))  # 429 past the project's cap
        task = await submit(services, project, ask.slug, ask.run)
        headers = {TASK_HEADER: str(task.id)}
        if ask.stream:  # the slot goes with the stream, released when it has been sent or the client left
            return HeldStream(_stream(services, task, ask), held.pop_all(), headers=headers)
        await wait_for_task(request, services, task)
    return JSONResponse(await answer(services, task, ask), headers=headers)


class HeldStream(StreamingResponse):
    """An event stream that keeps what ``held`` holds (the project's synchronous slot) until it has been sent, or
    has failed to be: released in ``__call__``, which runs even when the body is never started."""

    def __init__(self, events: AsyncIterator[str], held: contextlib.AsyncExitStack, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.held:
            await super().__call__(scope, receive, send)


class _Stream:
    """One Ark stream's state: the images sent (a re-run after a lost worker saves its images again) and saved."""

    def __init__(self, services: Services, task: Task, ask: ArkRequest) -> None:
        self.services, self.task, self.ask = services, task, ask
        self.sent: set[int] = set()
        self.saved: list[File] = []

    def event(self, kind: str, **fields: Any) -> str:
        created = int(time.time())
        return sse({"type": f"image_generation.{kind}", "model": self.ask.model, "created": created, **fields})

    async def image(self, report: ImageReport) -> str | None:
        """The event of one saved (or failed) image; None for one already sent or whose row is gone."""
        if report.index in self.sent:
            return None
        self.sent.add(report.index)
        if report.failure is not None:
            return self.event("partial_failed", image_index=report.index, error=image_error(report.failure))
        file = await _file(self.services, self.task.id, report.name or "")
        if file is None:
            return None
        self.saved.append(file)
        item = await image_item(self.services, file, self.ask.response_format)
        return self.event("partial_succeeded", image_index=report.index, **item)

    async def failure(self) -> str:
        """The event that says why the images stopped short: the task failed, or the wait ran out."""
        fresh = await self.services.store.get_by_id(self.task.id)
        reason = (fresh.debugerror.strip() if fresh else "") or "the task did not finish in the wait limit"
        error = image_error(f"Task {self.task.id}: {reason[:500]}")
        return self.event("partial_failed", image_index=max(self.sent, default=-1) + 1, error=error)

    def completed(self) -> str:
        completed: dict[str, Any] = {"usage": usage(self.saved), "task_id": str(self.task.id)}
        if self.ask.warnings:
            completed["warnings"] = list(self.ask.warnings)
        return self.event("completed", **completed)


async def _stream(services: Services, task: Task, ask: ArkRequest) -> AsyncIterator[str]:
    """One event per image as the worker saves it, then ``completed`` with the usage, then ``[DONE]``.

    A client that hangs up cancels the task (``sync_cancel_on_disconnect``), as on the synchronous route."""
    stream = _Stream(services, task, ask)
    finished = False
    try:
        async for update in services.follow(task.id, services.settings.sync_wait_seconds):
            if update.type == Frame.OUTPUT_IMAGE and isinstance(update.message, ImageReport):
                event = await stream.image(update.message)
                if event is not None:
                    yield event
            elif update.type in FINAL:
                finished = True
        if not finished or await _ended_badly(services, task):
            finished = True
            yield await stream.failure()
        yield stream.completed()
        yield "data: [DONE]\n\n"
    finally:
        if not finished and services.settings.sync_cancel_on_disconnect:
            with anyio.CancelScope(shield=True):
                await services.abandon(task.id)


async def _ended_badly(services: Services, task: Task) -> bool:
    fresh = await services.store.get_by_id(task.id)
    return fresh is None or fresh.status != TaskStatus.POSTPROCESS_END or fresh.pexit != Pexit.OK


async def _file(services: Services, task_id: int, name: str) -> File | None:
    """The task's file of that name: the latest row, as a re-run after a lost worker saves its images again."""
    async with services.sessions() as session:
        query = select(File).where(File.task_id == task_id, File.name == name).order_by(File.id.desc()).limit(1)
        file: File | None = (await session.execute(query)).scalars().first()
        return file
