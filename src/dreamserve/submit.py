"""Turning checked request fields into a stored task: shared by Wiro's Run and the OpenAI-style endpoints.

Reference URLs are settled here, before anything is stored: a URL of this server's own file route
(``/v1/File/<accesskey>/<name>``, what File/Upload answers) names a stored image, on any host name, so no
request leaves the server; it was checked when it was stored, so its row's facts stand for it and its bytes
are copied blob to blob, never read into this process. Any other URL is checked as its fetch would check it
(scheme, a host that resolves, an address the fetch policy allows), so a task bound to fail is refused at Run.
Uploaded references are checked (decoded) within the process's budget of bytes in flight
(``reference_budget_bytes``): past it the request is refused with ``RateLimited`` (429), never queued.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobStore
from dreamserve.budget import ByteBudget
from dreamserve.errors import InvalidRequest, NotFound
from dreamserve.facts import FileMeta
from dreamserve.fetch import FetchPolicy, check_url
from dreamserve.jobs import StoredReference, TaskJob
from dreamserve.queue.db import File, Project, Task
from dreamserve.queue.keyring import digest
from dreamserve.queue.store import Quota, TaskStore, new_blob_folder
from dreamserve.settings import Settings
from dreamserve.status import FileRole
from dreamserve.wiro.params import (
    IMAGE_FORMATS,
    MAX_REFERENCES,
    Reference,
    RunParams,
    StoredImage,
    Upload,
    check_bytes,
    parse_run,
)

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
REFERENCE_FIELDS = ("inputImage", "inputImageUrl")
_FILE_ROUTE = re.compile(r"^/v1/File/([^/]+)/([^/]+)$")
#: The checked format of a stored file, by the content type it was stored with.
_EXTENSIONS = {CONTENT_TYPES.get(ext, f"image/{ext}"): ext for ext in IMAGE_FORMATS.values()}


class Services(Protocol):
    """What submitting needs of ``services.Services`` (which sits above this module and is passed in)."""

    settings: Settings
    store: TaskStore
    blobs: BlobStore
    sessions: async_sessionmaker[AsyncSession]
    reference_budget: ByteBudget

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
    fields = await _read_own_files(services, fields)
    uploads = [item for values in fields.values() for value in values for item in _items(value)]
    claim = await asyncio.to_thread(check_bytes, uploads, services.settings.max_input_pixels)
    with services.reference_budget.claim(claim):
        params = await _parse(services, fields)
        await _check_urls(services, params)
        inputs, references = _inputs(project, params)
        job = _job(params, references, output_size, output_format)
        return await _store(services, project, slug, params, job, inputs)


def _items(value: Any) -> list[Upload]:
    return [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, Upload)]


async def _parse(services: Services, fields: Mapping[str, Sequence[Any]]) -> RunParams:
    settings = services.settings
    # Off the event loop: checking uploads decodes them (bounded by max_input_pixels).
    return await asyncio.to_thread(
        parse_run,
        fields,
        max_upload_bytes=settings.max_upload_bytes,
        max_input_pixels=settings.max_input_pixels,
        min_pixels=settings.min_pixels,
    )


def _job(
    params: RunParams, references: tuple[StoredReference, ...], output_size: tuple[int, int] | None, output_format: str
) -> TaskJob:
    return TaskJob(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        num_images=params.max_images,
        seed=params.seed,
        watermark=params.watermark,
        references=references,
        notes=(params.refused_callback_reason,) if params.refused_callback_reason else (),
        output_size=output_size,
        output_format="jpeg" if output_format == "jpeg" else "png",
        asked_size=params.size,
        asked_callback=params.callback_url or params.refused_callback,
    )


def _input_file(project: Project, folder: str, position: int, reference: Reference, now: float) -> File:
    name = f"inputImage-{position}.{reference.ext}"
    stored_size = reference.stored.size if reference.stored is not None else 0
    return File(
        project_id=project.id,
        role=FileRole.INPUT,
        position=position,
        name=name,
        contenttype=CONTENT_TYPES.get(reference.ext, f"image/{reference.ext}"),
        size=len(reference.upload.data) if reference.upload is not None else stored_size,
        blob_key=f"inputs/{folder}/{name}",
        meta=FileMeta(width=reference.width, height=reference.height),
        created=now,
    )


def _inputs(project: Project, params: RunParams) -> tuple[list[tuple[File, Reference]], tuple[StoredReference, ...]]:
    """The input rows to store (uploads and stored images), and the task's references in order."""
    folder = new_blob_folder()
    now = time.time()
    inputs: list[tuple[File, Reference]] = []
    references: list[StoredReference] = []
    for position, reference in enumerate(params.references):
        if reference.url is not None:
            references.append(StoredReference(url=reference.url))
            continue
        file = _input_file(project, folder, position, reference, now)
        inputs.append((file, reference))
        references.append(StoredReference(blob_key=file.blob_key))
    return inputs, tuple(references)


async def _store(
    services: Services,
    project: Project,
    slug: str,
    params: RunParams,
    job: TaskJob,
    inputs: list[tuple[File, Reference]],
) -> Task:
    settings = services.settings
    # Bytes first, then the rows that point at them: a crash in between leaves only unreferenced blobs.
    try:
        for file, reference in inputs:
            await _put_input(services, file, reference)
        task = await services.store.create(
            project_id=project.id,
            model=slug,
            job=job,
            callback_url=params.callback_url,
            callback_events=params.callback_events,
            priority=min(params.priority, _max_priority(services, project)),
            inputs=[file for file, _ in inputs],
            quota=Quota(settings.max_queued_tasks, settings.max_queued_megapixels),
            refused_callback=(
                (params.refused_callback[:2000], params.refused_callback_reason) if params.refused_callback else None
            ),
        )
    except BaseException:
        for file, _ in inputs:
            services.blobs.delete(file.blob_key)
        raise
    services.wake(slug)
    return task


async def _put_input(services: Services, file: File, reference: Reference) -> None:
    if reference.upload is not None:
        await asyncio.to_thread(services.blobs.put, file.blob_key, reference.upload.data)
        return
    stored = reference.stored
    assert stored is not None  # a reference is a URL, an upload or a stored image
    with _still_there(stored, file.position + 1):
        await asyncio.to_thread(services.blobs.copy, stored.blob_key, file.blob_key)


@contextmanager
def _still_there(stored: StoredImage, number: int) -> Iterator[None]:
    """A stored image deleted between the check and the copy is refused as one deleted before the check."""
    try:
        yield
    except FileNotFoundError:
        raise _gone(stored.url, number) from None


def _max_priority(services: Services, project: Project) -> int:
    """The operator's cap on the project's priority (``keys create --max-priority``), else the server's."""
    if project.max_priority is not None:
        return project.max_priority
    return services.settings.max_priority


def _own_hosts(services: Services) -> set[str]:
    """``host:port`` spellings that certainly reach this server: its base or public URL and its bound port."""
    settings = services.settings
    hosts = {urlsplit(settings.base_url).netloc.lower()}
    hosts.update(f"{name}:{settings.port}" for name in (settings.host, "localhost", "127.0.0.1", "[::1]"))
    return hosts


async def _read_own_files(services: Services, fields: Mapping[str, Sequence[Any]]) -> Mapping[str, Sequence[Any]]:
    """``fields`` with every reference URL of this server's file route replaced by the stored file."""
    entries: list[tuple[str, Any]] = []
    for name in REFERENCE_FIELDS:
        for value in fields.get(name, ()):
            for item in value if isinstance(value, list) else [value]:
                pieces = [p.strip() for p in item.split(",")] if isinstance(item, str) else [item]
                entries.extend((name, piece) for piece in pieces if piece != "")
    urls = [piece for _, piece in entries if isinstance(piece, str) and _FILE_ROUTE.match(_path(piece))]
    if not urls or len(entries) > MAX_REFERENCES:
        return fields  # nothing of ours, or too many entries: parse_run refuses those without reading any
    replaced: dict[str, list[Any]] = {name: [] for name in REFERENCE_FIELDS}
    for number, (name, piece) in enumerate(entries, start=1):
        own = await _own_file(services, piece, number) if isinstance(piece, str) else None
        replaced[name].append(own if own is not None else piece)
    return {**fields, **{name: values for name, values in replaced.items() if values}}


def _path(url: str) -> str:
    try:
        return urlsplit(url).path
    except ValueError:  # "http://[::1" and the like: parse_run or the URL check refuses it
        return ""


async def _own_file(services: Services, url: str, number: int) -> StoredImage | Upload | None:
    route = _FILE_ROUTE.match(_path(url))
    if route is None:
        return None
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    accesskey, name = unquote(route.group(1)), unquote(route.group(2))
    async with services.sessions() as session:
        query = select(File).where(File.key_digest == digest(accesskey), File.name == name)
        file = (await session.execute(query)).scalar_one_or_none()
    limit = services.settings.max_upload_bytes
    if file is not None and file.size > limit:
        raise InvalidRequest(
            f"Request files [inputImage] {number} ({url[:80]}) is {file.size:,} bytes; the limit is {limit:,}."
        )
    found = await asyncio.to_thread(_stored, services.blobs, file, url) if file is not None else None
    if found is not None:
        return found
    if parts.netloc.lower() in _own_hosts(services):
        raise _gone(url, number)
    return None  # another server's URL that only looks like ours: fetched like any URL


def _stored(blobs: BlobStore, file: File, url: str) -> StoredImage | Upload | None:
    """The stored file as a ``StoredImage`` when its row says what it is, else its bytes (a row of an older
    server without them, checked like an upload); None when its bytes are gone."""
    width, height, ext = file.meta.width, file.meta.height, _EXTENSIONS.get(file.contenttype)
    if width is not None and height is not None and ext is not None:
        if not blobs.exists(file.blob_key):
            return None
        return StoredImage(blob_key=file.blob_key, url=url, size=file.size, ext=ext, width=width, height=height)
    try:
        return Upload(filename=file.name, data=blobs.read(file.blob_key))
    except FileNotFoundError:
        return None


def _gone(url: str, number: int) -> InvalidRequest:
    return InvalidRequest(
        f"Request parameter [inputImage] entry {number} ({url[:120]}) names no file on this server: it was "
        "deleted or has expired, or the URL is mistyped. Upload the file again with File/Upload and pass its url."
    )


async def _check_urls(services: Services, params: RunParams) -> None:
    settings = services.settings
    policy = FetchPolicy.build(settings.fetch_allow_private, settings.fetch_allow_hosts)

    async def check(number: int, url: str) -> None:
        try:
            await check_url(url, policy, settings.fetch_timeout_seconds)
        except InvalidRequest as exc:
            raise InvalidRequest(f"Request parameter [inputImage] entry {number}: {exc.message}") from None

    checks = [check(n, r.url) for n, r in enumerate(params.references, start=1) if r.url is not None]
    for outcome in await asyncio.gather(*checks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
