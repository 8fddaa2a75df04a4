"""Callback delivery (``callbackUrl``) from the outbox rows that each chosen event writes with it.

``completed`` deliveries carry the final task object (what Wiro POSTs); ``start`` and ``progress``
(ours, chosen with ``callbackEvents``) carry a small event record. Every delivery is signed:
``x-dreamserve-timestamp`` and ``x-dreamserve-signature`` = HMAC-SHA256 with the project's webhook
secret over ``timestamp + "." + body`` (``signing.verify_webhook`` checks it). Any 2xx acknowledges;
anything else is retried with exponential backoff until ``webhook_attempts`` is spent. A row is
claimed before it is sent, so API replicas never deliver it twice; the rows are the delivery log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.db import Project, Task, WebhookDelivery
from dreamserve.errors import InvalidRequest
from dreamserve.fetch import post_json
from dreamserve.keyring import ServerKey
from dreamserve.logs import about
from dreamserve.settings import Settings
from dreamserve.signing import sign_webhook

log = logging.getLogger(__name__)

TaskRenderer = Callable[[int], Awaitable[dict[str, Any] | None]]


async def deliver_due(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, keys: ServerKey, render: TaskRenderer
) -> int:
    """Attempt every delivery that is due; returns how many were attempted."""
    now = time.time()
    query = (
        select(WebhookDelivery.id, WebhookDelivery.state, WebhookDelivery.next_attempt)
        # A row left "sending" by a replica that died is due again once its claim ran out.
        .where(or_(WebhookDelivery.state == "pending", WebhookDelivery.state == "sending"))
        .where(WebhookDelivery.next_attempt <= now)
        .order_by(WebhookDelivery.id)
        .limit(20)
    )
    async with sessions() as session:
        due = (await session.execute(query)).all()
    attempted = 0
    for delivery_id, state, next_attempt in due:
        delivery = await _claim(sessions, delivery_id, state, next_attempt, settings.fetch_timeout_seconds + 5)
        if delivery is not None:
            await _attempt(sessions, settings, keys, render, delivery)
            attempted += 1
    return attempted


async def _claim(
    sessions: async_sessionmaker[AsyncSession], delivery_id: int, state: str, next_attempt: float, hold: float
) -> WebhookDelivery | None:
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == state,
            WebhookDelivery.next_attempt == next_attempt,
        )
        .values(state="sending", next_attempt=time.time() + hold)
        .returning(WebhookDelivery.id)
    )
    async with sessions.begin() as session:
        if (await session.execute(stmt)).scalar_one_or_none() is None:
            return None
        return await session.get(WebhookDelivery, delivery_id)


async def _body(
    sessions: async_sessionmaker[AsyncSession], keys: ServerKey, render: TaskRenderer, delivery: WebhookDelivery
) -> tuple[bytes, str]:
    async with sessions() as session:
        query = (
            select(Project.id, Project.webhook_secret_sealed)
            .join(Task, Task.project_id == Project.id)
            .where(Task.id == delivery.task_id)
        )
        row = (await session.execute(query)).one_or_none()
    secret = keys.webhook_secret(row.id, row.webhook_secret_sealed) if row is not None else ""
    payload = await render(delivery.task_id) if delivery.event == "completed" else delivery.payload
    return json.dumps(payload).encode(), secret


async def _attempt(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    keys: ServerKey,
    render: TaskRenderer,
    delivery: WebhookDelivery,
) -> None:
    status: int | None = None
    error = ""
    try:
        body, secret = await _body(sessions, keys, render, delivery)
        stamp = str(int(time.time()))
        headers = {
            "x-dreamserve-event": delivery.event,
            "x-dreamserve-delivery": str(delivery.id),
            "x-dreamserve-timestamp": stamp,
            "x-dreamserve-signature": sign_webhook(secret, stamp, body),
        }
        status = await post_json(
            delivery.url,
            body,
            headers=headers,
            timeout=settings.fetch_timeout_seconds,
            allow_private=settings.fetch_allow_private,
            allow_hosts=settings.callback_allow_hosts,
        )
    except InvalidRequest as exc:
        error = exc.message
    except Exception as exc:  # a receiver that is down or slow is retried, never fatal
        log.warning("callback delivery %s for task %s failed", delivery.id, delivery.task_id, exc_info=exc)
        error = f"Delivery failed ({type(exc).__name__}); the server log has the details."
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
            # %r: the URL is the client's text; quoted, it cannot forge log lines.
            log.warning("callback to %r failed after %d attempts", row.url, attempts, extra=about(row.task_id))
        else:
            row.state = "pending"
            row.next_attempt = time.time() + settings.webhook_backoff_seconds * 2 ** (attempts - 1)


async def delivery_log(sessions: async_sessionmaker[AsyncSession], task_id: int) -> list[dict[str, Any]]:
    query = select(WebhookDelivery).where(WebhookDelivery.task_id == task_id).order_by(WebhookDelivery.id)
    async with sessions() as session:
        rows = (await session.execute(query)).scalars()
        return [
            {
                "id": str(row.id),
                "event": row.event,
                "url": row.url,
                "state": row.state,
                "attempts": str(row.attempts),
                "laststatus": str(row.last_status or ""),
                "lasterror": row.last_error,
                "createtime": str(int(row.created)),
                "deliveredtime": str(int(row.delivered or 0)),
            }
            for row in rows
        ]
