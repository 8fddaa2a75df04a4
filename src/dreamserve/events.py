"""Live fan-out of task events inside one process.

The durable event log is the ``task_events`` table (written by ``store.TaskStore`` in the same
transaction as the status change); this hub only wakes the WebSockets that are watching a task.
A socket subscribes first, then replays the log, then drains the hub, skipping ids it has sent.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int
    type: str
    message: Any


#: Statuses in Wiro's order; any of the last two ends a task.
LIFECYCLE = (
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_assign",
    "task_start",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
    "task_cancel",
)
TERMINAL = frozenset({"task_postprocess_end", "task_cancel"})
#: Tasks in these statuses hold a worker lease.
RUNNING = frozenset(LIFECYCLE[1:8])


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[int, set[asyncio.Queue[Event]]] = defaultdict(set)

    def subscribe(self, task_id: int) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[task_id].add(queue)
        return queue

    def unsubscribe(self, task_id: int, queue: asyncio.Queue[Event]) -> None:
        subscribers = self._subscribers.get(task_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[task_id]

    def publish(self, event: Event) -> None:
        for queue in self._subscribers.get(event.task_id, ()):
            queue.put_nowait(event)
