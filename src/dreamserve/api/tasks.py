"""``/v1/Task/*``: Detail, List, Cancel (queued, or running at the next step) and Kill (running, at once)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import ProjectDep, ServicesDep, read_fields
from dreamserve.db import Project, Task
from dreamserve.errors import InvalidRequest, InvalidState, NotFound
from dreamserve.events import RUNNING, TERMINAL
from dreamserve.params import MAX_ID, ascii_int
from dreamserve.status import StopKind, TaskStatus
from dreamserve.webhooks import delivery_log
from dreamserve.wire import envelope

router = APIRouter()


async def _find(request: Request, services: ServicesDep, project: Project) -> Task:
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
        raise InvalidRequest("taskid or socketaccesstoken is required")
    if task is None:
        raise NotFound("There is no task yet. No task of this project has that taskid or tasktoken.")
    return task


async def _render(services: ServicesDep, task_id: int) -> dict[str, Any] | None:
    rendered = await services.render(task_id)
    if rendered is not None and rendered["status"] == TaskStatus.QUEUE:
        task = await services.store.get_by_id(task_id)
        if task is not None and task.status == TaskStatus.QUEUE:
            rendered["queueposition"] = str(await services.store.queue_position(task))
    return rendered


async def _tasklist(services: ServicesDep, task_id: int) -> dict[str, Any]:
    rendered = await _render(services, task_id)
    return envelope(total="1", tasklist=[rendered] if rendered else [])


@router.post("/v1/Task/Detail")
async def detail(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    task = await _find(request, services, project)
    return await _tasklist(services, task.id)


@router.post("/v1/Task/Cancel")
async def cancel(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: stopped at the next denoising step; the model stays loaded."""
    task = await _find(request, services, project)
    await _stop(services, task, StopKind.CANCEL, "Task is not in a cancellable state. Task {id} is {status}.")
    return await _tasklist(services, task.id)


@router.post("/v1/Task/Kill")
async def kill(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: its model process is terminated (and restarted for the next task)."""
    task = await _find(request, services, project)
    await _stop(services, task, StopKind.KILL, "Task could not be killed: task {id} is {status}.")
    return await _tasklist(services, task.id)


async def _stop(services: ServicesDep, task: Task, kind: str, refusal: str) -> None:
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
    fields = await read_fields(request, max_file_bytes=0)
    start = _int(fields, "start", 0)
    limit = min(_int(fields, "limit", 20), 100)
    ids, total = await services.store.list_ids(project.id, start=start, limit=limit)
    tasks = [await _render(services, task_id) for task_id in ids]
    return envelope(total=str(total), tasklist=[t for t in tasks if t])


def _int(fields: dict[str, list[Any]], name: str, default: int) -> int:
    return ascii_int(str(fields.get(name, [default])[-1]), name, low=0, high=10**9)


def _status(task: Task | None) -> str:
    if task is None:
        return "gone"
    if task.status in TERMINAL:
        return f"already finished ({task.status})"
    return task.status
