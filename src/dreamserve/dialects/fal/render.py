"""fal's answers: its error bodies and statuses, a request's queue URLs and status (with its logs), and the result.

Errors are what ``fal_client`` raises as ``FalClientHTTPError`` (``message`` from ``detail``, ``status_code``): a
field error is 422 with FastAPI's ``detail`` list (``loc``, ``msg``, ``type``), as fal's apps answer it; other
errors are ``{"detail": "..."}`` with their status. Output URLs are the server's file URLs (``/v1/File/...``), or
with ``sync_mode`` the images themselves as data URIs.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy import select

from dreamserve.dialects.common import Drawn, ErrorKind, Ladder, render_error
from dreamserve.dialects.fal.decode import ALIAS, NAMES, OWNER
from dreamserve.errors import DreamError, InvalidField, InvalidRequest, InvalidState, TaskFailed
from dreamserve.facts import ImageReport, Progress
from dreamserve.fileurls import file_url
from dreamserve.queue.db import File, Task, TaskEvent
from dreamserve.queue.events import Message, load_message
from dreamserve.request import Field
from dreamserve.services import Services
from dreamserve.status import FINAL, LABELS, FileRole, Frame, Pexit, TaskStatus


def _detail(drawn: Drawn, listed: bool) -> dict[str, object]:
    """fal's body: the message, or for an invalid request FastAPI's list of field errors."""
    loc = ["body", *([drawn.param] if drawn.param else [])]
    return {"detail": [{"loc": loc, "msg": drawn.message, "type": "value_error"}] if listed else drawn.message}


#: fal's status for each kind of error (its label: whether the detail is a list of field errors); a field error
#: (and any other invalid request) is FastAPI's 422.
FAL: Ladder[bool] = Ladder(
    names=NAMES,
    kinds={
        ErrorKind.AUTH: (401, False),
        ErrorKind.RATE: (429, False),
        ErrorKind.NOT_FOUND: (404, False),
        ErrorKind.TOO_LARGE: (413, False),
        ErrorKind.STORAGE: (400, False),
        ErrorKind.STATE: (400, False),
    },
    server=False,
    other=lambda exc, _: (422, True) if isinstance(exc, InvalidRequest) else (max(400, exc.http_status), False),
    body=_detail,
)


def fal_error(exc: DreamError) -> JSONResponse:
    """The translation of our error tree into fal's statuses and bodies."""
    return render_error(exc, FAL)


def request_urls(base_url: str, task_id: int) -> dict[str, str]:
    """Where the client follows a queued request: the URLs ``fal_client`` builds from an id, under the queue prefix."""
    base = f"{base_url}/fal/queue/{OWNER}/{ALIAS}/requests/{task_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


async def status_of(services: Services, task: Task, with_logs: bool) -> dict[str, Any]:
    """fal's status object: ``IN_QUEUE`` (with the position, 0 = next), ``IN_PROGRESS`` or ``COMPLETED`` (with
    ``metrics.inference_time``, and ``error`` when the request did not succeed)."""
    body: dict[str, Any] = {"request_id": str(task.id), **request_urls(services.settings.base_url, task.id)}
    if task.status == TaskStatus.QUEUE:
        return {"status": "IN_QUEUE", "queue_position": await services.store.queue_position(task), **body}
    logs = await task_logs(services, task) if with_logs else None
    if task.status not in FINAL:
        return {"status": "IN_PROGRESS", "logs": logs, **body}
    ran = (task.endtime or task.canceltime or 0) - task.starttime if task.starttime else 0.0
    completed = {"status": "COMPLETED", "logs": logs, "metrics": {"inference_time": max(0.0, ran)}, **body}
    error = _failure(task)
    if error is not None:
        completed["error"], completed["error_type"] = error
    return completed


def _failure(task: Task) -> tuple[str, str] | None:
    """Why a finished request has no result (message, type), or None when it succeeded."""
    if task.status == TaskStatus.CANCEL or task.pexit in (Pexit.CANCELLED, Pexit.KILLED):
        return f"Request {task.id} was cancelled.", "request_cancelled"
    if task.pexit == Pexit.BAD_INPUT:
        return f"Request {task.id} could not read an input: {task.debugerror[:500]}", "file_download_error"
    if task.pexit != Pexit.OK:
        return f"Request {task.id} failed (pexit {task.pexit}): {task.debugerror[:500]}", "internal_server_error"
    return None


async def task_logs(services: Services, task: Task) -> list[dict[str, Any]]:
    """The request's log as fal's log objects: the notes made when it was accepted, then a line per status
    change, step and saved image, from the task's event log."""
    query = select(TaskEvent).where(TaskEvent.task_id == task.id).order_by(TaskEvent.id)
    async with services.sessions() as session:
        events = list((await session.execute(query)).scalars())
    lines = [_log(note, task.createtime) for note in task.read_job().notes]
    for event in events:
        line = _event_line(event.type, load_message(event.type, event.message))
        if line is not None:
            lines.append(_log(line[0], event.created, line[1]))
    return lines


def _event_line(kind: str, message: Message) -> tuple[str, str] | None:
    if kind in LABELS:
        return LABELS[TaskStatus(kind)], "INFO"
    if isinstance(message, Progress):
        return f"step {message.step}/{message.total}", "INFO"
    if isinstance(message, ImageReport):
        return (
            (f"image {message.index} failed", "ERROR") if message.failure else (f"image {message.index} saved", "INFO")
        )
    if kind == Frame.ERROR and isinstance(message, str):
        return message[:1000], "ERROR"
    return None


def _log(message: str, at: float, level: str = "INFO") -> dict[str, Any]:
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"message": message, "level": level, "source": "USER", "timestamp": stamp}


async def result(services: Services, task: Task) -> dict[str, Any]:
    """The output of a finished request (``{"images": [...], "seed"}``), or the error that says why there is none."""
    fresh = await services.store.get_by_id(task.id) or task
    if fresh.status not in FINAL:
        raise InvalidState(f"Request {task.id} is still in progress: its status URL says when it has completed.")
    failure = _failure(fresh)
    if fresh.pexit == Pexit.BAD_INPUT:  # the caller's to fix, and fal names the field
        raise InvalidField(Field.REFERENCES, f"could not be read: {fresh.debugerror[:500]}")
    if failure is not None:
        raise (InvalidState if fresh.status == TaskStatus.CANCEL else TaskFailed)(failure[0])
    echo = fresh.read_job().echo or {}
    files = (await services.store.files([task.id], FileRole.OUTPUT))[task.id]
    images = [await image(services, file, bool(echo.get("sync_mode"))) for file in files]
    seed = files[0].meta.seed if files else None
    return {"images": images, "seed": seed}


async def image(services: Services, file: File, sync_mode: bool) -> dict[str, Any]:
    if sync_mode:
        raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
        url = f"data:{file.contenttype};base64,{base64.b64encode(raw).decode()}"
    else:
        url = file_url(services.settings.base_url, file, services.keys)
    return {
        "url": url,
        "content_type": file.contenttype,
        "file_name": file.name,
        "file_size": file.size,
        "width": file.meta.width,
        "height": file.meta.height,
    }
