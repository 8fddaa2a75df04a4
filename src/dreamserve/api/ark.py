"""ByteDance's Ark images API, ``POST /api/v3/images/generations`` (api-spec.md §2.1), on the same task queue.

Code written for BytePlus ModelArk or Volcengine Ark (their SDKs, or the OpenAI SDK pointed at Ark) runs
with only ``base_url`` changed to ``<server>/api/v3``. A request becomes an ordinary task through
``submit.submit`` (named in the ``x-dreamserve-task-id`` header and the ``task_id`` field, so it can be
followed or cancelled like any other); bearer auth, the synchronous wait and the hang-up cancel are the
OpenAI route's too (``api/compat.py``). Group generation (``sequential_image_generation: "auto"``) takes its
size from the prompt (``groups.image_count``). With ``stream: true`` each image is sent as soon as the worker
has saved it (its ``Frame.OUTPUT_IMAGE`` event), then ``image_generation.completed`` and ``data: [DONE]``; checks
still answer HTTP 400 JSON before the stream starts. A stream holds one of the project's synchronous slots
(``sync_max_per_project``) until it ends, as a waiting request does: past the cap, 429 before it starts.

Output URLs are the capability URLs of Wiro's file items (``/v1/File/<accesskey>/<name>``). Ark's are presigned
links valid for 24 hours and its answer has no field for that; here, when ``retention_seconds`` is set, each
``url`` item (and streamed image) also carries ``expires``, the unix time the file is deleted at (Wiro's
``expiretime``), a key Ark's SDKs ignore. Without retention files are kept and there is no ``expires``.

Errors use Ark's ``{"error": {"code", "message", "param", "type"}}``; ``ark_error`` is the one place
they are translated, so the rest of the code raises the usual ``errors`` tree.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from dreamserve.api.compat import BearerProject, error_route, renamed, wait_for_task
from dreamserve.api.deps import ServicesDep, read_fields
from dreamserve.errors import AuthError, DreamError, InvalidRequest, InvalidState, NotFound, RateLimited, TaskFailed
from dreamserve.facts import ImageReport
from dreamserve.groups import image_count
from dreamserve.queue.db import File, Task
from dreamserve.services import Services
from dreamserve.status import FINAL, FileRole, Frame, Pexit, TaskStatus
from dreamserve.submit import submit
from dreamserve.wiro.params import MAX_TOTAL_IMAGES, Upload
from dreamserve.wiro.render import expires, file_url

#: Our parameter names as Ark's clients know them, for error messages and ``param``.
ARK_NAMES = {"inputImage": "image", "maxImages": "sequential_image_generation_options.max_images"}
DEFAULT_SIZE = "2048x2048"
MAX_SEED = 2**31 - 1
OUTPUT_FORMATS = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
#: Ark counts 256 pixels as one output token.
PIXELS_PER_TOKEN = 256
TASK_HEADER = "x-dreamserve-task-id"
_DATA_URI = re.compile(r"^data:image/([a-z0-9.+-]+);base64,", re.IGNORECASE)


def ark_error(exc: DreamError) -> JSONResponse:
    """The translation of our error tree into Ark's status codes and error body."""
    message, param = renamed(exc, ARK_NAMES)
    headers = None
    if isinstance(exc, AuthError):
        status, code, kind = 401, "AuthenticationError", "Unauthorized"
    elif isinstance(exc, RateLimited):
        status, code, kind = 429, "RateLimitExceeded", "TooManyRequests"
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, NotFound):
        status, code, kind = 404, "InvalidEndpointOrModel.NotFound", "NotFound"
    elif exc.http_status >= 500:
        status, code, kind = exc.http_status, "InternalServiceError", "InternalServerError"
    elif isinstance(exc, InvalidState):
        # Not 5xx on purpose: SDKs retry those, and a retry would queue a second task.
        status, code, kind = 400, "TaskNotCompleted", "BadRequest"
    else:
        status, code, kind = max(400, exc.http_status), "InvalidParameter", "BadRequest"
    body = {"error": {"code": code, "message": message, "param": param or "", "type": kind}}
    return JSONResponse(body, status_code=status, headers=headers)


router = APIRouter(route_class=error_route(ark_error))


@dataclass
class ArkRequest:
    """An Ark request, checked, as the task fields ``submit`` takes plus how to answer."""

    model: str
    slug: str
    fields: dict[str, list[Any]]
    response_format: str
    output_format: str
    stream: bool
    warnings: list[str] = field(default_factory=list)


@router.post("/api/v3/images/generations")
async def generations(request: Request, project: BearerProject, services: ServicesDep) -> Response:
    ask = parse_request(services, await read_fields(request, 0))
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(services.sync_slot(project.id))  # 429 past the project's cap
        task = await submit(services, project, ask.slug, ask.fields, output_format=ask.output_format)
        headers = {TASK_HEADER: str(task.id)}
        if ask.stream:  # the slot goes with the stream, released when it has been sent or the client left
            return HeldStream(_stream(services, task, ask), held.pop_all(), headers=headers)
        await wait_for_task(request, services, task)
    return JSONResponse(await _answer(services, task, ask), headers=headers)


class HeldStream(StreamingResponse):
    """An event stream that keeps what ``held`` holds (the project's synchronous slot) until it has been sent, or
    has failed to be: released in ``__call__``, which runs even when the body is never started."""

    def __init__(self, events: AsyncIterator[str], held: contextlib.AsyncExitStack, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.held:
            await super().__call__(scope, receive, send)


def parse_request(services: Services, body: dict[str, list[Any]]) -> ArkRequest:
    """Check Ark's fields; unknown ones (and the ``null``s Ark's SDKs send) are ignored, as on Ark."""

    def one(name: str) -> Any:
        values = body.get(name)
        return values[-1] if values else None

    model = str(one("model") or "").strip()
    if not model:
        raise InvalidRequest("Request parameter [model] required: send seedream-4-0-250828 or a served model.")
    slug = _served(services, model)

    response_format = str(one("response_format") or "url")
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("Request parameter [response_format] must be 'url' or 'b64_json'.")
    output_format = OUTPUT_FORMATS.get(str(one("output_format") or "jpeg").lower())
    if output_format is None:
        raise InvalidRequest("Request parameter [output_format] must be 'jpeg' or 'png'.")
    stream = one("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("Request parameter [stream] must be true or false.")

    images = _images(one("image"), services.settings.max_upload_bytes)
    prompt = one("prompt")
    fields: dict[str, list[Any]] = {
        "prompt": [prompt if isinstance(prompt, str) else ""],
        "size": [str(one("size") or DEFAULT_SIZE)],
        "inputImage": images,
        "maxImages": [_group_size(one, str(prompt or ""), len(images))],
        "watermark": [_flag(one("watermark"), "watermark", default=True)],
    }
    seed = one("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= MAX_SEED:
            raise InvalidRequest(f"Request parameter [seed] must be an integer from -1 (random) to {MAX_SEED}.")
        if seed >= 0:
            fields["seed"] = [seed]
    ask = ArkRequest(model, slug, fields, response_format, output_format, bool(stream))
    if one("optimize_prompt_options") is not None or one("optimize_prompt") is not None:
        ask.warnings.append("optimize_prompt_options is accepted but not applied: the prompt is used as written.")
    return ask


def _served(services: Services, model: str) -> str:
    """A served slug as given, else an Ark model id through ``ark_models``; anything else is Ark's 404."""
    settings = services.settings
    slug = model.lower()
    if slug not in settings.models:
        slug = {name.lower(): target.lower() for name, target in settings.ark_models.items()}.get(slug, "")
    if slug not in settings.models:
        known = sorted({*settings.ark_models, *settings.models})
        raise NotFound(
            f"The model or endpoint {model[:100]} does not exist or you do not have access to it. "
            f"Use one of: {', '.join(known)}."
        )
    return slug


def _flag(value: Any, name: str, *, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise InvalidRequest(f"Request parameter [{name}] must be true or false.")


def _group_size(one: Callable[[str], Any], prompt: str, references: int) -> int:
    """1 unless ``auto``; then the count the prompt asks for, within ``max_images`` and references + outputs <= 15."""
    mode = one("sequential_image_generation") or "disabled"
    if mode not in ("auto", "disabled"):
        raise InvalidRequest("Request parameter [sequential_image_generation] must be 'auto' or 'disabled'.")
    options = one("sequential_image_generation_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("Request parameter [sequential_image_generation_options] must be an object.")
    cap = options.get("max_images")
    cap = MAX_TOTAL_IMAGES if cap is None else cap
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TOTAL_IMAGES:
        raise InvalidRequest(
            f"Request parameter [sequential_image_generation_options.max_images] must be an integer from 1 to "
            f"{MAX_TOTAL_IMAGES}."
        )
    if mode == "disabled":
        return 1
    return image_count(prompt, max(1, min(cap, MAX_TOTAL_IMAGES - references)))


def _images(value: Any, max_bytes: int) -> list[Any]:
    """``image``: one or a list of URLs and ``data:image/<fmt>;base64,...`` URIs, the URIs decoded to uploads."""
    if value is None:
        return []
    entries = value if isinstance(value, list) else [value]
    images: list[Any] = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, str):
            raise InvalidRequest(f"Request parameter [image] entry {number} must be a string (a URL or data URI).")
        match = _DATA_URI.match(entry)
        if match is None:
            if not entry.lower().startswith(("http://", "https://")):
                raise InvalidRequest(
                    f"Request parameter [image] entry {number} must be an http(s) URL or a "
                    f"data:image/<format>;base64,<data> URI, got {entry[:40]!r}."
                )
            images.append(entry)
            continue
        encoded = entry[match.end() :]
        if len(encoded) // 4 * 3 > max_bytes + 3:  # refused before decoding it
            raise InvalidRequest(f"Request parameter [image] entry {number} is larger than {max_bytes:,} bytes.")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"Request parameter [image] entry {number} is not valid base64.") from None
        images.append(Upload(filename=f"image-{number}.{match.group(1).lower()}", data=data))
    return images


# -- answers ---------------------------------------------------------------------------------------


async def _answer(services: Services, task: Task, ask: ArkRequest) -> dict[str, Any]:
    fresh = await services.store.get_by_id(task.id)
    status = fresh.status if fresh else "gone"
    follow = f"Task {task.id} (socketaccesstoken {services.keys.token(task)})"
    if fresh is None or status not in FINAL:
        raise InvalidState(f"{follow} is still {status} after the wait limit; follow it with Task/Detail.")
    if status == TaskStatus.CANCEL:
        raise InvalidState(f"{follow} was cancelled.")
    if fresh.pexit == Pexit.BAD_INPUT:  # an input could not be read: the caller's to fix, and Ark names the field
        raise InvalidRequest(f"Request parameter [image]: {follow} could not read an input: {fresh.debugerror}")
    if fresh.pexit != Pexit.OK:
        raise TaskFailed(f"{follow} failed (pexit {fresh.pexit}): {fresh.debugerror[:500]}")
    files = (await services.store.files([task.id], FileRole.OUTPUT))[task.id]
    items: dict[int, dict[str, Any]] = {}
    for file in files:
        items[file.position] = await _item(services, file, ask.response_format)
    for failed in fresh.details.failed_images or ():
        items[failed.index] = {"error": _image_error(f"Image {failed.index} failed: {failed.message}")}
    answer: dict[str, Any] = {
        "model": ask.model,
        "created": int(time.time()),
        "data": [items[index] for index in sorted(items)],
        "usage": _usage(files),
        # Beyond Ark: the task behind the images, to follow, list or cancel it like any other.
        "task_id": str(task.id),
    }
    if ask.warnings:
        answer["warnings"] = ask.warnings
    return answer


def _image_error(message: str) -> dict[str, str]:
    """Ark's error object of an image that could not be made."""
    return {"code": "InternalServiceError", "message": message}


async def _item(services: Services, file: File, response_format: str) -> dict[str, Any]:
    size = f"{file.meta.width}x{file.meta.height}"
    if response_format == "url":
        settings = services.settings
        item: dict[str, Any] = {"url": file_url(settings.base_url, file, services.keys)}
        expiry = expires(file, settings.retention_seconds, role="output")  # streamed, it is still a partial row
        if expiry is not None:  # ours: when the URL stops answering (Ark's own links last 24 h, unsaid)
            item["expires"] = int(expiry)
    else:
        raw = await asyncio.to_thread(services.blobs.read, file.blob_key)
        item = {"b64_json": base64.b64encode(raw).decode()}
    return {**item, "size": size, "seed": file.meta.seed}  # seed: ours, what reproduces it


def _usage(files: list[File]) -> dict[str, int]:
    tokens = sum((f.meta.width or 0) * (f.meta.height or 0) for f in files) // PIXELS_PER_TOKEN
    return {"generated_images": len(files), "output_tokens": tokens, "total_tokens": tokens}


def _sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(services: Services, task: Task, ask: ArkRequest) -> AsyncIterator[str]:
    """One event per image as the worker saves it, then ``completed`` with the usage, then ``[DONE]``.

    A client that hangs up cancels the task (``sync_cancel_on_disconnect``), as on the synchronous route."""
    settings = services.settings
    sent: set[int] = set()
    saved: list[File] = []
    finished = False

    def event(kind: str, **fields: Any) -> str:
        return _sse({"type": f"image_generation.{kind}", "model": ask.model, "created": int(time.time()), **fields})

    try:
        async for update in services.follow(task.id, settings.sync_wait_seconds):
            if update.type == Frame.OUTPUT_IMAGE and isinstance(update.message, ImageReport):
                index, report = update.message.index, update.message
                if index in sent:
                    continue  # a re-run after a lost worker saves its images again
                sent.add(index)
                if report.failure is not None:
                    yield event("partial_failed", image_index=index, error=_image_error(report.failure))
                    continue
                file = await _file(services, task.id, report.name or "")
                if file is None:
                    continue
                saved.append(file)
                item = await _item(services, file, ask.response_format)
                yield event("partial_succeeded", image_index=index, **item)
            elif update.type in FINAL:
                finished = True
        if not finished or await _ended_badly(services, task):
            finished = True
            fresh = await services.store.get_by_id(task.id)
            reason = (fresh.debugerror.strip() if fresh else "") or "the task did not finish in the wait limit"
            error = {"code": "InternalServiceError", "message": f"Task {task.id}: {reason[:500]}"}
            yield event("partial_failed", image_index=max(sent, default=-1) + 1, error=error)
        completed = {"usage": _usage(saved), "task_id": str(task.id)}
        if ask.warnings:
            completed["warnings"] = ask.warnings
        yield event("completed", **completed)
        yield "data: [DONE]\n\n"
    finally:
        if not finished and settings.sync_cancel_on_disconnect:
            with anyio.CancelScope(shield=True):
                await services.abandon(task.id)


async def _ended_badly(services: Services, task: Task) -> bool:
    fresh = await services.store.get_by_id(task.id)
    return fresh is None or fresh.status != TaskStatus.POSTPROCESS_END or fresh.pexit != Pexit.OK


async def _file(services: Services, task_id: int, name: str) -> File | None:
    """The task's file of that name: the latest row, as a re-run after a lost worker saves its images again."""
    async with services.sessions() as session:
        query = select(File).where(File.task_id == task_id, File.name == name).order_by(File.id.desc()).limit(1)
        file: File | None = (await session.execute(query)).scalars().first()
        return file
