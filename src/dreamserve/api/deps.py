"""Request-scoped helpers: the services, the authenticated project, and the request's fields."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.datastructures import UploadFile
from starlette.types import Message

from dreamserve.auth import authenticate
from dreamserve.dialects.wire import ascii_int, check_text
from dreamserve.errors import InvalidField, InvalidRequest, RequestTooLarge
from dreamserve.queue.db import Project
from dreamserve.ratelimit import RateLimiter
from dreamserve.request import Upload
from dreamserve.services import Services


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop on every request.
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_project(request: Request, services: ServicesDep) -> Project:
    settings, store = services.settings, services.store
    project = await authenticate(services.sessions, settings, request.headers, services.clock, store.reads)
    check_rate(request, services, project)
    return project


def check_rate(request: Request, services: Services, project: Project) -> None:
    """Spend one of the project's request tokens; ``RateLimited`` (429) when there are none."""
    _limiter(request, services).check(project.id)


def _limiter(request: Request, services: Services) -> RateLimiter:
    """This process's per-project buckets, made on first use (``rate_limit_per_minute``; 0 = off)."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        settings = services.settings
        limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        request.app.state.rate_limiter = limiter
    return limiter


ProjectDep = Annotated[Project, Depends(get_project)]


def _too_large(limit: int, what: str, advice: str) -> RequestTooLarge:
    return RequestTooLarge(f"The {what} is larger than {limit:,} bytes, the limit. {advice}")


def _limited_body(request: Request, limit: int, what: str, advice: str) -> Request:
    """The same request, refused (HTTP 413) before it is read when its Content-Length is over ``limit``, and
    as soon as that many bytes have streamed in when it does not say."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, what, advice)
    receive = request.receive
    received = 0

    async def counting() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit, what, advice)
        return message

    return Request(request.scope, counting)


async def read_fields(request: Request, max_file_bytes: int) -> dict[str, list[Any]]:
    """The body as ``name -> values``, from JSON or a form; files become ``Upload``s.

    A form body is bounded by ``max_request_bytes`` and any other body (JSON) by ``max_json_bytes`` too, both
    counted as they stream (see ``_limited_body``); an oversized file is cut at ``max_file_bytes + 1`` bytes
    so the size check can refuse it without reading all of it.
    """
    settings = services_of(request).settings
    content_type = request.headers.get("content-type", "")
    fields: dict[str, list[Any]] = {}
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        advice = "Send fewer or smaller files (or URLs to them)."
        request = _limited_body(request, settings.max_request_bytes, "request body", advice)
        # Closed here: Starlette closes the form of the request it made, not of this wrapper (the spooled
        # temporary files would wait for the garbage collector).
        async with request.form(max_files=64, max_fields=256) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(max_file_bytes + 1)
                    fields.setdefault(name, []).append(Upload(filename=value.filename or "", data=data))
                else:
                    check_text(value)
                    fields.setdefault(name, []).append(value)
        return fields
    advice = "Files go in multipart/form-data (or as URLs), not in JSON."
    limit = min(settings.max_json_bytes, settings.max_request_bytes)
    body = await _limited_body(request, limit, "JSON body", advice).body()
    if not body.strip():
        return fields
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("Request parameters are invalid. Send a JSON object or multipart/form-data.") from None
    except RecursionError:
        raise InvalidRequest("Request parameters are invalid: the JSON body is nested far too deep.") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("Request parameters are invalid. The JSON body must be an object.")
    check_text(parsed)
    for name, value in parsed.items():
        fields[name] = [value]
    return fields


def text_field(fields: Mapping[str, Sequence[Any]], name: str) -> str:
    """A field's last value as stripped text; "" when it is absent or ``null``."""
    values = fields.get(name) or [None]
    return "" if values[-1] is None else str(values[-1]).strip()


#: The longest page Task/List and Tool/List answer.
MAX_PAGE = 100


@dataclass(frozen=True)
class Page:
    """Which slice of a listing to answer, and in what order."""

    start: int
    limit: int
    sort: str
    descending: bool


def read_page(fields: Mapping[str, Sequence[Any]], sorts: Sequence[str], order: str) -> Page:
    """Wiro's listing fields ``start``, ``limit`` (at most ``MAX_PAGE``), ``sort`` (one of ``sorts``, the first
    by default) and ``order`` (``ASC``/``DESC``, ``order`` by default); an absent or empty one takes its default."""
    start = ascii_int(text_field(fields, "start") or "0", "start", low=0, high=10**9)
    limit = min(ascii_int(text_field(fields, "limit") or "20", "limit", low=0, high=10**9), MAX_PAGE)
    sort = text_field(fields, "sort").lower() or sorts[0]
    if sort not in sorts:
        allowed = " or ".join(f'"{name}"' for name in sorts)
        raise InvalidField("sort", f"takes {allowed}; got {sort[:20]!r}.")
    order = text_field(fields, "order").upper() or order
    if order not in ("ASC", "DESC"):
        raise InvalidField("order", f'takes "ASC" or "DESC"; got {order[:20]!r}.')
    return Page(start, limit, sort, order == "DESC")
