"""OpenAI-compatible ``/v1/images/generations`` and ``/v1/images/edits`` on the same task queue.

Requests become ordinary tasks through ``submit.submit`` (so they show in Task/List, can be followed on the
socket and cancelled); the call waits for its task on the event hub (``Services.wait_terminal``, at most
``sync_wait_seconds``; at most ``sync_max_per_project`` such waits per project at once, 429 past it) and answers
in OpenAI's shape. A client that hangs up while waiting gets its task cancelled (``sync_cancel_on_disconnect``):
nobody could fetch the images. Bearer auth, the error route and the wait are ``dialects/common.py``'s.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.dialects.common import BearerProject, error_route, wait_for_task
from dreamserve.dialects.openai.decode import OpenAIRequest, decode
from dreamserve.dialects.openai.render import answer, openai_error
from dreamserve.errors import InvalidField
from dreamserve.queue.db import Project
from dreamserve.request import Field, Upload
from dreamserve.services import Services
from dreamserve.submit import submit

router = APIRouter(route_class=error_route(openai_error))


@router.post("/v1/images/generations")
async def generations(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, 0)
    return await _run(request, services, project, decode(services.settings, body))


@router.post("/v1/images/edits")
async def edits(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, services.settings.max_upload_bytes)
    if body.get("mask"):
        raise InvalidField("mask", "is not supported: describe the change in the prompt instead.")
    images = [v for name in ("image", "image[]") for v in body.get(name, []) if isinstance(v, Upload)]
    if not images:
        raise InvalidField(
            Field.REFERENCES, "required: send at least one image file ('image' or 'image[]').", files=True
        )
    return await _run(request, services, project, decode(services.settings, body, images))


async def _run(request: Request, services: Services, project: Project, ask: OpenAIRequest) -> dict[str, Any]:
    async with services.sync_slot(project.id):
        task = await submit(services, project, ask.slug, ask.run)
        await wait_for_task(request, services, task)
    return await answer(services, task, ask)
