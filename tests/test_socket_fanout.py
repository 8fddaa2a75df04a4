"""Issue 30 item 6 through the real server: the task sockets' caps (all addresses together, one project's
tasks), a writer whose events reach the sockets only through the log, and many followers of one task each
getting its whole log in order from the task's shared feed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dreamserve.dialects.wiro.feeds import Follower
from dreamserve.projects import create_project
from dreamserve.queue.events import Event
from dreamserve.services import Services
from dreamserve.settings import Settings
from dreamserve.status import Frame
from tests.conftest import MODEL, LiveServer


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1"


async def follow(server: LiveServer, address: str, *tokens: str) -> ClientConnection:
    """A socket from source ``address`` (any 127.x.y.z reaches a server on 127.0.0.1) following ``tokens``."""
    ws = await connect(ws_url(server), local_addr=(address, 0))
    for token in tokens:
        await ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
    return ws


async def frames(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]


async def refusal(ws: ClientConnection) -> str:
    """The reason the server closed ``ws`` with 1008."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value
    return closed.value.rcvd.reason


async def reopen(server: LiveServer, address: str, token: str) -> list[dict[str, Any]]:
    """``follow``'s first frame, once the server has counted out a socket just closed (its handler ends a moment
    after the closing handshake)."""
    for _ in range(50):
        ws = await follow(server, address, token)
        try:
            return [json.loads(await asyncio.wait_for(ws.recv(), 10))]
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and "task sockets open" in closed.rcvd.reason, closed
        finally:
            await ws.close()
        await asyncio.sleep(0.1)
    raise AssertionError("the closed socket was never counted out")


async def stored(settings: Settings, task_id: int, write: bool = False) -> list[Event]:
    """The task's log, read by a process of its own (``write``: after cancelling the task there, with a hub
    the server never hears from)."""
    services = Services(settings, workers="none")
    try:
        if write:
            assert await services.store.cancel_queued(task_id) is not None
        return await services.store.events(task_id)
    finally:
        await services.engine.dispose()


def test_socket_caps_for_all_addresses_and_per_project_and_a_log_only_writer(make_live: Any) -> None:
    server: LiveServer = make_live(
        model={"max_pixels": 64 * 64},
        min_pixels=64 * 64,
        run_workers=False,
        socket_max_total=5,
        socket_max_per_address=3,
        socket_max_per_project=3,
        socket_max_tasks=2,
    )
    other = create_project(server.settings, "other", signature=True)

    def submit(creds: Any = None) -> dict[str, Any]:
        body = server.post(f"/v1/Run/{MODEL}", creds, json={"prompt": "x", "size": "64x64"}).json()
        assert body["result"] is True, body
        return dict(body)

    ours = [submit() for _ in range(3)]
    theirs = submit(other)
    tokens = [run["socketaccesstoken"] for run in ours]

    async def scenario() -> None:
        first = await follow(server, "127.0.0.1", tokens[0], tokens[1])
        second = await follow(server, "127.0.0.1", tokens[2])
        assert [f["type"] for f in await frames(first, 2) + await frames(second, 1)] == ["task_queue"] * 3
        # The project's tasks have 3 follows, its cap: a fourth, from another address, closes its socket.
        over = await follow(server, "127.0.0.2", tokens[0])
        assert "This project's tasks already have 3 socket followers, the limit" in await refusal(over)
        # The cap is the project's: another project's task is followed, and more sockets open up to 5 in all.
        third = await follow(server, "127.0.0.2", theirs["socketaccesstoken"])
        assert (await frames(third, 1))[0]["tasktoken"] == theirs["socketaccesstoken"]
        idle = [await follow(server, "127.0.0.3"), await follow(server, "127.0.0.4")]
        beyond = await follow(server, "127.0.0.5")
        assert "This server has 5 task sockets open, its limit" in await refusal(beyond)

        # Cancelled by a process whose hub this server never hears: the frames come from the log, in its order.
        log = await stored(server.settings, int(ours[0]["taskid"]), write=True)
        assert [e.type for e in log][-1] == "task_cancel", log
        expected = [e.type for e in log if e.type != Frame.OUTPUT_IMAGE][1:]
        got = await frames(first, len(expected))
        assert [(f["type"], f["tasktoken"]) for f in got] == [(t, tokens[0]) for t in expected]

        # The ended task freed its follow: the project may follow one more, and a late follower of a task
        # already followed gets its history from the shared feed.
        await idle[0].close()
        late = await reopen(server, "127.0.0.3", tokens[1])
        assert [(f["type"], f["tasktoken"]) for f in late] == [("task_queue", tokens[1])]
        for ws in (first, second, third, idle[1]):
            await ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_every_follower_of_a_running_task_gets_its_log_in_order(tiny_server: LiveServer) -> None:
    server = tiny_server
    run = server.run({"prompt": "fan-out", "size": "1K", "maxImages": 1})
    token = run["socketaccesstoken"]

    async def until_end(ws: ClientConnection) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in ("task_postprocess_end", "task_error", "task_cancel"):
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return got

    async def scenario() -> list[list[dict[str, Any]]]:
        sockets = [await follow(server, f"127.0.1.{n + 2}", token) for n in range(6)]
        seen = await asyncio.gather(*(until_end(ws) for ws in sockets))
        # One more once it ended: the log replayed.
        late = await follow(server, "127.0.1.9", token)
        seen.append(await until_end(late))
        for ws in [*sockets, late]:
            await ws.close()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 90))
    log = asyncio.run(stored(server.settings, int(run["taskid"])))
    expected = [e.type for e in log if e.type != Frame.OUTPUT_IMAGE]
    assert expected[0] == "task_queue" and expected[-1] == "task_postprocess_end", expected

    def without_preview(frame: dict[str, Any]) -> dict[str, Any]:
        if frame["type"] == "task_output" and isinstance(frame["message"], dict):
            return {**frame, "message": {k: v for k, v in frame["message"].items() if k != "preview"}}
        return frame

    for got in seen:
        assert [f["type"] for f in got] == expected
        assert [without_preview(f) for f in got] == [without_preview(f) for f in seen[-1]]


def test_a_follower_that_falls_behind_is_dropped_not_waited_for() -> None:
    async def scenario() -> None:
        follower = Follower(limit=16)
        for number in range(16):
            follower.push(str(number))
        assert not follower.dropped.is_set()
        assert [await follower.next() for _ in range(2)] == ["0", "1"], "frames leave in order"
        follower.push("16")
        follower.push("17")
        assert not follower.dropped.is_set(), "16 frames waiting, the most allowed"
        follower.push("18")
        assert follower.dropped.is_set(), "a 17th frame waiting: the socket is to be closed"
        follower.push("19")
        assert not follower._frames, "a dropped socket's frames are let go, and it gets no more"

    asyncio.run(scenario())
