"""OpenAI-compatible ``/v1/images/generations`` and ``/v1/images/edits`` on the same task queue.

Requests become ordinary tasks (so they show in Task/List, can be followed on the socket and
cancelled); the call waits for the task and answers in OpenAI's shape, plus ``task_id`` and
``socketaccesstoken``. Auth is ``Authorization: Bearer <api key>`` for key-only projects, and
``Bearer <api key>:<api secret>`` for signature projects (OpenAI clients cannot sign requests).
Errors use OpenAI's ``{"error": {...}}`` shape; the route class below is the one place they are translated.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.db import Project
from dreamserve.errors import AuthError, DreamError, InvalidRequest
from dreamserve.params import Upload
from dreamserve.projects import find_project, unseal_secret
from dreamserve.services import Services
from dreamserve.settings import DEFAULT_MODEL
from dreamserve.submit import served_model, submit

#: Seconds a synchronous call waits for its task before answering with the task id to follow.
WAIT_SECONDS = 600.0


class OpenAIRoute(APIRoute):
    """Renders our errors in OpenAI's shape for the routes of this module."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def translated(request: Request) -> Response:
            try:
                return await handler(request)
            except DreamError as exc:
                kind = "authentication_error" if isinstance(exc, AuthError) else "invalid_request_error"
                status = 401 if isinstance(exc, AuthError) else (exc.http_status if exc.http_status >= 400 else 400)
                body = {"error": {"message": exc.message, "type": kind, "param": None, "code": None}}
                return JSONResponse(body, status_code=status)

        return translated


router = APIRouter(route_class=OpenAIRoute)


async def bearer_project(request: Request, services: ServicesDep) -> Project:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    api_key, _, secret = token.partition(":")
    project = await find_project(services.sessions, api_key) if api_key else None
    if project is None:
        raise AuthError("Send the API key as Authorization: Bearer <key> (or <key>:<secret> for signature projects).")
    if project.signature_required and secret != unseal_secret(api_key, project.secret_sealed or ""):
        raise AuthError("This project requires its secret: send Authorization: Bearer <api key>:<api secret>.")
    return project


BearerProject = Annotated[Project, Depends(bearer_project)]


@router.post("/v1/images/generations")
async def generations(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, 0)
    return await _run(services, project, body, [])


@router.post("/v1/images/edits")
async def edits(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, services.settings.max_upload_bytes)
    images = [v for name in ("image", "image[]") for v in body.get(name, []) if isinstance(v, Upload)]
    if not images:
        raise InvalidRequest("images/edits needs at least one image file (field 'image' or 'image[]').")
    return await _run(services, project, body, images)


async def _run(
    services: Services, project: Project, body: dict[str, list[Any]], images: list[Upload]
) -> dict[str, Any]:
    def one(name: str, default: Any = None) -> Any:
        values = body.get(name)
        return values[-1] if values else default

    response_format = str(one("response_format", "url"))
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("response_format must be 'url' or 'b64_json'.")
    output_format = str(one("output_format", "png"))
    if output_format != "png":
        raise InvalidRequest("output_format: this server produces 'png'.")
    size = str(one("size", "auto"))
    fields: dict[str, list[Any]] = {
        "prompt": [one("prompt", "")],
        "maxImages": [one("n", 1)],
        "size": ["1024x1024" if size == "auto" else size],
        "inputImage": list(images),
    }
    slug = served_model(services, DEFAULT_MODEL)
    task = await submit(services, project, slug, fields)
    await services.wait_terminal(task.id, WAIT_SECONDS)
    rendered = await services.render(task.id) or {}
    if rendered.get("status") != "task_postprocess_end":
        raise InvalidRequest(f"Task {task.id} is still {rendered.get('status')}; follow it with Task/Detail.")
    if rendered.get("pexit") != "0":
        raise InvalidRequest(f"Task {task.id} failed: {rendered.get('debugerror', '')[:500]}")
    data = []
    files = (await services.store.files([task.id], "output"))[task.id]
    for output, file in zip(rendered["outputs"], files, strict=True):
        if response_format == "url":
            data.append({"url": output["url"], "revised_prompt": None})
        else:
            raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
            data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": "png",
        "size": rendered["parameters"].get("size"),
        # Beyond OpenAI: the task behind the images, to follow, list or cancel it.
        "task_id": str(task.id),
        "socketaccesstoken": task.token,
    }
