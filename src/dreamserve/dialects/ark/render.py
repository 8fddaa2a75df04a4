"""Ark's answers: its error body and statuses, the images of a finished task, the stream's events.

Output URLs are the capability URLs of the server's file route (``/v1/File/<accesskey>/<name>``). Ark's are
presigned links valid for 24 hours and its answer has no field for that; here, when ``retention_seconds`` is set,
each ``url`` item (and streamed image) also carries ``expires``, the unix time the file is deleted at (Wiro's
``expiretime``), a key Ark's SDKs ignore. Without retention files are kept and there is no ``expires``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from fastapi.responses import JSONResponse

from dreamserve.dialects.ark.decode import NAMES, ArkRequest
from dreamserve.dialects.common import Drawn, ErrorKind, Ladder, render_error
from dreamserve.errors import DreamError, InvalidField, InvalidState, TaskFailed
from dreamserve.fileurls import expires, file_url
from dreamserve.queue.db import File, Task
from dreamserve.request import Field
from dreamserve.services import Services
from dreamserve.status import FINAL, FileRole, Pexit, TaskStatus

#: Ark counts 256 pixels as one output token.
PIXELS_PER_TOKEN = 256


def _ark_body(drawn: Drawn, code: str, type_: str) -> dict[str, object]:
    return {"error": {"code": code, "message": drawn.message, "param": drawn.param or "", "type": type_}}


#: Ark's status, error code and type for each kind of error. Not 5xx for a task that did not complete: SDKs retry
#: those, and a retry would queue a second task.
ARK: Ladder[tuple[str, str]] = Ladder(
    names=NAMES,
    kinds={
        ErrorKind.AUTH: (401, ("AuthenticationError", "Unauthorized")),
        ErrorKind.RATE: (429, ("RateLimitExceeded", "TooManyRequests")),
        ErrorKind.NOT_FOUND: (404, ("InvalidEndpointOrModel.NotFound", "NotFound")),
        ErrorKind.STATE: (400, ("TaskNotCompleted", "BadRequest")),
        ErrorKind.TOO_LARGE: (413, ("InvalidParameter", "BadRequest")),
    },
    server=("InternalServiceError", "InternalServerError"),
    other=lambda exc, _: (max(400, exc.http_status), ("InvalidParameter", "BadRequest")),
    body=lambda drawn, label: _ark_body(drawn, *label),
)


def ark_error(exc: DreamError) -> JSONResponse:
    """The translation of our error tree into Ark's status codes and error body."""
    return render_error(exc, ARK)


async def answer(services: Services, task: Task, ask: ArkRequest) -> dict[str, Any]:
    """The body of a finished task's answer, or the error that says why there are no images."""
    fresh = await services.store.get_by_id(task.id)
    status = fresh.status if fresh else "gone"
    follow = f"Task {task.id} (socketaccesstoken {services.keys.token(task)})"
    if fresh is None or status not in FINAL:
        raise InvalidState(f"{follow} is still {status} after the wait limit; follow it with Task/Detail.")
    if status == TaskStatus.CANCEL:
        raise InvalidState(f"{follow} was cancelled.")
    if fresh.pexit == Pexit.BAD_INPUT:  # an input could not be read: the caller's to fix, and Ark names the field
        raise InvalidField(Field.REFERENCES, f"{follow} could not read an input: {fresh.debugerror}")
    if fresh.pexit != Pexit.OK:
        raise TaskFailed(f"{follow} failed (pexit {fresh.pexit}): {fresh.debugerror[:500]}")
    files = (await services.store.files([task.id], FileRole.OUTPUT))[task.id]
    items: dict[int, dict[str, Any]] = {}
    for file in files:
        items[file.position] = await image_item(services, file, ask.response_format)
    for failed in fresh.details.failed_images or ():
        items[failed.index] = {"error": image_error(f"Image {failed.index} failed: {failed.message}")}
    body: dict[str, Any] = {
        "model": ask.model,
        "created": int(time.time()),
        "data": [items[index] for index in sorted(items)],
        "usage": usage(files),
        # Beyond Ark: the task behind the images, to follow, list or cancel it like any other.
        "task_id": str(task.id),
    }
    if ask.warnings:
        body["warnings"] = list(ask.warnings)
    return body


def image_error(message: str) -> dict[str, str]:
    """Ark's error object of an image that could not be made."""
    return {"code": "InternalServiceError", "message": message}


async def image_item(services: Services, file: File, response_format: str) -> dict[str, Any]:
    size = f"{file.meta.width}x{file.meta.height}"
    if response_format == "url":
        settings = services.settings
        item: dict[str, Any] = {"url": file_url(settings.base_url, file, services.keys)}
        expiry = expires(file, settings.retention_seconds, role=FileRole.OUTPUT)  # streamed, it is still a partial row
        if expiry is not None:  # ours: when the URL stops answering (Ark's own links last 24 h, unsaid)
            item["expires"] = int(expiry)
    else:
        raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
        item = {"b64_json": base64.b64encode(raw).decode()}
    return {**item, "size": size, "seed": file.meta.seed}  # seed: ours, what reproduces it


def usage(files: list[File]) -> dict[str, int]:
    tokens = sum((f.meta.width or 0) * (f.meta.height or 0) for f in files) // PIXELS_PER_TOKEN
    return {"generated_images": len(files), "output_tokens": tokens, "total_tokens": tokens}


def sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
