"""``POST /v1/Run/{owner}/{model}``: check everything, store the inputs and the task, wake a worker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import ProjectDep, ServicesDep, read_fields
from dreamserve.dialects.wiro.decode import decode
from dreamserve.dialects.wiro.render import envelope
from dreamserve.submit import served_model, submit

router = APIRouter()


@router.post("/v1/Run/{owner}/{model}")
async def run(owner: str, model: str, request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    slug = served_model(services, f"{owner}/{model}")
    fields = await read_fields(request, services.settings.max_upload_bytes)
    task = await submit(services, project, slug, decode(fields))
    return envelope(taskid=str(task.id), socketaccesstoken=services.keys.token(task))
