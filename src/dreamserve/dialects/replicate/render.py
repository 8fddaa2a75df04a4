"""Replicate's answers: problem details for errors, and the prediction object of a task.

A prediction is a task seen through this dialect: its id is the task's id, its ``input`` the echo the decoder
stored with the job, its ``status`` the task's status in Replicate's five words, its ``logs`` the task's notes and
one tqdm line per denoising step (as cog models print them, so the client's ``prediction.progress`` parses them),
and its ``output`` the URLs of the task's images (the images saved so far while it runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse

from dreamserve.dialects.common import Drawn, ErrorKind, Ladder, render_error
from dreamserve.dialects.replicate.decode import NAMES
from dreamserve.dialects.replicate.schema import VERSION
from dreamserve.errors import (
    DreamError,
    InvalidField,
    NotFound,
)
from dreamserve.facts import Progress
from dreamserve.fileurls import file_url
from dreamserve.jobs import TaskJob
from dreamserve.queue.db import File, Project, Task
from dreamserve.queue.events import Event
from dreamserve.services import Services
from dreamserve.status import FileRole, Frame, Pexit, TaskStatus

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
_PROCESSING = frozenset({TaskStatus.START, TaskStatus.END, TaskStatus.POSTPROCESS_START})
DEFAULT_MODEL_NAME = "bytedance/seedream-4"
BAR_WIDTH = 10


def _problem(drawn: Drawn, title: str) -> dict[str, object]:
    """Replicate's problem details; a field error names the field first in ``detail``."""
    exc = drawn.exc
    detail = f"{drawn.param}: {exc.reason}" if isinstance(exc, InvalidField) else drawn.message
    return {"title": title, "detail": detail, "status": drawn.status}


#: Replicate's status and problem title for each kind of error.
REPLICATE: Ladder[str] = Ladder(
    names=NAMES,
    kinds={
        ErrorKind.AUTH: (401, "Unauthenticated"),
        ErrorKind.RATE: (429, "Too many requests"),
        ErrorKind.NOT_FOUND: (404, "Not found"),
        ErrorKind.TOO_LARGE: (413, "Request too large"),
        ErrorKind.STORAGE: (507, "Insufficient storage"),
        ErrorKind.STATE: (409, "Conflict"),
        ErrorKind.FIELD: (422, "Input validation failed"),
    },
    server="Internal server error",
    other=lambda _exc, _param: (400, "Bad request"),
    body=_problem,
    media_type="application/problem+json",
)


def replicate_error(exc: DreamError) -> JSONResponse:
    """Our error tree as Replicate's problem details (``title``, ``detail``, ``status``), which its client raises
    as ``ReplicateError`` with those fields."""
    return render_error(exc, REPLICATE)


def status_of(task: Task) -> str:
    if task.status == TaskStatus.CANCEL or task.pexit in (Pexit.CANCELLED, Pexit.KILLED):
        return "canceled"
    if task.status == TaskStatus.POSTPROCESS_END:
        return "succeeded" if task.pexit == Pexit.OK else "failed"
    return "processing" if task.status in _PROCESSING else "starting"


def iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def step_line(progress: Progress) -> str:
    """A denoising step as tqdm prints it: `` 45%|████▌     | 9/20 [2s<3s, 3.10it/s]``."""
    percent = int(100 * progress.step / max(progress.total, 1))
    filled = "█" * (percent * BAR_WIDTH // 100)
    return (
        f"{percent:3d}%|{filled:<{BAR_WIDTH}}| {progress.step}/{progress.total} "
        f"[{progress.elapsed:.0f}s<{progress.seconds_left:.0f}s, {progress.rate:.2f}it/s]"
    )


def logs_of(task: Task, job: TaskJob, events: Sequence[Event]) -> str:
    lines = list(job.notes)
    if task.starttime is not None:
        lines.append(f"Generating {job.num_images} image(s) at {job.width}x{job.height}")
    lines += [step_line(e.message) for e in events if e.type == Frame.OUTPUT and isinstance(e.message, Progress)]
    return "\n".join(lines) + ("\n" if lines else "")


def prediction(
    base_url: str, task: Task, outputs: Sequence[File], output_urls: Sequence[str], logs: str | None
) -> dict[str, Any]:
    """The prediction object of a task; ``logs`` None leaves them out (lists)."""
    job = task.read_job()
    echo = job.echo or {}
    status = status_of(task)
    url = f"{base_url}/v1/predictions/{task.id}"
    body: dict[str, Any] = {
        "id": str(task.id),
        "model": str(echo.get("model") or DEFAULT_MODEL_NAME),
        "version": VERSION,
        "input": echo.get("input", {}),
        "output": list(output_urls) if outputs else None,
        "error": (task.debugerror.strip()[:1000] or "The prediction failed.") if status == "failed" else None,
        "status": status,
        "source": "api",
        "data_removed": False,
        "created_at": iso(task.createtime),
        "started_at": iso(task.starttime),
        "completed_at": iso(task.endtime or task.canceltime) if status in TERMINAL else None,
        "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
        "metrics": _metrics(task, status),
    }
    if logs is not None:
        body["logs"] = logs
    return body


def _metrics(task: Task, status: str) -> dict[str, float]:
    if status not in TERMINAL or task.starttime is None or task.endtime is None:
        return {}
    end = task.endtime
    return {"predict_time": round(end - task.starttime, 6), "total_time": round(end - task.createtime, 6)}


async def prediction_task(services: Services, project: Project, prediction_id: str) -> Task:
    """The task behind a prediction id, if it is the project's (another project's is unknown here: 404)."""
    text = prediction_id.strip()
    task = None
    if text.isascii() and text.isdigit() and len(text) <= 18:
        task = await services.store.get(project_id=project.id, taskid=int(text))
    if task is None:
        raise NotFound(f"Prediction {prediction_id[:40]} does not exist in this project.")
    return task


async def load(services: Services, task: Task, *, logs: bool = True) -> dict[str, Any]:
    """The prediction of ``task`` as it stands (its outputs, or the images saved so far while it runs)."""
    role = FileRole.OUTPUT if task.status == TaskStatus.POSTPROCESS_END else FileRole.PARTIAL
    files = (await services.store.files([task.id], role))[task.id]
    return _render(services, task, files, await services.store.events(task.id) if logs else None)


async def load_many(services: Services, tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Predictions for a list (no logs: they are one query per task)."""
    ended = [t.id for t in tasks if t.status == TaskStatus.POSTPROCESS_END]
    outputs = await services.store.files(ended, FileRole.OUTPUT)
    return [_render(services, t, outputs.get(t.id, []), None) for t in tasks]


def output_url(services: Services, task_id: int, file: File) -> str:
    """The core's capability URL of an output on local disk; on a remote store (S3) this dialect's read-through
    route (``outputs.py``), as the core's answers with a redirect the client's ``FileOutput`` does not follow."""
    base_url = services.settings.base_url
    if services.blobs.local_path(file.blob_key) is None:
        return f"{base_url}/v1/predictions/{task_id}/output/{file.name}"
    return file_url(base_url, file, services.keys)


def _render(services: Services, task: Task, files: Sequence[File], events: Sequence[Event] | None) -> dict[str, Any]:
    base_url = services.settings.base_url
    urls = [output_url(services, task.id, file) for file in files]
    logs = None if events is None else logs_of(task, task.read_job(), events)
    return prediction(base_url, task, files, urls, logs)
