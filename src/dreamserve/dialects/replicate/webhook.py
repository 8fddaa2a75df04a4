"""Replicate's callbacks (``webhook``): the prediction as it stands, signed the Standard Webhooks way.

``webhook-id`` (the delivery's id: one per message, the same on its retries), ``webhook-timestamp`` (unix
seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256(key, id + "." + timestamp + "." + body)>``, keyed with
the project's webhook secret, the one Wiro's callbacks are signed with. ``GET /v1/webhooks/default/secret``
gives it as ``whsec_<base64 of the key>``, which ``replicate.webhooks.validate`` decodes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from dreamserve.dialects.replicate.render import load
from dreamserve.services import Services
from dreamserve.webhooks import CallbackEvent


def signing_key(secret: str) -> str:
    """The secret as Standard Webhooks spells it (standard base64: its ``_`` separates the prefix)."""
    return "whsec_" + base64.b64encode(secret.encode()).decode()


def signature(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


class ReplicateCallbacks:
    """The ``webhooks.CallbackFormat`` of tasks made through this dialect."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def body(self, task_id: int, event: str, payload: CallbackEvent) -> Any:
        task = await self.services.store.get_by_id(task_id)
        return None if task is None else await load(self.services, task)

    def headers(self, delivery_id: int, event: str, timestamp: str, body: bytes, secret: str) -> dict[str, str]:
        message_id = f"msg_{delivery_id}"
        return {
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature(secret, message_id, timestamp, body),
        }
