"""Wiro's wire shapes: numbers as strings, unix times as integer strings, a flat envelope."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dreamserve.db import File, Task
from dreamserve.events import TERMINAL
from dreamserve.keyring import ServerKey
from dreamserve.status import Pexit, TaskStatus

CATEGORIES = json.dumps(["tool", "text-to-image", "image-to-image", "image-editing"])


def envelope(**fields: Any) -> dict[str, Any]:
    """Wiro's success envelope; key order follows the model page sample (errors, ..., result)."""
    return {"errors": [], **fields, "result": True}


def unix(value: float | None) -> str:
    return str(int(value)) if value else "0"


def file_url(base_url: str, file: File, keys: ServerKey) -> str:
    return f"{base_url}/v1/File/{keys.accesskey(file)}/{file.name}"


def file_item(base_url: str, file: File, keys: ServerKey | None) -> dict[str, Any]:
    """A file as Wiro lists it. ``keys=None`` gives the stored form (event log, Redis streams): no access key and
    no URL, which ``api/socket.py`` fills in when it sends the event."""
    accesskey = keys.accesskey(file) if keys is not None else ""
    item: dict[str, Any] = {
        "id": str(file.id),
        "name": file.name,
        "contenttype": file.contenttype,
        "parentid": str(file.folder_id or 0),
        "uuid": "",
        "size": str(file.size),
        "addedtime": unix(file.created),
        "modifiedtime": unix(file.created),
        "accesskey": accesskey,
        "foldercount": "0",
        "filecount": "0",
        "ispublic": 0,
        "expiretime": None,
        "url": f"{base_url}/v1/File/{accesskey}/{file.name}" if keys is not None else "",
    }
    if "seed" in file.meta:
        # Ours, beyond Wiro: what it takes to reproduce this image.
        item.update(seed=str(file.meta["seed"]), width=str(file.meta["width"]), height=str(file.meta["height"]))
    return item


def input_marker(position: int) -> str:
    """What ``parameters`` stores for an uploaded input in place of its URL (which holds its access key)."""
    return f"dreamserve:input/{position}"


def render_parameters(parameters: dict[str, Any], urls: dict[str, str]) -> dict[str, Any]:
    """The echo of the request with every input marker replaced by that input file's URL."""

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


#: Task details that stay in the database and the server log: ``worker`` names a host and a process id.
PRIVATE_DETAILS = frozenset({"worker"})


def task_object(
    task: Task,
    outputs: list[File],
    *,
    keys: ServerKey,
    base_url: str,
    cps: float,
    now: float,
    inputs: Sequence[File] = (),
) -> dict[str, Any]:
    elapsed = elapsed_seconds(task, now)
    succeeded = task.status == TaskStatus.POSTPROCESS_END and task.pexit == Pexit.OK
    total_cost = cps * elapsed if succeeded else 0.0
    owner, _, project = task.model.partition("/")
    return {
        "id": str(task.id),
        "uuid": "",
        "name": "",
        "socketaccesstoken": keys.token(task),
        "parameters": render_parameters(
            task.parameters, {input_marker(f.position): file_url(base_url, f, keys) for f in inputs}
        ),
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
        "basemodelid": "0",
        "description": "",
        "runtype": "model",
        "modelfolderid": "",
        "modelfileid": "",
        "callbackurl": task.callback_url,
        "marketplaceid": None,
        "createtime": unix(task.createtime),
        "accepttime": unix(task.accepttime),
        "preprocessstarttime": unix(task.preprocessstarttime),
        "preprocessendtime": unix(task.preprocessendtime),
        "assigntime": unix(task.assigntime),
        "postprocessstarttime": unix(task.postprocessstarttime),
        "postprocessendtime": unix(task.postprocessendtime),
        "canceltime": unix(task.canceltime),
        "pexit": task.pexit if task.status in TERMINAL else "",
        "categories": CATEGORIES,
        "outputs": [file_item(base_url, f, keys) for f in outputs],
        "size": str(sum(f.size for f in outputs)),
        "modeldescription": "Seedream 4.0 compatible text-to-image and multi-reference editing on open weights.",
        "modelslugowner": owner,
        "modelslugproject": project,
        # Ours, beyond Wiro: per-stage timings, generation method, attempts.
        "details": {name: value for name, value in (task.details or {}).items() if name not in PRIVATE_DETAILS},
        "progress": task.progress,
        "attempts": str(task.attempts),
        # Queued tasks ahead of this one for its model ("0" = next), filled in by Task/Detail and Task/List
        # (it costs a query); "" once the task has left the queue.
        "queueposition": "",
    }


def socket_frame(event_type: str, task_id: int, token: str, message: Any) -> dict[str, Any]:
    return {"type": event_type, "id": str(task_id), "tasktoken": token, "message": message, "result": True}
