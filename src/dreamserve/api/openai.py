"""OpenAI-compatible ``/v1/images/generations`` and ``/v1/images/edits`` on the same task queue.

Requests become ordinary tasks through ``submit.submit`` (so they show in Task/List, can be
followed on the socket and cancelled); the call waits for its task on the event hub
(``Services.wait_terminal``, at most ``sync_wait_seconds``; at most ``sync_max_per_project`` such waits per
project at once, 429 past it) and answers in OpenAI's shape, plus ``task_id`` and ``socketaccesstoken``.
A client that hangs up while waiting gets its task cancelled (``sync_cancel_on_disconnect``): nobody
could fetch the images. Bearer auth, the error route and the wait are ``api/compat.py``'s, shared with Ark's.

Errors use OpenAI's ``{"error": {"message", "type", "param", "code"}}``; ``openai_error`` is the one
place they are translated, so the rest of the code raises the usual ``errors`` tree.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from dreamserve.api.compat import BearerProject, error_route, renamed, wait_for_task
from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.errors import (
    AuthError,
    DreamError,
    InvalidRequest,
    InvalidState,
    NotFound,
    RateLimited,
    RequestTooLarge,
    TaskFailed,
    TaskInputFailed,
)
from dreamserve.queue.db import Project, Task
from dreamserve.services import Services
from dreamserve.settings import DEFAULT_MODEL
from dreamserve.status import FINAL, FileRole, Pexit, TaskStatus
from dreamserve.submit import submit
from dreamserve.wiro.params import Upload

#: Our parameter names as OpenAI's clients know them, for error messages and ``param``.
OPENAI_NAMES = {"maxImages": "n", "inputImage": "image"}
#: ``auto`` lets the server choose: the 1K tier, at the aspect ratio of the first reference image.
AUTO_SIZE = "1K"
#: The sizes the openai package lists (``ImageGenerateParams.size``). The GPT image models also take any WxH;
#: every WxH Seedream takes is accepted, and smaller ones (256x256, 512x512) are generated at the smallest size
#: the server generates (``min_pixels``) with their aspect ratio, then downscaled.
OPENAI_SIZES = ("auto", "256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792")
_WXH = re.compile(r"^(\d{1,5})x(\d{1,5})$")
#: Smallest side of a downscaled output.
MIN_OUTPUT_SIDE = 16


def openai_error(exc: DreamError) -> JSONResponse:
    """The translation of our error tree into OpenAI's status codes and error body."""
    message, param = renamed(exc, OPENAI_NAMES)
    headers = None
    if isinstance(exc, AuthError):
        status, kind, code = 401, "invalid_request_error", "invalid_api_key"
    elif isinstance(exc, RateLimited):
        status, kind, code = 429, "requests", "rate_limit_exceeded"
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, NotFound):
        status, kind, code = 404, "invalid_request_error", "model_not_found"
    elif exc.http_status >= 500:
        status, kind, code = exc.http_status, "server_error", None
    elif isinstance(exc, RequestTooLarge):
        status, kind, code = 413, "invalid_request_error", "request_too_large"
    elif isinstance(exc, InvalidState):
        # Not 5xx on purpose: OpenAI clients retry those, and a retry would queue a second task.
        status, kind, code = 400, "invalid_request_error", "task_not_completed"
    else:
        status, kind, code = 400, "invalid_request_error", "invalid_value" if param else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


router = APIRouter(route_class=error_route(openai_error))


@router.post("/v1/images/generations")
async def generations(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, 0)
    return await _run(request, services, project, body, [])


@router.post("/v1/images/edits")
async def edits(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    body = await read_fields(request, services.settings.max_upload_bytes)
    if body.get("mask"):
        raise InvalidRequest("Request parameter [mask] is not supported: describe the change in the prompt instead.")
    images = [v for name in ("image", "image[]") for v in body.get(name, []) if isinstance(v, Upload)]
    if not images:
        raise InvalidRequest("Request files [image] required: send at least one image file ('image' or 'image[]').")
    return await _run(request, services, project, body, images)


async def _run(
    request: Request, services: Services, project: Project, body: dict[str, list[Any]], images: list[Upload]
) -> dict[str, Any]:
    def one(name: str, default: Any = None) -> Any:
        values = body.get(name)
        return values[-1] if values not in (None, []) and values[-1] is not None else default

    response_format = str(one("response_format", "url"))
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("Request parameter [response_format] must be 'url' or 'b64_json'.")
    output_format = str(one("output_format", "png")).lower()
    if output_format not in ("png", "jpeg", "webp"):
        raise InvalidRequest("Request parameter [output_format] must be 'png', 'jpeg' or 'webp'.")
    if output_format != "png" and response_format == "url":
        raise InvalidRequest("Request parameter [output_format]: url outputs are PNG; use b64_json for jpeg or webp.")
    quality = _quality(one("output_compression"))  # checked before the task exists, like every other field
    size, output_size = generation_size(str(one("size", "auto")), services.settings.min_pixels)
    fields: dict[str, list[Any]] = {
        "prompt": [one("prompt", "")],
        "maxImages": [one("n", 1)],
        "size": [size],
        "inputImage": list(images),
    }
    for extra in ("seed", "watermark"):  # ours, beyond OpenAI
        if one(extra) is not None:
            fields[extra] = [one(extra)]
    async with services.sync_slot(project.id):
        task = await submit(services, project, _model(services, str(one("model", ""))), fields, output_size)
        await wait_for_task(request, services, task)
    return await _answer(services, task, response_format, output_format, quality)


def generation_size(size: str, min_pixels: int) -> tuple[str, tuple[int, int] | None]:
    """OpenAI's ``size`` as the Seedream size to generate at, and the size to downscale the images to (or None).

    A WxH under ``min_pixels`` (OpenAI's 256x256 and 512x512 with Seedream's 1280x720 floor) is generated at the
    smallest size of its aspect ratio with at least ``min_pixels`` (sides multiples of 16), then downscaled.
    """
    text = size.strip().lower().replace("×", "x")
    if text in ("", "auto"):
        return AUTO_SIZE, None
    match = _WXH.match(text)
    if match is None:
        return size, None  # 1K/2K/4K, or an error from Seedream's size check
    width, height = int(match.group(1)), int(match.group(2))
    if (
        width * height >= min_pixels
        or min(width, height) < MIN_OUTPUT_SIDE
        or max(width, height) > 16 * min(width, height)
    ):
        return text, None  # Seedream takes it as it is, or refuses it with its own message
    scale = math.sqrt(min_pixels / (width * height))
    gen_width, gen_height = (16 * math.ceil(side * scale / 16) for side in (width, height))
    return f"{gen_width}x{gen_height}", (width, height)


def _model(services: Services, requested: str) -> str:
    """A served slug is used as given; any other name (``gpt-image-1``, ``dall-e-3``) means the default model."""
    served = services.settings.models
    slug = requested.strip().lower()
    if slug in served:
        return slug
    if DEFAULT_MODEL in served:
        return DEFAULT_MODEL
    if not served:
        raise NotFound("This server serves no model.")
    return next(iter(served))


def _quality(value: Any) -> int:
    text = str(value if value is not None else 90).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 3 or not 0 <= int(text) <= 100:
        raise InvalidRequest("Request parameter [output_compression] must be an integer from 0 to 100.")
    return int(text)


async def _answer(
    services: Services, task: Task, response_format: str, output_format: str, quality: int
) -> dict[str, Any]:
    rendered = await services.render(task.id) or {}
    status, pexit = rendered.get("status"), rendered.get("pexit")
    follow = f"Task {task.id} (socketaccesstoken {services.keys.token(task)})"
    if status not in FINAL:
        raise InvalidState(f"{follow} is still {status} after the wait limit; follow it with Task/Detail.")
    if status == TaskStatus.CANCEL or pexit in (Pexit.CANCELLED, Pexit.KILLED):
        raise InvalidState(f"{follow} was cancelled.")
    if pexit != Pexit.OK:
        failed = TaskInputFailed if pexit == Pexit.BAD_INPUT else TaskFailed
        raise failed(f"{follow} failed (pexit {pexit}): {str(rendered.get('debugerror', ''))[:500]}")
    files = (await services.store.files([task.id], FileRole.OUTPUT))[task.id]
    data: list[dict[str, Any]] = []
    for output, file in zip(rendered["outputs"], files, strict=True):
        if response_format == "url":
            data.append({"url": output["url"]})
        else:
            raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
            encoded = await asyncio.to_thread(_encode, raw, output_format, quality)
            data.append({"b64_json": base64.b64encode(encoded).decode()})
    return {
        "created": int(task.createtime),
        "data": data,
        "output_format": output_format,
        "size": "x".join(str(side) for side in task.read_job().size),
        # Beyond OpenAI: the task behind the images, to follow, list or cancel it like any other.
        "task_id": str(task.id),
        "socketaccesstoken": services.keys.token(task),
    }


def _encode(png: bytes, output_format: str, quality: int) -> bytes:
    if output_format == "png":
        return png
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()
