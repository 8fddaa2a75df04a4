"""OpenAI's answers: its error body and statuses, and the images of a finished task (URLs or base64, re-encoded
to JPEG or WebP when asked), plus ``task_id`` and ``socketaccesstoken`` beyond OpenAI's fields."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from fastapi.responses import JSONResponse
from PIL import Image

from dreamserve.dialects.common import Drawn, ErrorKind, Ladder, render_error
from dreamserve.dialects.openai.decode import NAMES, OpenAIRequest
from dreamserve.errors import (
    DreamError,
    InvalidState,
    TaskFailed,
    TaskInputFailed,
)
from dreamserve.fileurls import file_url
from dreamserve.queue.db import Task
from dreamserve.services import Services
from dreamserve.status import FINAL, FileRole, Pexit, TaskStatus


def _openai_body(drawn: Drawn, type_: str, code: str | None) -> dict[str, object]:
    return {"error": {"message": drawn.message, "type": type_, "param": drawn.param, "code": code}}


#: OpenAI's status, error type and code for each kind of error. Not 5xx for a task that did not complete: OpenAI
#: clients retry those, and a retry would queue a second task.
OPENAI: Ladder[tuple[str, str | None]] = Ladder(
    names=NAMES,
    kinds={
        ErrorKind.AUTH: (401, ("invalid_request_error", "invalid_api_key")),
        ErrorKind.RATE: (429, ("requests", "rate_limit_exceeded")),
        ErrorKind.NOT_FOUND: (404, ("invalid_request_error", "model_not_found")),
        ErrorKind.TOO_LARGE: (413, ("invalid_request_error", "request_too_large")),
        ErrorKind.STATE: (400, ("invalid_request_error", "task_not_completed")),
    },
    server=("server_error", None),
    other=lambda _, param: (400, ("invalid_request_error", "invalid_value" if param else None)),
    body=lambda drawn, label: _openai_body(drawn, *label),
)


def openai_error(exc: DreamError) -> JSONResponse:
    """The translation of our error tree into OpenAI's status codes and error body."""
    return render_error(exc, OPENAI)


async def answer(services: Services, task: Task, ask: OpenAIRequest) -> dict[str, Any]:
    """The body of a finished task's answer, or the error that says why there are no images."""
    fresh = await services.store.get_by_id(task.id)
    status, pexit = (fresh.status, fresh.pexit) if fresh is not None else (None, None)
    follow = f"Task {task.id} (socketaccesstoken {services.keys.token(task)})"
    if fresh is None or status not in FINAL:
        raise InvalidState(f"{follow} is still {status} after the wait limit; follow it with Task/Detail.")
    if status == TaskStatus.CANCEL or pexit in (Pexit.CANCELLED, Pexit.KILLED):
        raise InvalidState(f"{follow} was cancelled.")
    if pexit != Pexit.OK:
        failed = TaskInputFailed if pexit == Pexit.BAD_INPUT else TaskFailed
        raise failed(f"{follow} failed (pexit {pexit}): {fresh.debugerror[:500]}")
    files = (await services.store.files([task.id], FileRole.OUTPUT))[task.id]
    data: list[dict[str, Any]] = []
    for file in files:
        if ask.response_format == "url":
            data.append({"url": file_url(services.settings.base_url, file, services.keys)})
        else:
            raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
            encoded = await asyncio.to_thread(_encode, raw, ask.output_format, ask.quality)
            data.append({"b64_json": base64.b64encode(encoded).decode()})
    return {
        "created": int(task.createtime),
        "data": data,
        "output_format": ask.output_format,
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
