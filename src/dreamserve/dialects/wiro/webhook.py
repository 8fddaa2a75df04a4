"""Wiro's callbacks (``callbackUrl``), the ``webhooks.CallbackFormat`` of every task but another dialect's: the task
object on ``completed``, else the outbox's small record with the task's last step as Wiro's progress object; signed
``x-dreamserve-*`` with the project's webhook secret (``signing.sign_webhook``)."""

from __future__ import annotations

from typing import Any

from dreamserve.dialects.wiro.render import progress_object
from dreamserve.dialects.wiro.tasks import task_object_of
from dreamserve.facts import Progress
from dreamserve.services import Services
from dreamserve.signing import sign_webhook
from dreamserve.webhooks import CallbackEvent


class WiroCallbacks:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def body(self, task_id: int, event: str, payload: CallbackEvent) -> Any:
        if event == "completed":
            task = await self.services.store.get_by_id(task_id)
            return None if task is None else await task_object_of(self.services, task)
        return progress_record(payload)

    def headers(self, delivery_id: int, event: str, timestamp: str, body: bytes, secret: str) -> dict[str, str]:
        return {
            "x-dreamserve-event": event,
            "x-dreamserve-delivery": str(delivery_id),
            "x-dreamserve-timestamp": timestamp,
            "x-dreamserve-signature": sign_webhook(secret, timestamp, body),
        }


def progress_record(payload: CallbackEvent) -> dict[str, Any]:
    """The outbox's record with its step (a ``Progress`` dump) as Wiro's progress object. Rows of earlier versions
    stored the progress object itself: they are sent as stored."""
    record = payload.model_dump(mode="json")
    step = payload.progress
    if not isinstance(step, dict) or "stepCurrent" in step:
        return record
    return {**record, "progress": progress_object(Progress.read(step))}
