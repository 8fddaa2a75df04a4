"""Turning checked request fields into a stored task: shared by Wiro's Run and the OpenAI-style endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from dreamserve.blobs import BlobStore
from dreamserve.db import File, Project, Task
from dreamserve.errors import NotFound
from dreamserve.params import RunParams, parse_run
from dreamserve.settings import Settings
from dreamserve.store import Quota, TaskStore, new_blob_folder
from dreamserve.wire import input_marker

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


class Services(Protocol):
    """What submitting needs of ``services.Services`` (which sits above this module and is passed in)."""

    settings: Settings
    store: TaskStore
    blobs: BlobStore

    def wake(self, model: str) -> None: ...


def served_model(services: Services, slug: str) -> str:
    slug = slug.lower()
    if slug not in services.settings.models:
        served = ", ".join(sorted(services.settings.models))
        raise NotFound(f"slug-owner-project-not-exist: {slug} is not served here. Served models: {served}.")
    return slug


async def submit(
    services: Services,
    project: Project,
    slug: str,
    fields: Mapping[str, Sequence[Any]],
    output_size: tuple[int, int] | None = None,
    *,
    output_format: str = "png",
) -> Task:
    """Check every field, store uploaded references, then the task; nothing is stored if a check fails.

    ``output_size``: downscale the images to it after generating at the checked ``size`` (OpenAI's small sizes).

    The priority asked for is lowered to the project's maximum; past the project's quotas the task is
    refused with ``QuotaExceeded`` (code 96). ``output_format`` (``png`` or ``jpeg``) is the format the
    worker writes the images in.
    """
    settings = services.settings
    # Off the event loop: checking uploads decodes them (bounded by max_input_pixels).
    params = await asyncio.to_thread(
        parse_run,
        fields,
        max_upload_bytes=settings.max_upload_bytes,
        max_input_pixels=settings.max_input_pixels,
        min_pixels=settings.min_pixels,
    )
    folder = new_blob_folder()
    now = time.time()
    inputs: list[File] = []
    job_inputs: list[dict[str, str]] = []
    echo: list[str] = []
    for position, reference in enumerate(params.references):
        if reference.upload is None:
            job_inputs.append({"url": reference.url or ""})
            echo.append(reference.url or "")
            continue
        name = f"inputImage-{position}.{reference.ext}"
        file = File(
            project_id=project.id,
            role="input",
            position=position,
            name=name,
            contenttype=CONTENT_TYPES.get(reference.ext, f"image/{reference.ext}"),
            size=len(reference.upload.data),
            blob_key=f"inputs/{folder}/{name}",
            meta={"width": reference.width, "height": reference.height},
            created=now,
        )
        inputs.append(file)
        job_inputs.append({"blob_key": file.blob_key})
        # Not the URL: it holds the access key, which is never stored. Task/Detail renders it (wire.input_marker).
        echo.append(input_marker(position))

    # Bytes first, then the rows that point at them: a crash in between leaves only unreferenced blobs.
    uploads = [r.upload.data for r in params.references if r.upload is not None]
    try:
        for file, data in zip(inputs, uploads, strict=True):
            await asyncio.to_thread(services.blobs.put, file.blob_key, data)
        task = await services.store.create(
            project_id=project.id,
            model=slug,
            parameters=_echo(params, echo, output_size),
            job={**_job(params, job_inputs, output_size), "output_format": output_format},
            callback_url=params.callback_url,
            callback_events=params.callback_events,
            priority=min(params.priority, _max_priority(services, project)),
            inputs=inputs,
            quota=Quota(settings.max_queued_tasks, settings.max_queued_megapixels),
        )
    except BaseException:
        for file in inputs:
            services.blobs.delete(file.blob_key)
        raise
    services.wake(slug)
    return task


def _max_priority(services: Services, project: Project) -> int:
    """The operator's cap on the project's priority (``keys create --max-priority``), else the server's."""
    if project.max_priority is not None:
        return project.max_priority
    return services.settings.max_priority


def _echo(params: RunParams, inputs: list[str], output_size: tuple[int, int] | None) -> dict[str, Any]:
    echo: dict[str, Any] = {
        "prompt": params.prompt,
        "size": f"{output_size[0]}x{output_size[1]}" if output_size else params.size,
        "maxImages": str(params.max_images),
        "watermark": "true" if params.watermark else "false",
        "seed": str(params.seed),
    }
    if inputs:
        echo["inputImage"] = inputs[0] if len(inputs) == 1 else inputs
    if params.callback_url:
        echo["callbackUrl"] = params.callback_url
    return echo


def _job(params: RunParams, inputs: list[dict[str, str]], output_size: tuple[int, int] | None) -> dict[str, Any]:
    job: dict[str, Any] = {
        "prompt": params.prompt,
        "width": params.width,
        "height": params.height,
        "num_images": params.max_images,
        "seed": params.seed,
        "watermark": params.watermark,
        "inputs": inputs,
    }
    if output_size:
        job["output_size"] = list(output_size)
    return job
