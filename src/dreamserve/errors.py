"""The one error tree of the service; each dialect renders it in its API's error shape, in one place each.

Wiro's envelope (``dialects/wiro/errors.py``: ``{"result": false, "errors": [{"code": N, "message": "..."}]}``,
each item with two keys of ours, ``type``, one per class below, and ``param``) is the default shape; Ark's and
OpenAI's routes render ``{"error": {...}}`` (``dialects/ark``, ``dialects/openai``). ``client.py`` maps ``type``
back to these classes. Wiro answers validation and business errors with HTTP 200 and ``result: false``,
authentication errors with 401, unknown routes with 404 and rate limits with 429, so each class carries its code
and status; other dialects map the classes to their own statuses.

    DreamError                  type            code  HTTP
    ├── InvalidRequest          invalid_request    0   200  the request is wrong as a whole (not one field)
    │   ├── InvalidField        invalid_request    0   200  a field is wrong: which, why and its limit, as data
    │   └── RequestTooLarge     request_too_large  0   413  the body is over ``max_request_bytes``
    ├── AuthError               authentication     0   401  credentials missing or wrong
    ├── NotFound                not_found          1   200  task, file, folder or model unknown to this project
    │   └── FileNotFound        file_not_found     1   404  a download URL that names no file
    ├── InvalidState            invalid_state      1   200  the task is not in a state that allows this
    ├── TaskFailed              task_failed        0   500  a task waited on (OpenAI's routes) failed
    │   └── TaskInputFailed     task_input_failed  0   400  ... because an input could not be read (pexit 2)
    ├── StorageFull             storage_full       0   200  the project stores as many bytes or files as it may
    ├── RateLimited             rate_limited      96   429  too many requests (Retry-After)
    │   └── QuotaExceeded       quota_exceeded    96   429  the project's unfinished tasks or work are at their cap
    ├── RouteNotFound           route_not_found    0   404  no such endpoint
    │   └── MethodNotAllowed    method_not_allowed 0   405  the endpoint exists, not with this method
    ├── HTTPProtocolError       http_error         0   4xx  any other refusal of the HTTP layer
    └── ServerError             server_error       0   500  a bug: logged, never detailed to the client

Messages say what to do, not only what went wrong.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping


def new_error_id() -> str:
    """A short id that ties what a client is told to the server log line that has the details."""
    return secrets.token_hex(6)


class DreamError(Exception):
    code: int = 0
    http_status: int = 200
    type: str = "error"
    #: What the error says when raised without a message (the HTTP layer's own refusals, a bug).
    default_message: str = "Internal server error."

    def __init__(self, message: str | None = None) -> None:
        self.message = self.default_message if message is None else message
        super().__init__(self.message)

    @property
    def param(self) -> str | None:
        return None

    def named(self, names: Mapping[str, str]) -> tuple[str, str | None]:
        """The message and the field at fault (``param``) with the field named as a dialect names it."""
        return self.message, self.param


class InvalidRequest(DreamError):
    """The request is wrong as a whole (not JSON, nested too deep), or, read back by the client, a field is
    (``param`` names it)."""

    type = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self._param = param

    @property
    def param(self) -> str | None:
        return self._param


class InvalidField(InvalidRequest):
    """A field of the request is missing or wrong, as data: which (``field``: a ``request.Field`` of the core, or
    a dialect's own wire name), why (``reason``, the sentence that follows the field's name) and the limit it broke.
    ``files``: the field holds files ("Request files [image] ..."). Each dialect renders it with its own name
    for the field (``named``): Wiro's ``maxImages`` is OpenAI's ``n``."""

    def __init__(self, field: str, reason: str, *, limit: int | None = None, files: bool = False) -> None:
        self.field, self.reason, self.limit, self.files = field, reason, limit, files
        super().__init__(self.message_for(field), param=field)

    def message_for(self, name: str) -> str:
        return f"Request {'files' if self.files else 'parameter'} [{name}] {self.reason}"

    def named(self, names: Mapping[str, str]) -> tuple[str, str | None]:
        name = names.get(self.field, self.field)
        return self.message_for(name), name


class RequestTooLarge(InvalidRequest):
    http_status = 413
    type = "request_too_large"


class AuthError(DreamError):
    http_status = 401
    type = "authentication"


class NotFound(DreamError):
    code = 1
    type = "not_found"


class FileNotFound(NotFound):
    """A GET of a file URL: HTTP clients and caches go by the status, so it is a real 404."""

    http_status = 404
    type = "file_not_found"


class InvalidState(DreamError):
    code = 1
    type = "invalid_state"


class StorageFull(DreamError):
    """The project's stored files are at ``max_project_bytes`` or ``max_project_files``: waiting does not help,
    deleting does (a business error, so HTTP 200 as Wiro answers those)."""

    type = "storage_full"


class TaskFailed(DreamError):
    """A task that a synchronous call waited for failed: the server's fault, or the model's."""

    http_status = 500
    type = "task_failed"


class TaskInputFailed(TaskFailed):
    """A task failed because one of its inputs could not be fetched or read: the caller's to fix."""

    http_status = 400
    type = "task_input_failed"


class RateLimited(DreamError):
    code = 96
    http_status = 429
    type = "rate_limited"
    #: Seconds to wait before retrying (``Retry-After``) when the raiser does not say.
    default_retry_after = 1

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after


class QuotaExceeded(RateLimited):
    """A per-project cap on unfinished tasks or queued work: retry when some of the project's tasks have ended."""

    type = "quota_exceeded"
    default_retry_after = 5


class RouteNotFound(DreamError):
    http_status = 404
    type = "route_not_found"
    default_message = "Error parsing url."


class MethodNotAllowed(RouteNotFound):
    http_status = 405
    type = "method_not_allowed"
    default_message = "Error parsing url. Every endpoint takes POST, except file downloads (GET)."


class HTTPProtocolError(DreamError):
    """A refusal by the HTTP layer that no class above names; it keeps that layer's status."""

    type = "http_error"

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class ServerError(DreamError):
    http_status = 500
    type = "server_error"
    default_message = "Internal server error. The incident was logged; retry with backoff."


def error_class(type_: str) -> type[DreamError] | None:
    """The class whose ``type`` this is (what the SDK raises for an envelope item of ours)."""
    return _BY_TYPE.get(type_)


def _subclasses(cls: type[DreamError]) -> list[type[DreamError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


#: A ``type`` shared by a subclass (``InvalidField`` is an ``invalid_request`` too) names its first class.
_BY_TYPE: dict[str, type[DreamError]] = {}
for _cls in _subclasses(DreamError)[1:]:
    _BY_TYPE.setdefault(_cls.type, _cls)
