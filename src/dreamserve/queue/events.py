"""Live fan-out of task events.

The durable event log is the ``task_events`` table (written by ``store.TaskStore`` in the same
transaction as the status change). A hub only carries events to the sockets watching a task:
``EventHub`` inside one process, ``RedisEventHub`` (one Redis stream per task) across API replicas
and worker hosts. A socket subscribes first, then replays the log, then drains its subscription,
dropping ids it has already sent, so nothing is lost or repeated.

An event's message is a ``facts`` record for the events that report one (a step's ``Progress``, an
``ImageReport``, a ``LogText``), else a plain value (a stderr line, ``cancelled``): stored and streamed as JSON
(``dump_message``) and read back as the record its type names (``load_message``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from dreamserve.facts import ImageReport, LogText, Progress, Record
from dreamserve.status import Frame

#: An event's message: a record, or what Wiro's frame carries as is (a log line, ``[]``, nothing).
Message = Progress | ImageReport | LogText | str | list[Any] | None

#: The record each kind of event reports.
RECORDS: dict[str, type[Progress] | type[ImageReport] | type[LogText]] = {
    Frame.OUTPUT: Progress,
    Frame.OUTPUT_IMAGE: ImageReport,
    Frame.OUTPUT_FULL: LogText,
    Frame.ERROR_FULL: LogText,
}


def dump_message(message: Message) -> Any:
    """A message as JSON stores it (the event log, a Redis stream)."""
    return message.dump() if isinstance(message, Record) else message


def load_message(event_type: str, stored: Any) -> Message:
    """A stored message read back as the record its event reports (what earlier versions stored included)."""
    record = RECORDS.get(event_type)
    if record is not None and isinstance(stored, dict):
        return record.read(stored)
    plain: Message = stored  # a log line, ``[]`` or nothing, stored as is
    return plain


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int
    type: str
    message: Message


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
