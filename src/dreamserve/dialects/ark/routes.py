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


async def _stream(services: Services, task: Task, ask: ArkRequest) -> AsyncIterator[str]:
    """One event per image as the worker saves it, then ``completed`` with the usage, then ``[DONE]``.

    A client that hangs up cancels the task (``sync_cancel_on_disconnect``), as on the synchronous route."""
    settings = services.settings
    sent: set[int] = set()
    saved: list[File] = []
    finished = False

    def event(kind: str, **fields: Any) -> str:
        return sse({"type": f"image_generation.{kind}", "model": ask.model, "created": int(time.time()), **fields})

    try:
        async for update in services.follow(task.id, settings.sync_wait_seconds):
            if update.type == Frame.OUTPUT_IMAGE and isinstance(update.message, ImageReport):
                index, report = update.message.index, update.message
                if index in sent:
                    continue  # a re-run after a lost worker saves its images again
                sent.add(index)
                if report.failure is not None:
                    yield event("partial_failed", image_index=index, error=image_error(report.failure))
                    continue
                file = await _file(services, task.id, report.name or "")
                if file is None:
                    continue
                saved.append(file)
                item = await image_item(services, file, ask.response_format)
                yield event("partial_succeeded", image_index=index, **item)
            elif update.type in FINAL:
                finished = True
        if not finished or await _ended_badly(services, task):
            finished = True
            fresh = await services.store.get_by_id(task.id)
            reason = (fresh.debugerror.strip() if fresh else "") or "the task did not finish in the wait limit"
            error = {"code": "InternalServiceError", "message": f"Task {task.id}: {reason[:500]}"}
            yield event("partial_failed", image_index=max(sent, default=-1) + 1, error=error)
        completed = {"usage": usage(saved), "task_id": str(task.id)}
        if ask.warnings:
            completed["warnings"] = list(ask.warnings)
        yield event("completed", **completed)
        yield "data: [DONE]\n\n"
    finally:
        if not finished and settings.sync_cancel_on_disconnect:
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
