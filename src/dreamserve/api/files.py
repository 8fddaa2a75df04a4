"""``GET /v1/File/<accesskey>/<name>``: the server's file URLs (inputs, uploads, outputs), which every dialect
hands out (``fileurls.py``), readable by access key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import select

from dreamserve.api.deps import ServicesDep
from dreamserve.errors import FileNotFound
from dreamserve.queue.db import File
from dreamserve.queue.keyring import digest

router = APIRouter()

#: Files are whatever clients uploaded: never sniffed into HTML, never run as a page if opened, and embeddable
#: anywhere (output URLs are made to be shared, like Wiro's CDN links).
USER_FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
    "Cross-Origin-Resource-Policy": "cross-origin",
    # Caches ask again each time (a cheap 304 while the ETag holds), so a deleted file answers 404 at once.
    "Cache-Control": "no-cache",
}


@router.get("/v1/File/{accesskey}/{name}")
async def read_file(accesskey: str, name: str, services: ServicesDep) -> Response:
    """No credentials: the access key in the URL is the capability (Wiro: "anyone with the URL")."""
    async with services.sessions() as session:
        query = select(File).where(File.key_digest == digest(accesskey), File.name == name)
        file = (await session.execute(query)).scalars().first()
    missing = FileNotFound("File not found. Check the URL; output URLs are listed in Task/Detail outputs[].url.")
    if file is None:
        raise missing
    local = services.blobs.local_path(file.blob_key)
    if local is None:
        # S3: send the client straight to the bucket with a short-lived presigned URL, never cached: once the file
        # is deleted, this route answers 404 and the bucket too.
        url = await asyncio.to_thread(services.blobs.presign, file.blob_key)
        return RedirectResponse(url or "", status_code=307, headers={"Cache-Control": "no-store"})
    if not local.is_file():
        raise missing
    return FileResponse(local, media_type=file.contenttype, headers=USER_FILE_HEADERS)
