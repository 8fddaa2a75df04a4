"""What the bearer-token dialects (OpenAI's, Ark's, ...) share.

Their bearer auth, the route class that renders our error tree in their error shape, and the wait for a task
(each in one of the project's ``sync_max_per_project`` slots, ``Services.sync_slot``).

Auth is ``Authorization: Bearer <api key>`` for key-only projects and ``Bearer <api key>:<api secret>`` for
signature projects: these clients cannot sign requests, and accepting the bare key would let anyone holding only
the key into a project that asked for signatures.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from dreamserve.api.deps import ServicesDep, check_rate
from dreamserve.auth import lookup_project
from dreamserve.errors import (
    AuthError,
    DreamError,
    InvalidField,
    InvalidState,
    NotFound,
    RateLimited,
    RequestTooLarge,
    StorageFull,
)
from dreamserve.projects import unseal_secret
from dreamserve.queue.db import Project, Task
from dreamserve.services import Services
from dreamserve.status import StopKind


class ErrorKind(Enum):
    """What a client must know of an error to react to it: the classes every dialect maps to its own statuses."""

    AUTH = auto()
    RATE = auto()
    NOT_FOUND = auto()
    SERVER = auto()
    TOO_LARGE = auto()
    STORAGE = auto()
    STATE = auto()
    FIELD = auto()
    INVALID = auto()


def error_kind(exc: DreamError) -> ErrorKind:
    """The kind of one of our errors (the first that applies, in the order above)."""
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    if exc.http_status >= 500:
        return ErrorKind.SERVER
    for cls, kind in _REQUEST_KINDS:
        if isinstance(exc, cls):
            return kind
    return ErrorKind.INVALID


_KINDS: tuple[tuple[type[DreamError], ErrorKind], ...] = (
    (AuthError, ErrorKind.AUTH),
    (RateLimited, ErrorKind.RATE),
    (NotFound, ErrorKind.NOT_FOUND),
)
_REQUEST_KINDS: tuple[tuple[type[DreamError], ErrorKind], ...] = (
    (RequestTooLarge, ErrorKind.TOO_LARGE),
    (StorageFull, ErrorKind.STORAGE),
    (InvalidState, ErrorKind.STATE),
    (InvalidField, ErrorKind.FIELD),
)


def retry_after(exc: DreamError) -> dict[str, str] | None:
    """The ``Retry-After`` header of a rate limit; None for any other error."""
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None


#: What a dialect's body says of a kind of error besides its status (Ark's code and type, Replicate's title).
Label = TypeVar("Label")


@dataclass(frozen=True)
class Drawn:
    """What an error body is drawn from: the error, its message and field at fault in the dialect's names, and
    the status it is answered with."""

    exc: DreamError
    message: str
    param: str | None
    status: int


@dataclass(frozen=True)
class Ladder(Generic[Label]):
    """One dialect's translation of our error tree: the status and label of each kind of error, and its body."""

    #: The dialect's wire name of each field the core names.
    names: Mapping[str, str]
    kinds: Mapping[ErrorKind, tuple[int, Label]]
    #: A server error keeps its own status.
    server: Label
    #: Any kind ``kinds`` leaves out, from the error and its field at fault.
    other: Callable[[DreamError, str | None], tuple[int, Label]]
    body: Callable[[Drawn, Label], object]
    media_type: str | None = None


def render_error(exc: DreamError, ladder: Ladder[Label]) -> JSONResponse:
    """``exc`` in a dialect's status, body and headers (``Retry-After`` of a rate limit)."""
    message, param = exc.named(ladder.names)
    kind = error_kind(exc)
    if kind is ErrorKind.SERVER:
        status, label = exc.http_status, ladder.server
    else:
        status, label = ladder.kinds.get(kind) or ladder.other(exc, param)
    body = ladder.body(Drawn(exc, message, param, status), label)
    return JSONResponse(body, status_code=status, headers=retry_after(exc), media_type=ladder.media_type)


def error_route(render: Callable[[DreamError], Response]) -> type[APIRoute]:
    """A route class whose handlers (dependencies included) answer our errors as ``render`` draws them: the one
    place a dialect's errors are translated, so the rest of the code raises the usual ``errors`` tree."""

    class ErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def translated(request: Request) -> Response:
                try:
                    return await handler(request)
                except DreamError as exc:
                    return render(exc)

            return translated

    ErrorRoute.__qualname__ = ErrorRoute.__name__ = f"ErrorRoute[{render.__name__}]"
    return ErrorRoute


async def bearer_project(request: Request, services: ServicesDep) -> Project:
    return await scheme_project(request, services, "Bearer")


async def scheme_project(request: Request, services: ServicesDep, scheme: str) -> Project:
    """The project of ``Authorization: <scheme> <key>[:<secret>]`` (``Bearer``; fal's clients send ``Key``)."""
    header = request.headers.get("authorization", "")
    prefix = f"{scheme.lower()} "
    token = header[len(prefix) :].strip() if header.lower().startswith(prefix) else ""
    api_key, _, secret = token.partition(":")
    project = await lookup_project(services.sessions, services.store.reads, api_key) if api_key else None
    if project is None:
        raise AuthError(
            f"Send the API key as Authorization: {scheme} <key> (or <key>:<secret> for signature projects)."
        )
    expected = unseal_secret(api_key, project.secret_sealed or "") if project.signature_required else ""
    if project.signature_required and not hmac.compare_digest(secret.encode(), expected.encode()):
        raise AuthError(f"This project requires its secret: send Authorization: {scheme} <api key>:<api secret>.")
    check_rate(request, services, project)
    return project


BearerProject = Annotated[Project, Depends(bearer_project)]


async def wait_for_task(request: Request, services: Services, task: Task) -> None:
    """Wait for the task on the event hub; a client that hung up gets its task cancelled (nobody can fetch it)."""
    settings = services.settings
    gone = request.is_disconnected if settings.sync_cancel_on_disconnect else None
    outcome = await services.wait_terminal(task.id, settings.sync_wait_seconds, gone)
    if outcome == "gone" and await services.store.cancel_queued(task.id) is None:
        await services.stop_task(task.id, StopKind.CANCEL)
