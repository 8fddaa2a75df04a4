"""Wiro's error envelope, the server's default error shape: the one place our error tree becomes it.

``{"result": false, "errors": [{"code": N, "message": "..."}]}``, with HTTP 200 for validation and business
errors as Wiro answers them, and each item with two keys of ours that Wiro's clients ignore: ``type`` (the
class, which ``dreamserve.client`` maps back) and ``param`` (the field at fault, in Wiro's name for it).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from dreamserve.dialects.common import retry_after
from dreamserve.dialects.wiro.decode import NAMES
from dreamserve.errors import DreamError


def envelope_of(exc: DreamError) -> dict[str, object]:
    message, param = exc.named(NAMES)
    item: dict[str, object] = {"code": exc.code, "message": message, "type": exc.type}
    if param is not None:
        item["param"] = param
    return {"result": False, "errors": [item]}


def wiro_error(exc: DreamError) -> JSONResponse:
    return JSONResponse(envelope_of(exc), status_code=exc.http_status, headers=retry_after(exc))
