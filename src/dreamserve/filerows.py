"""The file rows of images a client sent: a task's inputs (uploaded, linked or fetched) and uploads (Wiro's
File/Upload, Replicate's ``/v1/files``), built in one place, and an upload stored within the project's quota."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobStore
from dreamserve.facts import FileMeta
from dreamserve.queue.db import File
from dreamserve.queue.keyring import ServerKey
from dreamserve.queue.store import TaskStore, add_files, check_storage, new_blob_folder
from dreamserve.status import FileRole

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def content_type(ext: str) -> str:
    return CONTENT_TYPES.get(ext, f"image/{ext}")


def input_row(project_id: int, folder: str, position: int, ext: str, size: int, meta: FileMeta) -> File:
    """Reference ``position`` of a task (``inputImage-<position>.<ext>`` in the task's input folder)."""
    name = f"inputImage-{position}.{ext}"
    return File(
        project_id=project_id,
        role=FileRole.INPUT,
        position=position,
        name=name,
        contenttype=content_type(ext),
        size=size,
        blob_key=f"inputs/{folder}/{name}",
        meta=meta,
        created=time.time(),
    )


def upload_row(
    project_id: int, filename: str, ext: str, size: int, meta: FileMeta, *, folder_id: int | None = None, stem: str
) -> File:
    """An upload in no task, named after the client's file name (made safe), ``stem`` when it has none."""
    safe = _SAFE_NAME.sub("_", filename.rsplit(".", 1)[0])[:80] or stem
    return File(
        project_id=project_id,
        folder_id=folder_id,
        role=FileRole.UPLOAD,
        name=f"{safe}.{ext}",
        contenttype=content_type(ext),
        size=size,
        blob_key=f"uploads/{new_blob_folder()}/{safe}.{ext}",
        meta=meta,
        created=time.time(),
    )


class Storing(Protocol):
    """What storing an upload needs of ``services.Services``."""

    store: TaskStore
    blobs: BlobStore
    keys: ServerKey
    sessions: async_sessionmaker[AsyncSession]


async def store_upload(
    services: Storing, file: File, data: bytes, check: Callable[[AsyncSession], Awaitable[None]] | None = None
) -> File:
    """Bytes first (no lock held while they are written), then the row, counted against the project's storage in
    the transaction that stores it, after ``check`` (e.g. that its folder exists); a refusal (``StorageFull``, or
    what ``check`` raises) takes the bytes back."""
    await asyncio.to_thread(services.blobs.put, file.blob_key, data)
    try:
        async with services.sessions.begin() as session:
            if check is not None:
                await check(session)
            await check_storage(session, file.project_id, services.store.storage, file.size, 1)
            await add_files(session, services.keys, [file])
    except BaseException:
        await asyncio.to_thread(services.blobs.delete, file.blob_key)
        raise
    return file
