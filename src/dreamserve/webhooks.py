"""Callback delivery (``callbackUrl``): the outbox rows written with each terminal status, sent with retries.

A delivery is the final task object as JSON. Any 2xx acknowledges it; anything else is retried
with exponential backoff until ``webhook_attempts`` is spent. The rows are the delivery log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.db import WebhookDelivery
from dreamserve.errors import InvalidRequest
from dreamserve.fetch import post_json
from dreamserve.settings import Settings

log = logging.getLogger("dreamserve.webhooks")

TaskRenderer = Callable[[int], Awaitable[dict[str, Any] | None]]


async def deliver_due(sessions: async_sessionmaker[AsyncSession], settings: Settings, render: TaskRenderer) -> int:
    """Attempt every delivery that is due; returns how many were attempted."""
    now = time.time()
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt <= now)
        .order_by(WebhookDelivery.id)
        .limit(20)
    )
    async with sessions() as session:
        due = list((await session.execute(query)).scalars())
    for delivery in due:
        await _attempt(sessions, settings, render, delivery)
    return len(due)


async def _attempt(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, render: TaskRenderer, delivery: WebhookDelivery
) -> None:
    status: int | None = None
    error = ""
    task = await render(delivery.task_id)
    try:
        body = json.dumps(task).encode()
        status = await post_json(
            delivery.url,
            body,
            headers={},
            timeout=settings.fetch_timeout_seconds,
            allow_private=settings.fetch_allow_private,
        )
    except InvalidRequest as exc:
        error = exc.message
    except Exception as exc:  # a receiver that is down or slow is retried, never fatal
        error = f"{type(exc).__name__}: {exc}"
    attempts = delivery.attempts + 1
    async with sessions.begin() as session:
        row = await session.get(WebhookDelivery, delivery.id)
        if row is None:
            return
        row.attempts, row.last_status, row.last_error = attempts, status, error
        if status is not None and 200 <= status < 300:
            row.state, row.delivered = "delivered", time.time()
        elif attempts >= settings.webhook_attempts:
            row.state = "failed"
            log.warning("callback for task %s to %s failed after %d attempts", row.task_id, row.url, attempts)
        else:
            row.next_attempt = time.time() + settings.webhook_backoff_seconds * 2 ** (attempts - 1)
