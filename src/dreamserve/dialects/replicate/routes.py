"""Replicate's HTTP API (``/v1/predictions``, ``/v1/models/...``, ``/v1/files``, the webhook secret) on the same
task queue as every other dialect.

Code using the ``replicate`` client runs with only ``base_url`` (or ``REPLICATE_BASE_URL``) changed; the token is
``<api key>:<api secret>`` (the key alone for key-only projects), bearer auth being ``dialects/common.py``'s.
A prediction is a task of the authenticated project (its id is the task's id; another project's is 404).
``Prefer: wait`` (60 s) or ``Prefer: wait=N`` holds the create's answer until the task ends or N seconds pass
(less ``WAIT_MARGIN_SECONDS``: the client stops reading at N + 0.5 s), in one of the project's
``sync_max_per_project`` slots (none free: answered at once, as without ``Prefer``); an answer the wait ran out on
says ``starting``, as Replicate's does, so ``replicate.run`` goes on polling. A client that hangs up does not
cancel the prediction: it can be read, and cancelled, later.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.dialects.common import BearerProject, error_route
from dreamserve.dialects.replicate import files, outputs, stream
from dreamserve.dialects.replicate.decode import decode, served
from dreamserve.dialects.replicate.render import TERMINAL, load, load_many, prediction_task, replicate_error
from dreamserve.dialects.replicate.schema import VERSION, model_object, version_object
from dreamserve.dialects.replicate.webhook import signing_key
from dreamserve.errors import InvalidField, NotFound, RateLimited
from dreamserve.queue.db import Project, Task
from dreamserve.services import Services
from dreamserve.status import FINAL, StopKind
from dreamserve.submit import submit

#: ``Prefer: wait`` without a number, and the most ``wait=N`` may ask (Replicate's bounds).
MAX_WAIT_SECONDS = 60
#: How long before the client's read timeout (``wait`` + 0.5 s in the replicate package) a held answer is sent: time
#: to read the task and render the prediction on a loaded server.
WAIT_MARGIN_SECONDS = 2.0
#: Predictions per page of ``GET /v1/predictions``.
PAGE_SIZE = 100
#: How long a cancel waits for a running task to stop before answering it as it stands.
CANCEL_WAIT_SECONDS = 3.0

router = APIRouter(route_class=error_route(replicate_error))
router.include_router(files.router)
router.include_router(stream.router)
router.include_router(outputs.router)


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201)
async def create_for_model(
    owner: str, name: str, request: Request, project: BearerProject, services: ServicesDep
) -> JSONResponse:
    model = f"{owner}/{name}"
    slug = served(services.settings, model)
    return await _create(request, services, project, model, slug, await read_fields(request, 0))


@router.post("/v1/predictions", status_code=201)
async def create(request: Request, project: BearerProject, services: ServicesDep) -> JSONResponse:
    body = await read_fields(request, 0)
    ref = (body.get("version") or [None])[-1]
    if not isinstance(ref, str) or not ref:
        raise InvalidField("version", f"is required: {VERSION}, or a model name such as bytedance/seedream-4.")
    model, _, tag = ref.partition(":") if "/" in ref else ("", "", ref)
    if tag and tag != VERSION:
        raise NotFound(f"Version {tag[:80]} does not exist here: use {VERSION}.")
    model = model or next(iter(services.settings.replicate_models), "")
    return await _create(request, services, project, model, served(services.settings, model), body)


async def _create(
    request: Request, services: Services, project: Project, model: str, slug: str, body: dict[str, list[Any]]
) -> JSONResponse:
    wait = prefer_wait(request.headers.get("prefer", ""))
    # The client reads for ``wait`` + 0.5 s: the answer is due a margin before that, submitting included.
    due = time.monotonic() + wait - WAIT_MARGIN_SECONDS
    ask = decode(services.settings, model, slug, body)
    run = await files.resolve(services, project, request, ask.run)
    task = await submit(services, project, ask.slug, run)
    if wait and (left := due - time.monotonic()) > 0:
        await _hold(request, services, project, task, left)
    fresh = await services.store.get_by_id(task.id) or task
    answer = await load(services, fresh)
    if wait and answer["status"] not in TERMINAL:
        answer["status"] = "starting"  # replicate.run takes any other status of a held answer as the end
    return JSONResponse(answer, status_code=201)


def prefer_wait(header: str) -> int:
    """Seconds ``Prefer: wait`` or ``wait=N`` asks to hold the answer; 0 without."""
    for part in header.replace(";", ",").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return MAX_WAIT_SECONDS
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_WAIT_SECONDS:
            raise InvalidField("Prefer", f"wait=N takes N from 1 to {MAX_WAIT_SECONDS}, got {text[:20]!r}.")
        return int(text)
    return 0


async def _hold(request: Request, services: Services, project: Project, task: Task, seconds: float) -> None:
    """Wait for the task in one of the project's synchronous slots; with none free, answer at once."""
    with contextlib.suppress(RateLimited):
        async with services.sync_slot(project.id):
            await services.wait_terminal(task.id, seconds, request.is_disconnected)


@router.get("/v1/predictions/{prediction_id}")
async def get(prediction_id: str, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    return await load(services, await prediction_task(services, project, prediction_id))


@router.post("/v1/predictions/{prediction_id}/cancel")
async def cancel(prediction_id: str, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    """Cancel a queued or running prediction (an ended one is answered as it is)."""
    task = await prediction_task(services, project, prediction_id)
    if task.status not in FINAL:
        if await services.store.cancel_queued(task.id) is None:
            await services.stop_task(task.id, StopKind.CANCEL)
            await services.wait_terminal(task.id, CANCEL_WAIT_SECONDS)  # stopped at the next step
        task = await services.store.get_by_id(task.id) or task
    return await load(services, task)


@router.get("/v1/predictions")
async def list_predictions(project: BearerProject, services: ServicesDep, cursor: str | None = None) -> dict[str, Any]:
    """The project's predictions, newest first; ``next`` is the URL of the next page (a cursor: the last id)."""
    before = None
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise InvalidField("cursor", "is not a cursor this server gave: use the next URL as it is.")
        before = int(cursor)
    query = select(Task).where(Task.project_id == project.id)
    if before is not None:
        query = query.where(Task.id < before)
    async with services.sessions() as session:
        tasks = list((await session.execute(query.order_by(Task.id.desc()).limit(PAGE_SIZE + 1))).scalars())
    page, more = tasks[:PAGE_SIZE], len(tasks) > PAGE_SIZE
    next_url = f"{services.settings.base_url}/v1/predictions?cursor={page[-1].id}" if more else None
    return {"previous": None, "next": next_url, "results": await load_many(services, page)}


@router.get("/v1/models/{owner}/{name}")
async def get_model(owner: str, name: str, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    slug = served(services.settings, f"{owner}/{name}")
    async with services.sessions() as session:
        runs = (await session.execute(select(func.count(Task.id)).where(Task.model == slug))).scalar_one()
    return model_object(services.settings.base_url, owner, name, int(runs))


@router.get("/v1/models/{owner}/{name}/versions/{version}")
async def get_version(
    owner: str, name: str, version: str, project: BearerProject, services: ServicesDep
) -> dict[str, Any]:
    served(services.settings, f"{owner}/{name}")
    if version != VERSION:
        raise NotFound(f"Version {version[:80]} does not exist here: use {VERSION}.")
    return version_object()


@router.get("/v1/webhooks/default/secret")
async def webhook_secret(project: BearerProject, services: ServicesDep) -> dict[str, str]:
    """The project's signing secret in Standard Webhooks' form, for ``replicate.webhooks.validate``."""
    return {"key": signing_key(services.keys.webhook_secret(project.id, project.webhook_secret_sealed))}
