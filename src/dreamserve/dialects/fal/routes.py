"""fal's queue and run APIs for its Seedream 4 apps, under ``/fal/queue/`` and ``/fal/run/``, on the same task queue.

fal tells its queue (``queue.fal.run``) and synchronous (``fal.run``) calls apart only by host, and ``fal_client``
formats ``https://{host}/{app}``: with ``FAL_QUEUE_RUN_HOST=<server>/fal/queue`` and ``FAL_RUN_HOST=<server>/fal/run``
its code runs unchanged. A request is an ordinary task (``submit.submit``), its id the request id, readable and
cancellable only by its own project. Auth is ``Authorization: Key <key>:<secret>`` (the key alone for key-only
projects). The run call and the status stream each hold one of the project's synchronous slots
(``sync_max_per_project``); a client that hangs up on the run call gets its task cancelled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.dialects.common import error_route, scheme_project, wait_for_task
from dreamserve.dialects.fal.decode import ALIAS, APPS, OWNER, FalRequest, decode
from dreamserve.dialects.fal.render import fal_error, request_urls, result, status_of
from dreamserve.errors import NotFound
from dreamserve.queue.db import Project, Task
from dreamserve.services import Services
from dreamserve.status import FINAL
from dreamserve.submit import submit

QUEUE, RUN = "/fal/queue", "/fal/run"
REQUESTS = f"{QUEUE}/{{owner}}/{{alias}}/requests/{{request_id}}"
#: The header fal answers a request's id in.
REQUEST_ID_HEADER = "x-fal-request-id"

router = APIRouter(route_class=error_route(fal_error))


async def key_project(request: Request, services: ServicesDep) -> Project:
    return await scheme_project(request, services, "Key")


KeyProject = Annotated[Project, Depends(key_project)]


@router.post(f"{RUN}/{{app:path}}")
async def run(app: str, request: Request, project: KeyProject, services: ServicesDep) -> JSONResponse:
    ask = await _decode(request, services, app)
    async with services.sync_slot(project.id):
        task = await submit(services, project, ask.slug, ask.run)
        await wait_for_task(request, services, task)
    return JSONResponse(await result(services, task), headers={REQUEST_ID_HEADER: str(task.id)})


@router.post(f"{QUEUE}/{{app:path}}")
async def enqueue(app: str, request: Request, project: KeyProject, services: ServicesDep) -> JSONResponse:
    ask = await _decode(request, services, app, request.query_params.get("fal_webhook"))
    task = await submit(services, project, ask.slug, ask.run)
    body = {
        "request_id": str(task.id),
        **request_urls(services.settings.base_url, task.id),
        "queue_position": await services.store.queue_position(task),
    }
    return JSONResponse(body, headers={REQUEST_ID_HEADER: str(task.id)})


@router.get(f"{REQUESTS}/status")
async def status(
    owner: str, alias: str, request_id: str, project: KeyProject, services: ServicesDep, logs: str = ""
) -> JSONResponse:
    task = await _task(services, project, owner, alias, request_id)
    body = await status_of(services, task, _truthy(logs))
    return JSONResponse(body, status_code=200 if body["status"] == "COMPLETED" else 202)


@router.get(f"{REQUESTS}/status/stream")
async def status_stream(
    owner: str, alias: str, request_id: str, project: KeyProject, services: ServicesDep, logs: str = ""
) -> Response:
    task = await _task(services, project, owner, alias, request_id)
    held = contextlib.AsyncExitStack()
    async with held:
        await held.enter_async_context(services.sync_slot(project.id))  # 429 past the project's cap
        return HeldStream(_statuses(services, task, _truthy(logs)), held.pop_all())


@router.get(REQUESTS)
async def response(
    owner: str, alias: str, request_id: str, project: KeyProject, services: ServicesDep
) -> dict[str, Any]:
    return await result(services, await _task(services, project, owner, alias, request_id))


@router.put(f"{REQUESTS}/cancel")
async def cancel(owner: str, alias: str, request_id: str, project: KeyProject, services: ServicesDep) -> JSONResponse:
    task = await _task(services, project, owner, alias, request_id)
    if task.status in FINAL:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    await services.abandon(task.id)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)


class HeldStream(StreamingResponse):
    """An event stream that keeps the project's synchronous slot until it has been sent (or failed to be)."""

    def __init__(self, events: AsyncIterator[str], held: contextlib.AsyncExitStack) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.held:
            await super().__call__(scope, receive, send)


async def _statuses(services: Services, task: Task, with_logs: bool) -> AsyncIterator[str]:
    """The status as it is now, then again at each change of the task, until ``COMPLETED`` (or the wait limit)."""
    last = ""
    body = await status_of(services, task, with_logs)
    async for _ in services.follow(task.id, services.settings.sync_wait_seconds):
        fresh = await services.store.get_by_id(task.id)
        body = await status_of(services, fresh or task, with_logs)
        text = json.dumps(body, separators=(",", ":"))
        if text != last:
            last = text
            yield f"data: {text}\n\n"
    if not last:  # the task had ended before the stream began: its log was read in one go
        yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _decode(request: Request, services: Services, app: str, webhook: str | None = None) -> FalRequest:
    if app not in APPS:
        raise NotFound(f"Application {app[:100]!r} not found. This server serves {' and '.join(APPS)}.")
    return decode(services.settings, app, await read_fields(request, 0), webhook)


async def _task(services: Services, project: Project, owner: str, alias: str, request_id: str) -> Task:
    """The project's fal request of that id; anything else (another project's, another API's) is not found."""
    task = None
    if (owner, alias) == (OWNER, ALIAS) and request_id.isascii() and request_id.isdigit() and len(request_id) < 19:
        task = await services.store.get_by_id(int(request_id))
    if task is None or task.project_id != project.id or task.read_job().dialect != "fal":
        raise NotFound(f"Request {request_id[:40]!r} not found.")
    return task


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")
