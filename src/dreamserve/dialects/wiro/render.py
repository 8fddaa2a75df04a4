"""Wiro's wire shapes: numbers as strings, unix times as integer strings, a flat envelope.

Keys come in the order of the model page's samples (api-spec.md §1.5, WSAMPLE); our extensions follow them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from dreamserve.dialects.wiro.catalogue import CATEGORIES, DESCRIPTION, Tool
from dreamserve.facts import DeletedInput, LogText, Progress
from dreamserve.fileurls import expires, file_url
from dreamserve.queue.db import File, Task
from dreamserve.queue.keyring import ServerKey
from dreamserve.status import FINAL, Pexit, TaskStatus

#: Namespace of the per-project ``uuid`` Wiro shows on tasks and their outputs (its owner's id).
_PROJECT_UUIDS = uuid.UUID("6f1c3c2e-2b8e-5d55-9a8c-4f0d2c6d7e10")


def envelope(**fields: Any) -> dict[str, Any]:
    """Wiro's success envelope; key order follows the model page sample (errors, ..., result)."""
    return {"errors": [], **fields, "result": True}


def tasklist(tasks: list[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    """Task/Detail and Task/List: ``total, errors, tasklist, result``; Cancel and Kill: no ``total``."""
    head = {} if total is None else {"total": str(total)}
    return {**head, "errors": [], "tasklist": tasks, "result": True}


def project_uuid(project_id: int) -> str:
    return str(uuid.uuid5(_PROJECT_UUIDS, str(project_id)))


def unix(value: float | None) -> str:
    return str(int(value)) if value else "0"


def file_item(base_url: str, file: File, keys: ServerKey | None, retention_seconds: float = 0.0) -> dict[str, Any]:
    """A file as Wiro lists it. ``keys=None`` gives the stored form (event log, Redis streams): no access key and
    no URL, which ``feeds.py`` fills in when it sends the event."""
    accesskey = keys.accesskey(file) if keys is not None else ""
    expiry = expires(file, retention_seconds)
    item: dict[str, Any] = {
        "id": str(file.id),
        "name": file.name,
        "contenttype": file.contenttype,
        "parentid": str(file.folder_id or 0),
        "uuid": project_uuid(file.project_id),
        "size": str(file.size),
        "addedtime": unix(file.created),
        "modifiedtime": unix(file.created),
        "accesskey": accesskey,
        "foldercount": "0",
        "filecount": "0",
        "ispublic": 0,
        "expiretime": None if expiry is None else unix(expiry),
        "url": f"{base_url}/v1/File/{accesskey}/{file.name}" if keys is not None else "",
    }
    meta = file.meta
    if meta.seed is not None:
        # Ours, beyond Wiro: what it takes to reproduce this image.
        item.update(seed=str(meta.seed), width=str(meta.width), height=str(meta.height))
    return item


def progress_object(progress: Progress) -> dict[str, str]:
    """Wiro's progress object of a step: every value a string (a live step's preview follows them)."""
    rendered = {
        "type": "progressGenerate",
        "task": "Generate",
        "percentage": str(int(100 * progress.step / max(progress.total, 1))),
        "stepCurrent": str(progress.step),
        "stepTotal": str(progress.total),
        "speed": f"{progress.rate:.2f}",
        "speedType": "it/s",
        "elapsedTime": f"{progress.elapsed:.0f}s",
        "remainingTime": f"{progress.seconds_left:.0f}s",
    }
    if progress.preview is not None:
        rendered["preview"] = progress.preview
    return rendered


def event_message(message: Any) -> Any:
    """An event's message as Wiro's socket frame carries it."""
    if isinstance(message, Progress):
        return progress_object(message)
    if isinstance(message, LogText):
        return {"raw": message.raw}
    return message


def input_marker(position: int) -> str:
    """What earlier versions stored in ``parameters`` for an uploaded input in place of its URL (which holds its
    access key)."""
    return f"dreamserve:input/{position}"


def input_urls(base_url: str, task: Task, inputs: Sequence[File], keys: ServerKey) -> dict[int, str]:
    """The URLs of a task's input files, by position: of their rows, and of those its end deleted (the URL it was
    given stays its echo, though it answers 404 now)."""
    deleted = [_deleted_row(task, gone) for gone in task.details.deleted_inputs or ()]
    return {file.position: file_url(base_url, file, keys) for file in [*deleted, *inputs]}


def _deleted_row(task: Task, gone: DeletedInput) -> File:
    """A stand-in for a deleted input's row (never stored): what its URL is derived from."""
    return File(
        id=gone.id,
        project_id=task.project_id,
        position=gone.position,
        name=gone.name,
        key_salt=gone.key_salt,
        accesskey_sealed=gone.accesskey_sealed,
    )


def request_parameters(task: Task, input_urls: dict[int, str]) -> dict[str, Any]:
    """Task/Detail's ``parameters``: the request as Wiro echoes it, rendered from the task's job (its facts),
    with an uploaded input shown as its file's URL (``input_urls``, by position) and a URL input as given.

    Rows stored before the job kept the request's size and callbackUrl show the echo stored with them."""
    try:
        job = task.read_job()
    except ValidationError:
        job = None
    if job is None or job.asked_size is None:
        markers = {input_marker(position): url for position, url in input_urls.items()}
        return _legacy_parameters(task.parameters, markers)
    echo: dict[str, Any] = {
        "prompt": job.prompt,
        "size": "x".join(map(str, job.output_size)) if job.output_size else job.asked_size,
        "maxImages": str(job.num_images),
        "watermark": "true" if job.watermark else "false",
        "seed": str(job.seed),
    }
    inputs = [ref.url or input_urls.get(position, "") for position, ref in enumerate(job.references)]
    if inputs:
        echo["inputImage"] = inputs[0] if len(inputs) == 1 else inputs
    if job.asked_callback:
        echo["callbackUrl"] = job.asked_callback
    return echo


def _legacy_parameters(parameters: dict[str, Any], urls: dict[str, str]) -> dict[str, Any]:
    def one(value: Any) -> Any:
        if isinstance(value, str):
            return urls.get(value, value)
        if isinstance(value, list):
            return [one(item) for item in value]
        return value

    return {name: one(value) for name, value in parameters.items()}


def elapsed_seconds(task: Task, now: float) -> float:
    """Seconds on a worker: from assignment (model hand-off) to the end of post-processing."""
    if not task.assigntime:
        return 0.0
    end = task.postprocessendtime or task.canceltime or now
    return max(0.0, end - task.assigntime)


#: Task details that stay in the database and the server log: ``worker`` (of earlier versions) names a host and a
#: process id; ``deleted_inputs`` is what their URLs are derived from.
PRIVATE_DETAILS = frozenset({"worker", "deleted_inputs"})


def task_object(
    task: Task,
    outputs: list[File],
    *,
    keys: ServerKey,
    base_url: str,
    cps: float,
    now: float,
    inputs: Sequence[File] = (),
    retention_seconds: float = 0.0,
) -> dict[str, Any]:
    elapsed = elapsed_seconds(task, now)
    succeeded = task.status == TaskStatus.POSTPROCESS_END and task.pexit == Pexit.OK
    total_cost = cps * elapsed if succeeded else 0.0
    owner, _, project = task.model.partition("/")
    return {
        "id": str(task.id),
        "uuid": project_uuid(task.project_id),
        "name": "",
        "socketaccesstoken": keys.token(task),
        "parameters": request_parameters(task, input_urls(base_url, task, inputs, keys)),
        "debugoutput": task.debugoutput,
        "debugerror": task.debugerror,
        "starttime": unix(task.starttime),
        "endtime": unix(task.endtime),
        "elapsedseconds": f"{elapsed:.4f}",
        "status": task.status,
        "cps": f"{cps:.12f}",
        "totalcost": f"{total_cost:.12f}",
        "guestid": None,
        "projectid": str(task.project_id),
        "modelid": "0",
        "description": "",
        "basemodelid": "0",
        "runtype": "model",
        "modelfolderid": "",
        "modelfileid": "",
        "callbackurl": task.callback_url,
        "marketplaceid": None,
        "createtime": unix(task.createtime),
        "canceltime": unix(task.canceltime),
        "assigntime": unix(task.assigntime),
        "accepttime": unix(task.accepttime),
        "preprocessstarttime": unix(task.preprocessstarttime),
        "preprocessendtime": unix(task.preprocessendtime),
        "postprocessstarttime": unix(task.postprocessstarttime),
        "postprocessendtime": unix(task.postprocessendtime),
        "pexit": task.pexit if task.status in FINAL else "",
        # A JSON-encoded string on Wiro's task object (an array in Tool/*).
        "categories": json.dumps(list(CATEGORIES)),
        "outputs": [file_item(base_url, f, keys, retention_seconds) for f in outputs],
        "size": str(sum(f.size for f in outputs)),
        "modeldescription": DESCRIPTION,
        "modelslugowner": owner,
        "modelslugproject": project,
        # Ours, beyond Wiro: per-stage timings, generation method, attempts.
        "details": {name: value for name, value in task.details.dump().items() if name not in PRIVATE_DETAILS},
        "progress": None if task.progress is None else progress_object(task.progress),
        "attempts": str(task.attempts),
        # Queued tasks ahead of this one for its model ("0" = next), filled in by Task/Detail and Task/List
        # (it costs a query); "" once the task has left the queue.
        "queueposition": "",
    }


def socket_frame(event_type: str, task_id: int, token: str, message: Any) -> dict[str, Any]:
    return {"type": event_type, "id": str(task_id), "tasktoken": token, "message": message, "result": True}


def tool_item(tool: Tool, *, detail: bool = False) -> dict[str, Any]:
    """An entry of Tool/List and Tool/Explore; Tool/Detail adds ``parameters`` (Wiro's field order)."""
    stats = tool.stats
    item: dict[str, Any] = {
        "id": str(tool.id),
        "title": tool.title,
        "slugowner": tool.slugowner,
        "slugproject": tool.slugproject,
        "cleanslugowner": tool.slugowner,
        "cleanslugproject": tool.slugproject,
        "description": tool.description,
        "seodescription": tool.description,
        "categories": list(tool.categories),
        "image": "",
        "computingtime": f"{stats.mean_seconds:.4f}",
        "tags": list(tool.tags),
        "readme": tool.readme,
        "samples": [],
        # A JSON string, as Wiro sends it (api-spec.md §1.11): a price per second on a worker.
        "dynamicprice": json.dumps([{"inputs": {}, "price": tool.cps, "priceMethod": "cps"}]),
        "cps": f"{tool.cps:.12f}",
        "approximatelycost": f"{tool.cps * stats.mean_seconds:.12f}",
        "taskstat": {
            "runcount": str(stats.runcount),
            "successcount": str(stats.successcount),
            "errorcount": str(stats.errorcount),
            "lastruntime": unix(stats.lastruntime),
        },
    }
    if detail:
        item["parameters"] = [
            {"title": group.title, "items": [asdict(parameter) for parameter in group.items]}
            for group in tool.parameters
        ]
    return item


def tool_list(page: Sequence[Tool], total: int) -> dict[str, Any]:
    """Tool/List: ``result, errors, total, tool`` (api-spec.md §1.3)."""
    return {"result": True, "errors": [], "total": str(total), "tool": [tool_item(tool) for tool in page]}


def tool_detail(tool: Tool) -> dict[str, Any]:
    return {"result": True, "errors": [], "tool": [tool_item(tool, detail=True)]}


def tool_explore(tools: Sequence[Tool]) -> dict[str, Any]:
    """Tool/Explore: sections of tools; here one, of every model served."""
    section = {"id": "1", "title": "Served here", "tools": [tool_item(tool) for tool in tools]}
    return {"result": True, "errors": [], "explore": [section]}
