"""Task events over Redis Streams, so a socket on any API replica sees events written on any host.

One stream per task (``dreamserve:task:<id>:events``), capped near 1000 entries and expiring a day
after the terminal event. Each entry carries the event's id in the SQL log, which stays the truth:
sockets replay from SQL and use the stream for live delivery, dropping ids already sent.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from dreamserve.queue.events import Event, Subscription, dump_message, load_message
from dreamserve.status import FINAL

STREAM_MAXLEN = 1000
TERMINAL_TTL_SECONDS = 24 * 3600


def stream_key(task_id: int) -> str:
    return f"dreamserve:task:{task_id}:events"


class RedisEventHub:
    def __init__(self, url: str) -> None:
        self.redis: Redis = Redis.from_url(url)

    async def publish(self, event: Event) -> None:
        key = stream_key(event.task_id)
        fields: dict[Any, Any] = {
            "id": event.id,
            "type": event.type,
            "message": json.dumps(dump_message(event.message)),
        }
        await self.redis.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)
        if event.type in FINAL:
            await self.redis.expire(key, TERMINAL_TTL_SECONDS)

    def subscribe(self, task_id: int) -> Subscription:
        return _StreamSubscription(self.redis, task_id)

    async def close(self) -> None:
        await self.redis.aclose()


class _StreamSubscription:
    def __init__(self, redis: Redis, task_id: int) -> None:
        self._redis = redis
        self._task_id = task_id
        # From the start of the stream: the socket drops what it already replayed from SQL.
        self._last = "0-0"

    async def next(self, timeout: float) -> list[Event]:
        key = stream_key(self._task_id)
        reply: Any = await self._redis.xread({key: self._last}, count=200, block=max(1, int(timeout * 1000)))
        events = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event_type = fields[b"type"].decode()
                message = load_message(event_type, json.loads(fields[b"message"]))
                events.append(Event(int(fields[b"id"]), self._task_id, event_type, message))
        return events

    async def close(self) -> None:
        return None
