"""A prediction's ``urls.stream``: server-sent events as Replicate sends them, what ``prediction.stream()`` reads.

``logs`` (the prediction's log lines: its notes, then one tqdm line per step), ``output`` (an image's URL, as soon
as the worker has saved it), then ``error`` (a failed prediction) and ``done``. Every event has an ``id``: the
client drops events without one. The task's stored events are replayed first, so a late reader misses nothing.
A comment is sent when nothing happened for ``KEEPALIVE_SECONDS``, within the client's 30 s read timeout. A stream
holds one of the project's ``sync_max_per_project`` slots (429 past them, which the client retries); a reader
that hangs up does not cancel the prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from dreamserve.api.deps import ServicesDep
from dreamserve.dialects.common import BearerProject, error_route
from dreamserve.dialects.replicate.render import load, output_url, prediction_task, replicate_error, step_line
from dreamserve.facts import ImageReport, Progress
from dreamserve.queue.db import File, Task
from dreamserve.queue.events import Event
from dreamserve.services import Services
from dreamserve.status import FINAL, Frame, TaskStatus

router = APIRouter(route_class=error_route(replicate_error))

KEEPALIVE_SECONDS = 10.0


@router.get("/v1/predictions/{prediction_id}/stream")
async def stream(prediction_id: str, project: BearerProject, services: ServicesDep) -> StreamingResponse:
    task = await prediction_task(services, project, prediction_id)
    held = contextlib.AsyncExitStack()
    await held.enter_async_context(services.sync_slot(project.id))  # 429 past the project's cap
    return HeldStream(_events(services, task), held)


class HeldStream(StreamingResponse):
    """An event stream that keeps the project's slot until it has been sent, or has failed to be: released in
    ``__call__``, which runs even when the body is never started."""

    def __init__(self, events: AsyncIterator[str], held: contextlib.AsyncExitStack) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.held:
            await super().__call__(scope, receive, send)


def sse(kind: str, event_id: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in (data.split("\n") or [""]))
    return f"event: {kind}\nid: {event_id}\n{lines}\n"


async def _events(services: Services, task: Task) -> AsyncIterator[str]:
    job = task.read_job()
    for number, note in enumerate(job.notes):
        yield sse("logs", f"note-{number}", note)
    follow = services.follow(task.id, services.settings.sync_wait_seconds)
    pending: asyncio.Task[Event] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(follow))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield ": keep-alive\n\n"
                continue
            pending = None
            try:
                event = done.pop().result()
            except StopAsyncIteration:
                break
            async for chunk in _translate(services, task, event):
                yield chunk
            if event.type in FINAL:
                break
    finally:
        if pending is not None:
            pending.cancel()
        if isinstance(follow, AsyncGenerator):  # its subscription to the hub ends with it
            await follow.aclose()
    yield sse("done", "done", "{}")


async def _translate(services: Services, task: Task, event: Event) -> AsyncIterator[str]:
    job = task.read_job()
    if event.type == TaskStatus.START:
        yield sse("logs", str(event.id), f"Generating {job.num_images} image(s) at {job.width}x{job.height}")
    elif event.type == Frame.OUTPUT and isinstance(event.message, Progress):
        yield sse("logs", str(event.id), step_line(event.message))
    elif event.type == Frame.OUTPUT_IMAGE and isinstance(event.message, ImageReport) and event.message.name:
        file = await _file(services, task.id, event.message.name)
        if file is not None:
            yield sse("output", str(event.id), output_url(services, task.id, file))
    elif event.type in FINAL:
        fresh = await services.store.get_by_id(task.id)
        prediction = await load(services, fresh, logs=False) if fresh is not None else None
        if prediction is not None and prediction["status"] == "failed":
            yield sse("error", str(event.id), json.dumps({"detail": prediction["error"]}))


async def _file(services: Services, task_id: int, name: str) -> File | None:
    """The task's file of that name: the latest row, as a re-run after a lost worker saves its images again."""
    async with services.sessions() as session:
        query = select(File).where(File.task_id == task_id, File.name == name).order_by(File.id.desc()).limit(1)
        file: File | None = (await session.execute(query)).scalars().first()
        return file
