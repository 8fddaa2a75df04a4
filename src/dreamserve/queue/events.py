"""Live fan-out of task events.

The durable event log is the ``task_events`` table (written by ``store.TaskStore`` in the same
transaction as the status change). A hub only carries events to the sockets watching a task:
``EventHub`` inside one process, ``RedisEventHub`` (one Redis stream per task) across API replicas
and worker hosts. A socket subscribes first, then replays the log, then drains its subscription,
dropping ids it has already sent, so nothing is lost or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int
    type: str
    message: Any


class Subscription(Protocol):
    async def next(self, timeout: float) -> list[Event]:
        """Events published since the last call (possibly some already seen); [] after ``timeout`` seconds."""

    async def close(self) -> None: ...


class Hub(Protocol):
    async def publish(self, event: Event) -> None: ...

    def subscribe(self, task_id: int) -> Subscription: ...

    async def close(self) -> None: ...


class EventHub:
    """In-process hub: one asyncio queue per watching socket."""

    def __init__(self) -> None:
        self._queues: dict[int, set[asyncio.Queue[Event]]] = defaultdict(set)

    async def publish(self, event: Event) -> None:
        for queue in self._queues.get(event.task_id, ()):
            queue.put_nowait(event)

    def subscribe(self, task_id: int) -> Subscription:
        return _LocalSubscription(self, task_id)

    async def close(self) -> None:
        self._queues.clear()


class _LocalSubscription:
    def __init__(self, hub: EventHub, task_id: int) -> None:
        self._hub = hub
        self._task_id = task_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        hub._queues[task_id].add(self._queue)

    async def next(self, timeout: float) -> list[Event]:
        events = []
        with contextlib.suppress(TimeoutError):
            events.append(await asyncio.wait_for(self._queue.get(), timeout))
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    async def close(self) -> None:
        queues = self._hub._queues.get(self._task_id)
        if queues is not None:
            queues.discard(self._queue)
            if not queues:
                del self._hub._queues[self._task_id]
