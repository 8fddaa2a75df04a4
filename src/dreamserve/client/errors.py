"""The server's error envelope, mapped back to the classes of ``dreamserve.errors``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from dreamserve.client.records import to_int
from dreamserve.errors import (
    AuthError,
    DreamError,
    HTTPProtocolError,
    InvalidRequest,
    InvalidState,
    NotFound,
    RateLimited,
    RouteNotFound,
    TaskFailed,
    error_class,
)


class TransportError(DreamError):
    """No usable Wiro envelope: unreachable server, timeout, HTTP 5xx, a proxy's HTML page, a failed download."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def error_from(body: Mapping[str, Any], response: httpx.Response) -> DreamError:
    """Wiro's ``{"result": false, "errors": [{"code", "message"}]}`` as the matching error class."""
    status = response.status_code
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else {}
    if not isinstance(first, dict):
        first = {"message": str(first)}
    message = str(first.get("message") or body.get("message") or f"HTTP {status} with result: false")
    code = to_int(first.get("code")) or 0
    typed = typed_error(first, message, response)
    return typed if typed is not None else untyped_error(message, code, response)


def untyped_error(message: str, code: int, response: httpx.Response) -> DreamError:
    """A server that sends no ``type`` (Wiro itself): the classes told apart by status, code and wording."""
    status = response.status_code
    lowered = message.lower()
    if status in (401, 403) or code == 99 or lowered.startswith(("project authorization", "project requires sign")):
        return AuthError(message)
    if status == 429 or code == 96:
        return RateLimited(message, retry_after(response.headers.get("retry-after")))
    if code == 1:
        # Wiro uses code 1 for both "not found" and "wrong state"; the message tells them apart.
        wrong_state = ("state", "could not be killed", "already finished", "must be completed")
        return InvalidState(message) if any(w in lowered for w in wrong_state) else NotFound(message)
    if status == 404:
        return RouteNotFound(message)
    if status >= 500:
        return TransportError(message, status)
    return InvalidRequest(message)


def typed_error(item: Mapping[str, Any], message: str, response: httpx.Response) -> DreamError | None:
    """dreamserve's items name their class in ``type`` (and the field at fault in ``param``)."""
    cls = error_class(str(item.get("type") or ""))
    if cls is None:
        return None
    if issubclass(cls, RateLimited):
        return cls(message, retry_after(response.headers.get("retry-after")))
    if issubclass(cls, InvalidRequest):
        param = item.get("param")
        return cls(message, param=str(param) if param else None)
    if issubclass(cls, HTTPProtocolError):
        return HTTPProtocolError(message, response.status_code)
    if cls.http_status >= 500 and not issubclass(cls, TaskFailed):
        return TransportError(message, response.status_code)
    return cls(message)


def retry_after(value: str | None) -> int:
    try:
        return max(1, int(float(value or "")))
    except ValueError:
        return 1  # absent, or an HTTP date: retry soon rather than parse calendars


def maybe_error(response: httpx.Response) -> bool:
    # Wiro-style servers answer a missing file with HTTP 200 and a result:false envelope.
    return not response.is_success or response.headers.get("content-type", "").startswith("application/json")


def raise_download_error(response: httpx.Response, url: str) -> None:
    """Raise for an error answer to a download; return for a successful one that happens to be JSON."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("result") is False:
        raise error_from(body, response)
    if not response.is_success:
        raise TransportError(f"GET {url} answered HTTP {response.status_code}.", response.status_code)
