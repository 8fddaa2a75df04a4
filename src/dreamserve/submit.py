"""Turning a ``RunRequest`` (any dialect's, decoded) into a stored task, after the checks that need the server.

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
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobStore
from dreamserve.budget import ByteBudget
from dreamserve.errors import InvalidField, InvalidRequest, NotFound
from dreamserve.facts import FileMeta
from dreamserve.fetch import FetchPolicy, check_url
from dreamserve.filerows import input_row, stored_reference
from dreamserve.images import check_bytes, check_image
from dreamserve.jobs import StoredReference, TaskJob
from dreamserve.queue.db import File, Project, Task
from dreamserve.queue.keyring import digest
from dreamserve.queue.store import Quota, TaskStore, new_blob_folder
from dreamserve.request import Field, RunRequest, Source, StoredImage, Upload
from dreamserve.settings import Settings
from dreamserve.sizes import parse_size

_FILE_ROUTE = re.compile(r"^/v1/File/([^/]+)/([^/]+)$")
REFERENCES = Field.REFERENCES
T = TypeVar("T")


@dataclass(frozen=True)
class Reference:
    """One reference image, checked: an uploaded file, a stored image, or a URL the preprocess stage fetches."""

    url: str | None = None
    upload: Upload | None = None
    stored: StoredImage | None = None
    #: Uploads and stored images: (format extension, width, height) as checked.
    ext: str = ""
    width: int = 0
    height: int = 0


class Services(Protocol):
    """What submitting needs of ``services.Services`` (which sits above this module and is passed in)."""

    settings: Settings
    store: TaskStore
    blobs: BlobStore
    sessions: async_sessionmaker[AsyncSession]
    reference_budget: ByteBudget

    def wake(self, model: str, *, inputs_ready: bool = False) -> None: ...


def served_model(services: Services, slug: str) -> str:
    slug = slug.lower()
    if slug not in services.settings.models:
        served = ", ".join(sorted(services.settings.models))
        raise NotFound(f"slug-owner-project-not-exist: {slug} is not served here. Served models: {served}.")
    return slug


async def submit(services: Services, project: Project, slug: str, request: RunRequest) -> Task:
    """Check the request against the server's limits, store its uploaded references, then the task; nothing is
    stored if a check fails.

    The priority asked for is lowered to the project's maximum; past the project's quotas the task is
    refused with ``QuotaExceeded`` (code 96).
    """
    sources = await _read_own_files(services, request.references)
    uploads = [source for source in sources if isinstance(source, Upload)]
    claim = await _decoding(uploads, check_bytes, uploads, services.settings.max_input_pixels)
    with services.reference_budget.claim(claim):
        references = await _decoding(uploads, _check_references, services.settings, sources)
        first = next((r for r in references if r.url is None), None)
        size = parse_size(request.size, (first.width, first.height) if first else None, services.settings.min_pixels)
        await _check_urls(services, references)
        inputs, stored = _inputs(project, references)
        return await _store(services, project, slug, request, _job(request, size, stored), inputs)


async def _decoding(uploads: Sequence[Upload], check: Callable[..., T], *args: Any) -> T:
    """``check(*args)`` off the event loop when there are uploads (checking them decodes them, bounded by
    max_input_pixels); with none (URLs and stored images are checked from their rows) at once, sparing a Run two
    hops to a thread and back."""
    if not uploads:
        return check(*args)
    return await asyncio.to_thread(check, *args)


def _check_references(settings: Settings, sources: Sequence[Source]) -> list[Reference]:
    references: list[Reference] = []
    for number, source in enumerate(sources, start=1):
        if isinstance(source, Upload):
            label = f"{number} ({source.filename!r})" if source.filename else str(number)
            ext, width, height = check_image(source.data, label, settings.max_upload_bytes, settings.max_input_pixels)
            references.append(Reference(upload=source, ext=ext, width=width, height=height))
        elif isinstance(source, StoredImage):
            references.append(Reference(stored=source, ext=source.ext, width=source.width, height=source.height))
        else:
            references.append(Reference(url=source))
    return references


def _job(request: RunRequest, size: tuple[int, int], references: tuple[StoredReference, ...]) -> TaskJob:
    callback = request.callback
    return TaskJob(
        prompt=request.prompt,
        width=size[0],
        height=size[1],
        num_images=request.num_images,
        seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
        watermark=request.watermark,
        references=references,
        notes=(*request.notes, *((callback.refused_reason,) if callback.refused_reason else ())),
        output_size=request.output_size,
        output_format=request.output_format,
        asked_size=request.asked_size or request.size,
        asked_callback=callback.url or callback.refused,
        dialect=request.dialect,
        echo=request.echo,
    )


def _input_file(project: Project, folder: str, position: int, reference: Reference) -> File:
    stored_size = reference.stored.size if reference.stored is not None else 0
    size = len(reference.upload.data) if reference.upload is not None else stored_size
    return input_row(
        project.id, folder, position, reference.ext, size, FileMeta(width=reference.width, height=reference.height)
    )


def _inputs(
    project: Project, checked: Sequence[Reference]
) -> tuple[list[tuple[File, Reference]], tuple[StoredReference, ...]]:
    """The input rows to store (uploads and stored images), and the task's references in order."""
    folder = new_blob_folder()
    inputs: list[tuple[File, Reference]] = []
    references: list[StoredReference] = []
    for position, reference in enumerate(checked):
        if reference.url is not None:
            references.append(StoredReference(url=reference.url))
            continue
        file = _input_file(project, folder, position, reference)
        inputs.append((file, reference))
        references.append(StoredReference(blob_key=file.blob_key))
    return inputs, tuple(references)


async def _store(
    services: Services,
    project: Project,
    slug: str,
    request: RunRequest,
    job: TaskJob,
    inputs: list[tuple[File, Reference]],
) -> Task:
    settings = services.settings
    callback = request.callback
    # Bytes first, then the rows that point at them: a crash in between leaves only unreferenced blobs.
    try:
        for file, reference in inputs:
            await _put_input(services, file, reference)
        task = await services.store.create(
            project_id=project.id,
            model=slug,
            job=job,
            callback_url=callback.url,
            callback_events=list(callback.events),
            priority=min(request.priority, _max_priority(services, project)),
            inputs=[file for file, _ in inputs],
            quota=Quota(settings.max_queued_tasks, settings.max_queued_megapixels),
            refused_callback=(callback.refused[:2000], callback.refused_reason) if callback.refused else None,
        )
    except BaseException:
        for file, _ in inputs:
            services.blobs.delete(file.blob_key)
        raise
    services.wake(slug, inputs_ready=task.inputs_ready)
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


async def _read_own_files(services: Services, sources: Sequence[Source]) -> list[Source]:
    """``sources`` with every URL of this server's file route replaced by the stored file."""
    resolved: list[Source] = []
    for number, source in enumerate(sources, start=1):
        own = await _own_file(services, source, number) if isinstance(source, str) else None
        resolved.append(source if own is None else own)
    return resolved


def _path(url: str) -> str:
    try:
        return urlsplit(url).path
    except ValueError:  # "http://[::1" and the like: parse_run or the URL check refuses it
        return ""


async def _own_file(services: Services, url: str, number: int) -> StoredImage | Upload | None:
    """The stored file an own file URL names; None for any other URL."""
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
        reason = f"{number} ({url[:80]}) is {file.size:,} bytes; the limit is {limit:,}."
        raise InvalidField(REFERENCES, reason, limit=limit, files=True)
    found = await asyncio.to_thread(stored_reference, services.blobs, file, url) if file is not None else None
    if found is not None:
        return found
    if parts.netloc.lower() in _own_hosts(services):
        raise _gone(url, number)
    return None  # another server's URL that only looks like ours: fetched like any URL


def _gone(url: str, number: int) -> InvalidField:
    return InvalidField(
        REFERENCES,
        f"entry {number} ({url[:120]}) names no file on this server: it was deleted or has expired, or the URL is "
        "mistyped. Upload the file again with File/Upload and pass its url.",
    )


async def _check_urls(services: Services, references: Sequence[Reference]) -> None:
    settings = services.settings
    policy = FetchPolicy.build(settings.fetch_allow_private, settings.fetch_allow_hosts)

    async def check(number: int, url: str) -> None:
        try:
            await check_url(url, policy, settings.fetch_timeout_seconds)
        except InvalidRequest as exc:
            raise InvalidField(REFERENCES, f"entry {number}: {exc.message}") from None

    checks = [check(n, r.url) for n, r in enumerate(references, start=1) if r.url is not None]
    for outcome in await asyncio.gather(*checks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
