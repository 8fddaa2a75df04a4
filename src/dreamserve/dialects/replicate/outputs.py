"""A prediction's output images where the blob store is remote (S3): ``/v1/predictions/<id>/output/<name>``.

The file route of the core answers those with a redirect to a presigned URL, which the client's ``FileOutput``
does not follow (and would send its bearer token to the bucket with). This route reads the image through,
streamed from the presigned URL in chunks (bounded memory), to the project's token. On local disk the outputs are
the core's capability URLs, which answer 200 with the bytes themselves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from dreamserve.api.deps import ServicesDep
from dreamserve.api.files import USER_FILE_HEADERS
from dreamserve.dialects.common import BearerProject, error_route
from dreamserve.dialects.replicate.render import prediction_task, replicate_error
from dreamserve.errors import NotFound
from dreamserve.queue.db import File

router = APIRouter(route_class=error_route(replicate_error))

#: Seconds to reach the bucket and between two of its chunks.
BUCKET_TIMEOUT_SECONDS = 30.0


@router.get("/v1/predictions/{prediction_id}/output/{name}")
async def output(prediction_id: str, name: str, project: BearerProject, services: ServicesDep) -> StreamingResponse:
    task = await prediction_task(services, project, prediction_id)
    query = (
        select(File)
        .where(File.task_id == task.id, File.name == name, File.role.in_(("output", "partial")))
        .order_by(File.id.desc())
        .limit(1)
    )
    async with services.sessions() as session:
        file = (await session.execute(query)).scalars().first()
    url = await asyncio.to_thread(services.blobs.presign, file.blob_key) if file is not None else None
    if file is None or url is None:
        raise NotFound(f"Prediction {task.id} has no output {name[:80]}.")
    client = httpx.AsyncClient(timeout=BUCKET_TIMEOUT_SECONDS)
    answer = await client.send(client.build_request("GET", url), stream=True)
    if answer.status_code != 200:
        await answer.aclose()
        await client.aclose()
        raise NotFound(f"Prediction {task.id}'s output {name[:80]} is gone (deleted or expired).")
    return Relayed(client, answer, media_type=file.contenttype, headers=USER_FILE_HEADERS)


class Relayed(StreamingResponse):
    """The bucket's answer sent on; its connection is closed once sent, or once sending failed or never began."""

    def __init__(self, client: httpx.AsyncClient, answer: httpx.Response, **options: Any) -> None:
        super().__init__(answer.aiter_bytes(), **options)
        self.client, self.answer = client, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.aclose()
            await self.client.aclose()
