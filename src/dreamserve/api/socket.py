"""The task socket at ``/v1``: register with ``{"type": "task_info", "tasktoken": ...}``, then receive
every event of that task in order, the ones that happened before registration first.

No credentials: the task token is the capability (as on Wiro). A socket follows at most
``socket_max_tasks`` tasks, one address opens at most ``socket_max_per_address`` sockets, and a socket
that keeps sending frames that register nothing is closed with 1008 (policy violation). Events come
from the in-process hub when the worker runs here, and from polling the event log otherwise (a worker
on another process).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from dreamserve.queue.db import Task
from dreamserve.queue.events import Event
from dreamserve.services import Services
from dreamserve.status import FINAL, Frame, TaskStatus
from dreamserve.wiro.render import file_item, socket_frame

router = APIRouter()

POLL_SECONDS = 0.5
#: WebSocket close code for a client that broke the socket's rules (RFC 6455).
POLICY_VIOLATION = 1008


@router.websocket("/v1")
@router.websocket("/v1/")
async def task_socket(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    settings = services.settings
    address = websocket.client.host if websocket.client else ""
    open_sockets: Counter[str] = websocket.app.state.socket_addresses
    await websocket.accept()
    if open_sockets[address] >= settings.socket_max_per_address:
        reason = f"More than {settings.socket_max_per_address} task sockets from one address; close some first."
        await websocket.close(POLICY_VIOLATION, reason)
        return
    open_sockets[address] += 1
    lock = asyncio.Lock()
    followers: dict[str, asyncio.Task[None]] = {}
    bad = 0
    try:
        while True:
            error = await _register(websocket, lock, services, followers)
            if error is None:
                continue
            bad += 1
            if bad >= settings.socket_max_bad_frames:
                await websocket.close(POLICY_VIOLATION, f"{bad} frames that registered nothing; last: {error}"[:120])
                return
            await _send(websocket, lock, {"type": "error", "message": error, "result": False})
    except WebSocketDisconnect:
        pass
    finally:
        open_sockets[address] -= 1
        if open_sockets[address] <= 0:
            del open_sockets[address]
        for follower in followers.values():
            follower.cancel()


async def _register(
    websocket: WebSocket, lock: asyncio.Lock, services: Services, followers: dict[str, asyncio.Task[None]]
) -> str | None:
    """Read one frame and start following its task; the error to answer when it registered nothing.

    The lookup is awaited here, in the receive loop, so a socket has at most one query in flight however
    fast it sends; a token it already follows is ignored.
    """
    try:
        request = json.loads(await websocket.receive_text())
    except (json.JSONDecodeError, RecursionError):
        return "Send JSON frames."
    token = str(request.get("tasktoken", ""))[:128] if isinstance(request, dict) else ""
    if not isinstance(request, dict) or request.get("type") != Frame.INFO or not token:
        return 'Register with {"type": "task_info", "tasktoken": "<socketaccesstoken>"}.'
    for ended in [name for name, follower in followers.items() if follower.done()]:
        del followers[ended]
    if token in followers:
        return None
    limit = services.settings.socket_max_tasks
    if len(followers) >= limit:
        return f"This socket already follows {limit} tasks, the limit; open another socket, or wait for one to end."
    task = await services.store.get_by_token(token)
    if task is None:
        return "No task has that tasktoken."
    followers[token] = asyncio.create_task(_follow(websocket, lock, services, task, token))
    return None


async def _follow(websocket: WebSocket, lock: asyncio.Lock, services: Services, task: Task, token: str) -> None:
    # Subscribe before replaying, so nothing published in between is missed; ids drop the duplicates.
    live = services.hub.subscribe(task.id)
    last = 0
    try:
        pending = await services.store.events(task.id)
        while True:
            for event in sorted({e.id: e for e in pending if e.id > last}.values(), key=lambda e: e.id):
                last = event.id
                if event.type == Frame.OUTPUT_IMAGE:
                    continue
                await _send(websocket, lock, socket_frame(event.type, task.id, token, await _message(services, event)))
                if event.type in FINAL:
                    return
            pending = await live.next(POLL_SECONDS)
            if not pending:
                # Quiet for a while: read the log too, in case a writer could not reach this hub.
                pending = await services.store.events(task.id, after=last)
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        await live.close()


async def _message(services: Services, event: Event) -> Any:
    """The frame's message. The final one lists the outputs, rendered here from the stored file rows with this
    server's public URL and their derived access keys (never stored), so they equal Task/Detail's whichever
    host ran the task."""
    if event.type != TaskStatus.POSTPROCESS_END:
        return event.message
    files = (await services.store.files([event.task_id], "output"))[event.task_id]
    settings = services.settings
    return [file_item(settings.base_url, file, services.keys, settings.retention_seconds) for file in files]


async def _send(websocket: WebSocket, lock: asyncio.Lock, frame: dict[str, Any]) -> None:
    async with lock:
        await websocket.send_text(json.dumps(frame))
