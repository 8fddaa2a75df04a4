"""Request-scoped helpers: the services, the authenticated project, and the request's fields."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.datastructures import UploadFile

from dreamserve.auth import authenticate
from dreamserve.db import Project
from dreamserve.errors import InvalidRequest
from dreamserve.params import Upload
from dreamserve.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_project(request: Request, services: ServicesDep) -> Project:
    return await authenticate(services.sessions, services.settings, request.headers)


ProjectDep = Annotated[Project, Depends(get_project)]


async def read_fields(request: Request, max_file_bytes: int) -> dict[str, list[Any]]:
    """The body as ``name -> values``, from JSON or a form; files become ``Upload``s.

    An oversized file is cut at ``max_file_bytes + 1`` bytes so the size check can refuse it
    without reading the whole of it into memory.
    """
    content_type = request.headers.get("content-type", "")
    fields: dict[str, list[Any]] = {}
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=64, max_fields=256)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(max_file_bytes + 1)
                fields.setdefault(name, []).append(Upload(filename=value.filename or "", data=data))
            else:
                fields.setdefault(name, []).append(value)
        return fields
    body = await request.body()
    if not body.strip():
        return fields
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("Request parameters are invalid. Send a JSON object or multipart/form-data.") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("Request parameters are invalid. The JSON body must be an object.")
    for name, value in parsed.items():
        fields[name] = [value]
    return fields
