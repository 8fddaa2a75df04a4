"""The task socket at ``/v1``: register with ``{"type": "task_info", "tasktoken": ...}``, then receive
every event of that task in order, the ones that happened before registration first.

No credentials: the task token is the capability (as on Wiro). Events come from the in-process hub
when the worker runs here, and from polling the event log otherwise (a worker on another process).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from dreamserve.events import TERMINAL, Event
from dreamserve.services import Services
from dreamserve.status import Frame, TaskStatus
from dreamserve.wire import file_item, socket_frame

router = APIRouter()

POLL_SECONDS = 0.5


@router.websocket("/v1")
@router.websocket("/v1/")
async def task_socket(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    await websocket.accept()
    lock = asyncio.Lock()
    followers: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                request = json.loads(await websocket.receive_text())
            except (json.JSONDecodeError, RecursionError):
                await _send(websocket, lock, {"type": "error", "message": "Send JSON frames.", "result": False})
                continue
            token = str(request.get("tasktoken", "")) if isinstance(request, dict) else ""
            if not isinstance(request, dict) or request.get("type") != Frame.INFO or not token:
                message = 'Register with {"type": "task_info", "tasktoken": "<socketaccesstoken>"}.'
                await _send(websocket, lock, {"type": "error", "message": message, "result": False})
                continue
            follower = asyncio.create_task(_follow(websocket, lock, services, token))
            followers.add(follower)
            follower.add_done_callback(followers.discard)
    except WebSocketDisconnect:
        pass
    finally:
        for follower in followers:
            follower.cancel()


async def _follow(websocket: WebSocket, lock: asyncio.Lock, services: Services, token: str) -> None:
    task = await services.store.get_by_token(token)
    if task is None:
        await _send(websocket, lock, {"type": "error", "message": "No task has that tasktoken.", "result": False})
        return
    # Subscribe before replaying, so nothing published in between is missed; ids drop the duplicates.
    live = services.hub.subscribe(task.id)
    last = 0
    try:
        pending = await services.store.events(task.id)
        while True:
            for event in sorted({e.id: e for e in pending if e.id > last}.values(), key=lambda e: e.id):
                await _send(websocket, lock, socket_frame(event.type, task.id, token, await _message(services, event)))
                last = event.id
                if event.type in TERMINAL:
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
    return [file_item(services.settings.base_url, file, services.keys) for file in files]


async def _send(websocket: WebSocket, lock: asyncio.Lock, frame: dict[str, Any]) -> None:
    async with lock:
        await websocket.send_text(json.dumps(frame))
