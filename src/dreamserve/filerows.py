"""The file rows of images a client sent: a task's inputs (uploaded, linked or fetched) and uploads (Wiro's
File/Upload, Replicate's ``/v1/files``), built in one place, and an upload stored within the project's quota."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobStore
from dreamserve.errors import InvalidField
from dreamserve.facts import FileMeta
from dreamserve.images import IMAGE_FORMATS, check_image
from dreamserve.queue.db import File
from dreamserve.queue.keyring import ServerKey
from dreamserve.queue.store import TaskStore, add_files, check_storage, new_blob_folder
from dreamserve.request import StoredImage, Upload
from dreamserve.settings import Settings
from dreamserve.status import FileRole

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def content_type(ext: str) -> str:
    return CONTENT_TYPES.get(ext, f"image/{ext}")


#: The checked format of a stored file, by the content type it was stored with.
EXTENSIONS = {content_type(ext): ext for ext in IMAGE_FORMATS.values()}


def stored_reference(blobs: BlobStore, file: File, url: str) -> StoredImage | Upload | None:
    """A stored file given as a reference (one of this server's own URLs): a ``StoredImage`` when its row says
    what it is, so its facts stand for it and its bytes are linked, never read; else its bytes (a row of an older
    server, checked like an upload); None when its bytes are gone."""
    meta = file.meta or FileMeta()
    ext = EXTENSIONS.get(file.contenttype)
    if meta.width is not None and meta.height is not None and ext is not None:
        if not blobs.exists(file.blob_key):
            return None
        return StoredImage(
            blob_key=file.blob_key, url=url, size=file.size, ext=ext, width=meta.width, height=meta.height
        )
    try:
        return Upload(filename=file.name, data=blobs.read(file.blob_key))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class CheckedUpload:
    """The one file of an upload form, checked as an image: its bytes, its format's extension, its size."""

    upload: Upload
    ext: str
    width: int
    height: int

    def row(self, project_id: int, meta: FileMeta, *, folder_id: int | None = None, stem: str) -> File:
        """Its upload row (``upload_row``)."""
        upload = self.upload
        return upload_row(project_id, upload.filename, self.ext, len(upload.data), meta, folder_id=folder_id, stem=stem)


async def one_image(fields: Mapping[str, Sequence[Any]], name: str, required: str, settings: Settings) -> CheckedUpload:
    """The one file of the form field ``name`` (``required``: what the error says when there is not exactly one),
    checked as an image off the event loop, within ``max_upload_bytes`` and ``max_input_pixels``."""
    uploads = [value for value in fields.get(name, []) if isinstance(value, Upload)]
    if len(uploads) != 1:
        raise InvalidField(name, required, files=True)
    upload = uploads[0]
    limits = settings.max_upload_bytes, settings.max_input_pixels
    ext, width, height = await asyncio.to_thread(check_image, upload.data, repr(upload.filename), *limits)
    return CheckedUpload(upload, ext, width, height)


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
