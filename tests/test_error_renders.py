"""Every dialect's rendering of every class of our error tree, byte for byte: status, headers and body as each
renderer answered them before the renderers shared one ladder (``dialects/common.render_error``).

``python -m tests.test_error_renders`` rewrites ``error_renders.json``, only for a rendering meant to change."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fastapi import Response

from dreamserve.dialects.ark.render import ark_error
from dreamserve.dialects.fal.render import fal_error
from dreamserve.dialects.openai.render import openai_error
from dreamserve.dialects.replicate.render import replicate_error
from dreamserve.dialects.wiro.errors import wiro_error
from dreamserve.errors import (
    AuthError,
    DreamError,
    FileNotFound,
    HTTPProtocolError,
    InvalidField,
    InvalidRequest,
    InvalidState,
    MethodNotAllowed,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
    ServerError,
    StorageFull,
    TaskFailed,
    TaskInputFailed,
)
from dreamserve.request import Field

RENDERS = Path(__file__).with_name("error_renders.json")
RENDERERS: dict[str, Callable[[DreamError], Response]] = {
    "wiro": wiro_error,
    "ark": ark_error,
    "openai": openai_error,
    "replicate": replicate_error,
    "fal": fal_error,
}


def _errors() -> dict[str, DreamError]:
    errors: dict[str, DreamError] = {
        "request": InvalidRequest("Body is not JSON."),
        "request with param": InvalidRequest("Nested too deep.", "prompt"),
        "too large": RequestTooLarge("Over 10 MiB."),
        "auth": AuthError("Send the key."),
        "not found": NotFound("No such task."),
        "file not found": FileNotFound("No such file."),
        "state": InvalidState("Still running."),
        "storage": StorageFull("Delete files."),
        "task failed": TaskFailed("Task 7 failed."),
        "task input failed": TaskInputFailed("Task 7 could not read an input."),
        "rate": RateLimited("Slow down."),
        "rate, 7 s": RateLimited("Slow down.", 7),
        "quota": QuotaExceeded("Too many unfinished tasks."),
        "route": RouteNotFound(),
        "method": MethodNotAllowed(),
        "http 418": HTTPProtocolError("Teapot.", 418),
        "http 503": HTTPProtocolError("Busy.", 503),
        "server": ServerError(),
        "bare": DreamError(),
        "wire field": InvalidField("response_format", "must be url or b64_json."),
        "files field": InvalidField(Field.REFERENCES, "are too many.", limit=10, files=True),
    }
    for field in Field:
        errors[f"field {field}"] = InvalidField(field, "is out of range.", limit=4)
    return errors


def _renders() -> dict[str, dict[str, list[object]]]:
    drawn: dict[str, dict[str, list[object]]] = {}
    for dialect, render in RENDERERS.items():
        for name, exc in _errors().items():
            response = render(exc)
            headers = [[key.decode(), value.decode()] for key, value in response.raw_headers]
            drawn.setdefault(dialect, {})[name] = [response.status_code, headers, bytes(response.body).decode()]
    return drawn


def test_each_dialect_renders_each_error_as_it_always_did() -> None:
    assert _renders() == json.loads(RENDERS.read_text())


if __name__ == "__main__":
    RENDERS.write_text(json.dumps(_renders(), indent=1) + "\n")
