"""The one error tree of the service, translated to the wire in one place (``api/app.py``).

Every error renders as Wiro's envelope ``{"result": false, "errors": [{"code": N, "message": "..."}]}``, and each
item carries two keys of ours that Wiro's clients ignore: ``type`` (machine-readable, one per class below) and,
for request errors, ``param`` (the field at fault). ``client.py`` maps ``type`` back to these classes.
Wiro answers validation and business errors with HTTP 200 and ``result: false``, authentication errors with
401, unknown routes with 404 and rate limits with 429, so each class carries its code and status.

    DreamError                  type            code  HTTP
    ├── InvalidRequest          invalid_request    0   200  a parameter or file is wrong (``param`` names it)
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

import re
import secrets

#: How request errors name their field today ("Request parameter [size] ..."): ``param`` defaults to it.
_PARAM = re.compile(r"Request (?:parameter|files) \[([\w.]+)\]")


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

    def to_wire(self) -> dict[str, object]:
        item: dict[str, object] = {"code": self.code, "message": self.message, "type": self.type}
        if self.param is not None:
            item["param"] = self.param
        return {"result": False, "errors": [item]}


class InvalidRequest(DreamError):
    """A request parameter or file is missing or out of range; ``param`` is its name (taken from the message's
    ``[name]`` when not given)."""

    type = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        match = _PARAM.search(message) if param is None else None
        self._param = param if match is None else match.group(1)

    @property
    def param(self) -> str | None:
        return self._param


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


_BY_TYPE: dict[str, type[DreamError]] = {cls.type: cls for cls in _subclasses(DreamError) if cls is not DreamError}
