"""Replicate's files API (``/v1/files``): what the client uploads an open file in ``input`` to, and the resolution of
those files' URLs in ``image_input`` to the project's stored images.

A file is an upload row of the project (as Wiro's File/Upload makes: checked as an image, counted against the
project's storage, expired by ``retention_seconds``); its ``urls.get`` (``/v1/files/<id>/download``) answers its
bytes to the project's token, never a redirect (the client's ``FileOutput`` follows none). In ``image_input``
such a URL, on this server's host, names the stored image: its bytes are copied blob to blob, never fetched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select

from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.api.files import USER_FILE_HEADERS
from dreamserve.dialects.common import BearerProject, error_route
from dreamserve.dialects.replicate.render import iso, replicate_error
from dreamserve.errors import InvalidField, NotFound
from dreamserve.facts import FileMeta
from dreamserve.filerows import one_image, store_upload, stored_reference
from dreamserve.queue.db import File, Project
from dreamserve.request import Field, RunRequest, Source, StoredImage, Upload
from dreamserve.services import Services

router = APIRouter(route_class=error_route(replicate_error))

#: Files per page of ``GET /v1/files``.
PAGE_SIZE = 100
_OWN_FILE = re.compile(r"/v1/files/(\d{1,18})(?:/download)?$")
MAX_METADATA_CHARS = 4096


@router.post("/v1/files", status_code=201)
async def create(request: Request, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    """Multipart, the file in the field ``content`` (what ``client.files.create`` sends), ``metadata`` JSON."""
    settings = services.settings
    fields = await read_fields(request, settings.max_upload_bytes)
    image = await one_image(fields, "content", "is required: send one file as the multipart field 'content'.", settings)
    data = image.upload.data
    meta = FileMeta(
        width=image.width,
        height=image.height,
        metadata=_metadata(fields.get("metadata", [None])[-1]),
        sha256=hashlib.sha256(data).hexdigest(),
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
    )
    file = await store_upload(services, image.row(project.id, meta, stem="file"), data)
    return file_object(services, file)


@router.get("/v1/files")
async def list_files(project: BearerProject, services: ServicesDep, cursor: str | None = None) -> dict[str, Any]:
    query = select(File).where(File.project_id == project.id, File.role == "upload")
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise InvalidField("cursor", "is not a cursor this server gave: use the next URL as it is.")
        query = query.where(File.id < int(cursor))
    async with services.sessions() as session:
        rows = list((await session.execute(query.order_by(File.id.desc()).limit(PAGE_SIZE + 1))).scalars())
    page = rows[:PAGE_SIZE]
    more = len(rows) > PAGE_SIZE
    next_url = f"{services.settings.base_url}/v1/files?cursor={page[-1].id}" if more else None
    return {"previous": None, "next": next_url, "results": [file_object(services, file) for file in page]}


@router.get("/v1/files/{file_id}")
async def get(file_id: str, project: BearerProject, services: ServicesDep) -> dict[str, Any]:
    return file_object(services, await _file(services, project, file_id))


@router.get("/v1/files/{file_id}/download")
async def download(file_id: str, project: BearerProject, services: ServicesDep) -> Response:
    file = await _file(services, project, file_id)
    local = services.blobs.local_path(file.blob_key)
    if local is not None:
        if not local.is_file():
            raise NotFound(f"File {file_id} has no bytes any more; upload it again.")
        return FileResponse(local, media_type=file.contenttype, headers=USER_FILE_HEADERS)
    # Read through (bounded by max_upload_bytes, as every upload is): a redirect would not be followed.
    data = await asyncio.to_thread(services.blobs.read, file.blob_key)
    return Response(data, media_type=file.contenttype, headers=USER_FILE_HEADERS)


@router.delete("/v1/files/{file_id}", status_code=204)
async def delete(file_id: str, project: BearerProject, services: ServicesDep) -> Response:
    file = await _file(services, project, file_id)
    await services.store.delete_project_files(project.id, file_id=file.id)
    return Response(status_code=204)


def file_object(services: Services, file: File) -> dict[str, Any]:
    settings = services.settings
    meta = file.meta or FileMeta()
    checksums = {"sha256": meta.sha256, "md5": meta.md5}
    body: dict[str, Any] = {
        "id": str(file.id),
        "name": file.name,
        "content_type": file.contenttype,
        "size": file.size,
        "etag": meta.md5 or "",
        "checksums": {name: value for name, value in checksums.items() if value is not None},
        "metadata": meta.metadata or {},
        "created_at": iso(file.created),
        "urls": {"get": f"{settings.base_url}/v1/files/{file.id}/download"},
    }
    if settings.retention_seconds > 0:
        body["expires_at"] = iso(file.created + settings.retention_seconds)
    return body


def _metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    text = raw if isinstance(raw, str) else ""
    try:
        value = json.loads(text) if len(text) <= MAX_METADATA_CHARS else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidField("metadata", f"must be a JSON object of at most {MAX_METADATA_CHARS} characters.")
    return value


async def _file(services: Services, project: Project, file_id: str) -> File:
    file = None
    if file_id.isascii() and file_id.isdigit() and len(file_id) <= 18:
        query = select(File).where(File.id == int(file_id), File.project_id == project.id, File.role == "upload")
        async with services.sessions() as session:
            file = (await session.execute(query)).scalar_one_or_none()
    if file is None:
        raise NotFound(f"File {file_id[:40]} does not exist in this project.")
    return file


async def resolve(services: Services, project: Project, request: Request, run: RunRequest) -> RunRequest:
    """``run`` with each of this server's ``/v1/files/<id>`` URLs replaced by the project's stored image."""
    own_hosts = {urlsplit(services.settings.base_url).netloc.lower(), request.headers.get("host", "").lower()}
    references: list[Source] = []
    for number, source in enumerate(run.references, start=1):
        file_id = _own_id(source, own_hosts) if isinstance(source, str) else None
        references.append(source if file_id is None else await _stored(services, project, str(source), file_id, number))
    if not any(isinstance(r, StoredImage) for r in references):
        return run
    return dataclasses.replace(run, references=tuple(references))


def _own_id(url: str, own_hosts: set[str]) -> str | None:
    """The file id of one of this server's ``/v1/files/<id>`` URLs; None for any other URL."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1" and the like: submit's URL check refuses it
        return None
    match = _OWN_FILE.search(parts.path)
    return match.group(1) if match is not None and parts.netloc.lower() in own_hosts else None


async def _stored(services: Services, project: Project, url: str, file_id: str, number: int) -> StoredImage | Upload:
    gone = InvalidField(
        Field.REFERENCES, f"entry {number} ({url[:120]}) names no file of this project: upload it again."
    )
    try:
        file = await _file(services, project, file_id)
    except NotFound:
        raise gone from None
    stored = await asyncio.to_thread(stored_reference, services.blobs, file, url)
    if stored is None:
        raise gone
    return stored
