"""The task socket at ``/v1``: register with ``{"type": "task_info", "tasktoken": ...}``, then receive
every event of that task in order, the ones that happened before registration first.

No credentials: the task token is the capability (as on Wiro). So that no client, however many addresses
it has, makes the server spend more than the caps allow: this process holds at most ``socket_max_total``
sockets, one address opens at most ``socket_max_per_address``, a socket follows at most
``socket_max_tasks`` tasks, one project's tasks have at most ``socket_max_per_project`` follows, and a
socket that keeps sending frames that register nothing, or stops reading its frames, is closed with 1008
(policy violation). The frames come from the task's shared feed (``feeds.py``), never from a read per
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect

from dreamserve.dialects.wiro.feeds import Follower, Refused, TaskFeeds
from dreamserve.services import Services
from dreamserve.settings import Settings
from dreamserve.status import Frame

router = APIRouter()

#: WebSocket close code for a client that broke the socket's rules (RFC 6455).
POLICY_VIOLATION = 1008
#: Seconds a closing handshake may take; a client that does not read has it cut short.
CLOSE_SECONDS = 1.0


@contextlib.asynccontextmanager
async def sockets(app: FastAPI, services: Services) -> AsyncIterator[None]:
    """The sockets' state while the app runs (``dialects/mount.py``): the shared feeds, the open sockets by
    address."""
    app.state.socket_feeds = feeds = TaskFeeds(services)
    app.state.socket_addresses = Counter()
    try:
        yield
    finally:
        await feeds.close()


@router.websocket("/v1")
@router.websocket("/v1/")
async def task_socket(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    feeds: TaskFeeds = websocket.app.state.socket_feeds
    address = websocket.client.host if websocket.client else ""
    open_sockets: Counter[str] = websocket.app.state.socket_addresses
    await websocket.accept()
    refusal = _over_cap(services.settings, open_sockets, address)
    if refusal is not None:
        await websocket.close(POLICY_VIOLATION, refusal)
        return
    open_sockets[address] += 1
    follower = Follower(services.settings.socket_send_frames)
    try:
        reason = await _serve(websocket, services, feeds, follower)
        if reason is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(POLICY_VIOLATION, reason[:120]), CLOSE_SECONDS)
    finally:
        feeds.leave(follower)
        open_sockets[address] -= 1
        if open_sockets[address] <= 0:
            del open_sockets[address]


def _over_cap(settings: Settings, open_sockets: Counter[str], address: str) -> str | None:
    if open_sockets.total() >= settings.socket_max_total:
        return f"This server has {settings.socket_max_total} task sockets open, its limit; try again later."
    if open_sockets[address] >= settings.socket_max_per_address:
        return f"More than {settings.socket_max_per_address} task sockets from one address; close some first."
    return None


async def _serve(websocket: WebSocket, services: Services, feeds: TaskFeeds, follower: Follower) -> str | None:
    """Receive registrations and send the follower's frames until the client leaves; the reason to close
    with 1008, if it broke a rule."""
    receiving = asyncio.create_task(_receive(websocket, services, feeds, follower))
    sending = asyncio.create_task(_send(websocket, follower))
    dropped = asyncio.create_task(follower.dropped.wait())
    try:
        await asyncio.wait({receiving, sending, dropped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiving, sending, dropped):
            task.cancel()
    if dropped.done() and not dropped.cancelled():
        return f"This socket fell {follower.limit} frames behind; read the frames as they come."
    if receiving.done() and not receiving.cancelled() and not isinstance(receiving.exception(), WebSocketDisconnect):
        return receiving.result()
    return None


async def _receive(websocket: WebSocket, services: Services, feeds: TaskFeeds, follower: Follower) -> str:
    """Registrations until one breaks a rule: the reason (a client that leaves ends it with WebSocketDisconnect)."""
    bad = 0
    limit = services.settings.socket_max_bad_frames
    while True:
        try:
            error = await _register(websocket, services, feeds, follower)
        except Refused as refused:
            return str(refused)
        if error is None:
            continue
        bad += 1
        if bad >= limit:
            return f"{bad} frames that registered nothing; last: {error}"
        follower.push(json.dumps({"type": "error", "message": error, "result": False}))


async def _register(websocket: WebSocket, services: Services, feeds: TaskFeeds, follower: Follower) -> str | None:
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
    if follower.follows(token):
        return None
    limit = services.settings.socket_max_tasks
    if len(follower.feeds) >= limit:
        return f"This socket already follows {limit} tasks, the limit; open another socket, or wait for one to end."
    task = await services.store.get_by_token(token)
    if task is None:
        return "No task has that tasktoken."
    await feeds.follow(follower, task, token)
    return None


async def _send(websocket: WebSocket, follower: Follower) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await websocket.send_text(await follower.next())
