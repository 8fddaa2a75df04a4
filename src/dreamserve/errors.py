"""The one error tree of the service, translated to the wire in one place (``api/app.py``).

Every error renders as Wiro's envelope ``{"result": false, "errors": [{"code": N, "message": "..."}]}``.
Wiro answers validation and business errors with HTTP 200 and ``result: false``, authentication
errors with 401, unknown routes with 404 and rate limits with 429, so each class carries both.

    DreamError                       code 0, HTTP 200
    ├── InvalidRequest               a parameter or file is wrong (code 0)
    ├── AuthError                    credentials missing or wrong (code 0, HTTP 401)
    ├── NotFound                     task, file, folder or model unknown to this project (code 1)
    │   └── FileNotFound             a download URL that names no file (code 1, HTTP 404)
    ├── InvalidState                 the task is not in a state that allows this (code 1)
    ├── RateLimited                  too many requests (code 96, HTTP 429, Retry-After)
    └── RouteNotFound                no such endpoint (code 0, HTTP 404)

Messages say what to do, not only what went wrong.
"""

from __future__ import annotations


class DreamError(Exception):
    code: int = 0
    http_status: int = 200

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, object]:
        return {"result": False, "errors": [{"code": self.code, "message": self.message}]}


class InvalidRequest(DreamError):
    """A request parameter or file is missing or out of range."""


class AuthError(DreamError):
    http_status = 401


class NotFound(DreamError):
    code = 1


class FileNotFound(NotFound):
    """A GET of a file URL: HTTP clients and caches go by the status, so it is a real 404."""

    http_status = 404


class InvalidState(DreamError):
    code = 1


class RateLimited(DreamError):
    code = 96
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RouteNotFound(DreamError):
    http_status = 404

    def __init__(self, message: str = "Error parsing url.") -> None:
        super().__init__(message)
