"""fal's webhooks (``fal_webhook``): what fal POSTs when a queued request ends, drawn by the callback machinery.

The body is fal's: ``{"request_id", "gateway_request_id", "status": "OK" | "ERROR", "payload"}`` (the result, or
the error body the result URL answers, with ``error`` saying its status). fal signs with its own ED25519 keys,
published at fal's address, which a self-hosted server cannot; deliveries here are signed as every callback of
the server is (``x-dreamserve-timestamp``, ``x-dreamserve-signature``: HMAC-SHA256 with the project's webhook
secret), and carry fal's ``x-fal-webhook-request-id``.
"""

from __future__ import annotations

import json
from typing import Any

from dreamserve.dialects.fal.render import fal_error, result
from dreamserve.errors import DreamError, NotFound
from dreamserve.services import Services
from dreamserve.signing import sign_webhook
from dreamserve.webhooks import CallbackEvent


class FalCallbacks:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def body(self, task_id: int, event: str, payload: CallbackEvent) -> Any:
        envelope: dict[str, Any] = {"request_id": str(task_id), "gateway_request_id": str(task_id)}
        try:
            task = await self.services.store.get_by_id(task_id)
            if task is None:
                raise NotFound(f"Request {task_id} not found.")
            return {**envelope, "status": "OK", "payload": await result(self.services, task)}
        except DreamError as exc:
            answer = fal_error(exc)
            error = f"Invalid status code: {answer.status_code}"
            return {**envelope, "status": "ERROR", "error": error, "payload": json.loads(bytes(answer.body))}

    def headers(self, delivery_id: int, event: str, timestamp: str, body: bytes, secret: str) -> dict[str, str]:
        return {
            "x-fal-webhook-request-id": str(json.loads(body).get("request_id", "")),
            "x-dreamserve-event": event,
            "x-dreamserve-delivery": str(delivery_id),
            "x-dreamserve-timestamp": timestamp,
            "x-dreamserve-signature": sign_webhook(secret, timestamp, body),
        }
