"""Wiro's ``/v1/File/*``: folders and uploads (the file URLs themselves are the server's: ``api/files.py``)."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.api.deps import ProjectDep, ServicesDep, read_fields
from dreamserve.dialects.wire import ascii_id
from dreamserve.dialects.wiro.render import envelope, file_item, unix
from dreamserve.errors import InvalidField, NotFound
from dreamserve.facts import FileMeta
from dreamserve.filerows import one_image, store_upload
from dreamserve.queue.db import Folder

router = APIRouter()

_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


@router.post("/v1/File/FolderCreate")
@router.post("/v1/Folder/Create")
async def folder_create(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    fields = await read_fields(request, max_file_bytes=0)
    name = str(fields.get("name", [""])[-1]).strip()
    if not _FOLDER_NAME.match(name):
        raise InvalidField("name", "must be 1-100 letters, digits, '-' or '_'.")
    parent_id = ascii_id(fields, "parentid", "parentId")
    async with services.sessions.begin() as session:
        if parent_id is not None and await _folder(session, project.id, parent_id) is None:
            raise NotFound(f"Folder {parent_id} does not exist in this project.")
        folder = Folder(project_id=project.id, name=name, parent_id=parent_id, created=time.time())
        session.add(folder)
        await session.flush()
    item = {
        "id": str(folder.id),
        "name": folder.name,
        "parentid": str(folder.parent_id or 0),
        "size": "0",
        "contenttype": "",
        "addedtime": unix(folder.created),
    }
    return envelope(list=[item])


@router.post("/v1/File/Upload")
async def upload(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    settings = services.settings
    fields = await read_fields(request, settings.max_upload_bytes)
    image = await one_image(fields, "file", "required: send one file as multipart field 'file'.", settings)
    folder_id = ascii_id(fields, "folderid")
    file = image.row(project.id, FileMeta(width=image.width, height=image.height), folder_id=folder_id, stem="upload")

    async def in_folder(session: AsyncSession) -> None:
        if folder_id is not None and await _folder(session, project.id, folder_id) is None:
            raise NotFound(f"Folder {folder_id} does not exist in this project.")

    await store_upload(services, file, image.upload.data, in_folder)
    return envelope(list=[file_item(settings.base_url, file, services.keys, settings.retention_seconds)])


@router.post("/v1/File/Delete")
async def file_delete(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """An upload of this project (``fileid``, the ``id`` File/Upload answered), its row and bytes; its URL answers
    404 at once. A task's files go with Task/InputOutputDelete."""
    fields = await read_fields(request, max_file_bytes=0)
    file_id = ascii_id(fields, "fileid", "fileId")
    if file_id is None:
        raise InvalidField("fileid", "required: the id File/Upload answered.")
    if not await services.store.delete_project_files(project.id, file_id=file_id):
        raise NotFound(f"File {file_id} is not an upload of this project (a task's files go with InputOutputDelete).")
    return envelope()


@router.post("/v1/File/FolderDelete")
async def folder_delete(request: Request, project: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """A folder of this project (``folderid``), the folders under it and every upload in them, rows and bytes."""
    fields = await read_fields(request, max_file_bytes=0)
    folder_id = ascii_id(fields, "folderid", "folderId")
    if folder_id is None:
        raise InvalidField("folderid", "required: the id File/FolderCreate answered.")
    async with services.sessions() as session:
        if await _folder(session, project.id, folder_id) is None:
            raise NotFound(f"Folder {folder_id} does not exist in this project.")
        folders = await _subtree(session, project.id, folder_id)
    await services.store.delete_project_files(project.id, folders=folders)
    return envelope()


async def _subtree(session: Any, project_id: int, folder_id: int) -> list[int]:
    """The folder and every folder under it, one level per query (a project's folders bound the loop)."""
    found, level = [folder_id], [folder_id]
    while level:
        query = select(Folder.id).where(Folder.project_id == project_id, Folder.parent_id.in_(level))
        level = [child for child in (await session.execute(query)).scalars() if child not in found]
        found += level
    return found


async def _folder(session: Any, project_id: int, folder_id: int) -> Folder | None:
    query = select(Folder).where(Folder.id == folder_id, Folder.project_id == project_id)
    folder: Folder | None = (await session.execute(query)).scalar_one_or_none()
    return folder
