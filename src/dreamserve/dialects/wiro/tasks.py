"""Wiro's ``/v1/Task/*``: Detail, List, Cancel (queued, or running at the next step), Kill (running, at once) and
InputOutputDelete (a finished task's files)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import ProjectDep, ServicesDep, read_fields, read_page, text_field
from dreamserve.dialects.wire import MAX_ID, ascii_int
from dreamserve.dialects.wiro.render import envelope, task_object, tasklist
from dreamserve.errors import InvalidRequest, InvalidState, NotFound
from dreamserve.queue.db import Project, Task
from dreamserve.queue.store import LIST_SORTS
from dreamserve.services import Services
from dreamserve.status import FINAL, RUNNING, FileRole, StopKind, TaskStatus
from dreamserve.webhooks import delivery_log

NO_TASK = "There is no task yet. No task of this project has that taskid or tasktoken."

router = APIRouter()


async def _find(request: Request, services: ServicesDep, project: Project, missing: str = NO_TASK) -> Task:
    """Accept ``taskid``, ``tasktoken`` or ``socketaccesstoken``: Wiro's docs and clients use all three."""
    fields = await read_fields(request, max_file_bytes=0)
    value = {name: str(values[-1]).strip() for name, values in fields.items() if values}
    taskid = value.get("taskid", "")
    token = value.get("tasktoken") or value.get("socketaccesstoken")
    if taskid:
        number = ascii_int(taskid, "taskid", low=0, high=MAX_ID)
        task = await services.store.get(project_id=project.id, taskid=number)
    elif token:
        task = await services.store.get(project_id=project.id, token=token)
    else:
        raise InvalidRequest(
            'taskid or tasktoken is required: send {"tasktoken": "<socketaccesstoken from Run>"} '
            'or {"taskid": "<taskid from Run>"}.'
        )
    if task is None:
        raise NotFound(missing)
    return task


async def task_object_of(services: Services, task: Task) -> dict[str, Any]:
    """The task object of a row just read (Task/Detail's, a ``completed`` callback's): its files in one query,
    the row not read again."""
    files = await services.store.files([task.id], (FileRole.OUTPUT, FileRole.INPUT))
    outputs = [file for file in files[task.id] if file.role == FileRole.OUTPUT]
    inputs = [file for file in files[task.id] if file.role == FileRole.INPUT]
    settings = services.settings
    return task_object(
        task,
        outputs,
        inputs=inputs,
        keys=services.keys,
        base_url=settings.base_url,
        cps=settings.cost_per_second,
        now=time.time(),
        retention_seconds=settings.retention_seconds,
    )


async def _render(services: ServicesDep, task: Task) -> dict[str, Any]:
    """The task object of a row as read, with its queue position while it is queued."""
    rendered = await task_object_of(services, task)
    if task.status == TaskStatus.QUEUE:
        rendered["queueposition"] = str(await services.store.queue_position(task))
    return rendered


async def _render_id(services: ServicesDep, task_id: int) -> dict[str, Any] | None:
    task = await services.store.get_by_id(task_id)
    return None if task is None else await _render(services, task)


async def _tasklist(services: ServicesDep, task_id: int, *, with_total: bool) -> dict[str, Any]:
    rendered = await _render_id(services, task_id)
    tasks = [rendered] if rendered else []
    return tasklist(tasks, len(tasks) if with_total else None)


@router.post("/v1/Task/Detail")
async def detail(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    # The row _find read is the one rendered: one read of the task, one of its files.
    task = await _find(request, services, project)
    return tasklist([await _render(services, task)], 1)


@router.post("/v1/Task/Cancel")
async def cancel(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: stopped at the next denoising step; the model stays loaded."""
    task = await _find(request, services, project)
    await _stop(services, task, StopKind.CANCEL, "Task is not in a cancellable state. Task {id} is {status}.")
    return await _tasklist(services, task.id, with_total=False)


@router.post("/v1/Task/Kill")
async def kill(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: its model process is terminated (and restarted for the next task)."""
    task = await _find(request, services, project)
    await _stop(services, task, StopKind.KILL, "Task could not be killed: task {id} is {status}.")
    return await _tasklist(services, task.id, with_total=False)


@router.post("/v1/Task/InputOutputDelete")
async def input_output_delete(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Delete every file of a finished task (inputs, outputs, partial images streamed before a cancel), bytes and
    rows; their URLs answer 404 at once. Again is a no-op."""
    task = await _find(request, services, project, missing="task-not-exist")
    if task.status not in FINAL:
        raise InvalidState(
            f"Task must be completed or cancelled before deleting files. Task {task.id} is {task.status}: "
            "wait for it to end, or cancel it first."
        )
    await services.store.delete_task_files(task.id)
    return envelope()


async def _stop(services: ServicesDep, task: Task, kind: StopKind, refusal: str) -> None:
    if await services.store.cancel_queued(task.id) is not None:
        return
    fresh = await services.store.get_by_id(task.id)
    if fresh is None or fresh.status not in RUNNING:
        raise InvalidState(refusal.format(id=task.id, status=_status(fresh)))
    await services.stop_task(task.id, kind)
    # Answer with the final state: the worker sees the request at once here, or at its next heartbeat.
    grace = services.settings.cancel_grace_seconds if kind == StopKind.CANCEL else 0.0
    await services.wait_terminal(task.id, grace + 2 * services.settings.heartbeat_seconds + 5)


@router.post("/v1/Task/Webhooks")
async def webhooks(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Ours: the callback delivery log of a task (attempts, answers, errors)."""
    task = await _find(request, services, project)
    deliveries = await delivery_log(services.sessions, task.id)
    return envelope(total=str(len(deliveries)), deliveries=deliveries)


@router.post("/v1/Task/List")
async def task_list(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Wiro's MCP body: ``{type: "model", sort: "id", order: "DESC", start, limit, modelName}``."""
    fields = await read_fields(request, max_file_bytes=0)
    page = read_page(fields, list(LIST_SORTS), order="DESC")
    kind = text_field(fields, "type").lower()
    if kind not in ("", "model"):
        return tasklist([], 0)  # every task here is a model task
    ids, total = await services.store.list_ids(
        project.id,
        start=page.start,
        limit=page.limit,
        model_part=text_field(fields, "modelName")[:200],
        sort=page.sort,
        descending=page.descending,
    )
    tasks = [await _render_id(services, task_id) for task_id in ids]
    return tasklist([t for t in tasks if t], total)


def _status(task: Task | None) -> str:
    if task is None:
        return "gone"
    if task.status in FINAL:
        return f"already finished ({task.status})"
    return task.status
