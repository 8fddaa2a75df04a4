"""The Python SDK: ``Client`` and ``AsyncClient`` for dreamserve or any Wiro-compatible server.

Usage::

    with Client("http://127.0.0.1:8000", api_key, api_secret) as client:
        run = client.run("a red fox in the snow", images=["ref.png"], size="2K", max_images=2)
        task = client.wait(tasktoken=run.socketaccesstoken)
        if task.succeeded:
            paths = [client.download(output, "out/") for output in task.outputs]

Only httpx, websockets and the stdlib (plus ``dreamserve.errors``/``signing``, both dependency-free):
the client never imports server code. Every failure is a ``DreamError``: the server's own error
classes for Wiro's ``result: false`` envelope, ``TransportError`` for everything below it.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from contextlib import aclosing, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as sync_connect

from dreamserve import __version__
from dreamserve.errors import (
    AuthError,
    DreamError,
    HTTPProtocolError,
    InvalidRequest,
    InvalidState,
    NotFound,
    RateLimited,
    RouteNotFound,
    TaskFailed,
    error_class,
)
from dreamserve.signing import auth_headers
from dreamserve.status import FINAL, Frame, Pexit, TaskStatus

__all__ = [
    "DEFAULT_MODEL",
    "AsyncClient",
    "Client",
    "Event",
    "Progress",
    "RunResult",
    "Task",
    "TransportError",
]

DEFAULT_MODEL = "bytedance/seedream-v4"
#: Run uploads up to 14 images and a busy server may take a while to answer: generous reads, quick connects.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: How long ``wait`` follows a task by default (queue time included).
DEFAULT_WAIT = 3600.0
#: Polling backoff when the socket is unavailable (Wiro's MCP client uses the same steps).
POLL_STEPS: tuple[float, ...] = (2.0, 5.0, 10.0)
TERMINAL_EVENTS: frozenset[str] = FINAL
#: ``task_error`` is terminal only as a Task/Detail *status* (fatal pre-run failure); as a socket event it is stderr.
TERMINAL_STATUSES: frozenset[str] = frozenset(s for s in TaskStatus if s.is_terminal)
#: Frames may carry preview images; WiroKit allows 8 MiB too.
MAX_FRAME_BYTES = 8 * 1024 * 1024

#: An input image: a local path, raw bytes, or an ``http(s)://`` URL the server fetches itself.
ImageInput = str | os.PathLike[str] | bytes
#: An item of ``Task.outputs`` or a bare URL.
OutputRef = Mapping[str, Any] | str
EventHandler = Callable[["Event"], None]

# What a failing socket can raise; ``wait`` then falls back to polling Task/Detail.
_SOCKET_ERRORS = (OSError, WebSocketException, DreamError)


class TransportError(DreamError):
    """No usable Wiro envelope: unreachable server, timeout, HTTP 5xx, a proxy's HTML page, a failed download."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class RunResult:
    taskid: str
    #: Doubles as the ``tasktoken`` of Task/Detail and of the socket.
    socketaccesstoken: str


@dataclass(frozen=True)
class Task:
    """A Wiro task object, kept exactly as the server sent it (``data``), with readable accessors."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def socketaccesstoken(self) -> str:
        return str(self.data.get("socketaccesstoken") or "")

    @property
    def status(self) -> str:
        return str(self.data.get("status") or "")

    @property
    def pexit(self) -> str:
        return str(self.data.get("pexit") or "")

    @property
    def debugerror(self) -> str:
        return str(self.data.get("debugerror") or "")

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return [o for o in self.data.get("outputs") or [] if isinstance(o, dict)]

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == TaskStatus.POSTPROCESS_END and self.pexit == Pexit.OK


@dataclass(frozen=True)
class Progress:
    """Wiro's ``progressGenerate`` object, read tolerantly: every value may be a string, a number or absent."""

    step: int | None
    total: int | None
    percentage: float | None
    speed: str
    elapsed: str
    #: The server's own estimate, e.g. ``"3s"``.
    remaining: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, message: Any) -> Progress | None:
        if not isinstance(message, dict) or not ({"stepCurrent", "percentage"} & message.keys()):
            return None
        speed = f"{message.get('speed') or ''} {message.get('speedType') or ''}".strip()
        return cls(
            step=_int(message.get("stepCurrent")),
            total=_int(message.get("stepTotal")),
            percentage=_float(message.get("percentage")),
            speed=speed,
            elapsed=str(message.get("elapsedTime") or ""),
            remaining=str(message.get("remainingTime") or ""),
            raw=message,
        )


@dataclass(frozen=True)
class Event:
    """One socket frame ``{"type", "id", "tasktoken", "message", "result"}``; ``message`` already JSON-decoded."""

    type: str
    taskid: str
    tasktoken: str = ""
    message: Any = None
    result: bool = True

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def progress(self) -> Progress | None:
        return Progress.parse(self.message) if self.type == Frame.OUTPUT else None

    @property
    def queue_position(self) -> int | None:
        """dreamserve extension: ``task_queue`` may carry ``{"position": "3"}``; ``None`` when not given."""
        if self.type != TaskStatus.QUEUE or not isinstance(self.message, dict):
            return None
        return _int(self.message.get("position"))

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The output items of ``task_postprocess_end`` (the same items as Task/Detail ``outputs``)."""
        if self.type != TaskStatus.POSTPROCESS_END or not isinstance(self.message, list):
            return []
        return [o for o in self.message if isinstance(o, dict)]


class _BaseClient:
    """Everything but I/O: request shapes, envelope parsing, frame parsing. Shared by both clients."""

    def __init__(self, base_url: str, api_key: str, api_secret: str | None, socket_url: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret
        # Wiro's socket is on another host (wss://socket.wiro.ai/v1); ours is the API host's /v1.
        self.socket_url = socket_url or _to_ws(self.base_url) + "/v1"
        self._last_nonce = 0
        self._nonce_lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        # Milliseconds, strictly increasing: a server that accepts each nonce once (unique_nonces)
        # must not see two equal ones when requests leave within the same second, or concurrently.
        with self._nonce_lock:
            self._last_nonce = max(time.time_ns() // 1_000_000, self._last_nonce + 1)
            nonce = str(self._last_nonce)
        return {"user-agent": f"dreamserve-python/{__version__}", **auth_headers(self.api_key, self.api_secret, nonce)}

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _run_request(
        self,
        prompt: str,
        *,
        model: str,
        images: Sequence[ImageInput],
        size: str | None,
        max_images: int,
        watermark: bool,
        callback_url: str | None,
        seed: int | None,
        extra: Mapping[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """The URL and httpx keyword arguments of a Run request."""
        # Wiro's canonical JSON body: maxImages a number, watermark the string "true"/"false".
        fields: dict[str, Any] = {"prompt": prompt, "maxImages": max_images, "watermark": str(watermark).lower()}
        if size:
            fields["size"] = size
        if callback_url:
            fields["callbackUrl"] = callback_url
        if seed is not None:
            fields["seed"] = seed
        fields.update(extra)
        url = self._url(f"/v1/Run/{model.strip('/')}")
        if all(_is_url(image) for image in images):
            return url, {"json": {**fields, **({"inputImage": [str(i) for i in images]} if images else {})}}
        # Files and URLs go in one repeated multipart field (Wiro's combinefileinput), in the caller's
        # order: the order of references matters to the model. A (None, value) part is a plain field.
        parts: list[tuple[str, Any]] = [
            ("inputImage", (None, image) if _is_url(image) else _file_part(image, n)) for n, image in enumerate(images)
        ]
        return url, {"data": {k: _form_value(v) for k, v in fields.items()}, "files": parts}

    @staticmethod
    def _parse(response: httpx.Response) -> dict[str, Any]:
        """The body of a ``result: true`` answer; otherwise raise the matching ``DreamError``."""
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("result") is True:
            return body
        if not isinstance(body, dict) or ("errors" not in body and "result" not in body):
            snippet = " ".join(response.text.split())[:200]
            raise TransportError(f"HTTP {status} from {response.url} is not a Wiro answer: {snippet!r}", status)
        raise _error_from(body, response)

    @staticmethod
    def _task(body: Mapping[str, Any]) -> Task | None:
        tasks = body.get("tasklist") or []
        return Task(tasks[0]) if tasks and isinstance(tasks[0], dict) else None

    @staticmethod
    def _run_result(body: Mapping[str, Any]) -> RunResult:
        if not body.get("taskid") or not body.get("socketaccesstoken"):
            raise TransportError(f"Run answered without taskid/socketaccesstoken: {body}")
        return RunResult(str(body["taskid"]), str(body["socketaccesstoken"]))

    @staticmethod
    def _task_key(taskid: str | int | None, tasktoken: str | None) -> dict[str, str]:
        if taskid is not None and str(taskid):
            return {"taskid": str(taskid)}
        if tasktoken:
            return {"tasktoken": tasktoken}
        raise ValueError("Give taskid or tasktoken.")

    @staticmethod
    def _register(tasktoken: str) -> str:
        return json.dumps({"type": Frame.INFO.value, "tasktoken": tasktoken})

    @staticmethod
    def _event(raw: str | bytes) -> Event | None:
        """A frame as an Event; ``None`` for frames that are not task events (binary, non-JSON, hello)."""
        try:
            frame = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return None
        if frame["type"] == "error" or frame.get("result") is False:
            # Our server's answer to an unknown token or a malformed registration.
            raise NotFound(str(frame.get("message") or "The socket refused the task token."))
        if "id" not in frame and "tasktoken" not in frame:
            return None  # e.g. {"type": "connected"}
        return Event(
            type=frame["type"],
            taskid=str(frame.get("id") or ""),
            tasktoken=str(frame.get("tasktoken") or ""),
            message=_decode_message(frame.get("message")),
            result=frame.get("result") is not False,
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "open_timeout": 10,
            "max_size": MAX_FRAME_BYTES,
            "user_agent_header": f"dreamserve-python/{__version__}",
        }


class _Watch:
    """What ``wait`` has reported so far, so the polling fallback reports only changes, like the socket would."""

    def __init__(self, tasktoken: str, on_event: EventHandler | None) -> None:
        self.tasktoken = tasktoken
        self.on_event = on_event
        self.status = ""
        self.progress: Any = None

    def seen(self, event: Event) -> None:
        if event.type not in (Frame.OUTPUT, Frame.ERROR) and not event.type.endswith("_full"):
            self.status = event.type
        if self.on_event is not None:
            self.on_event(event)

    def polled(self, task: Task) -> None:
        if task.status and task.status != self.status:
            self.seen(Event(task.status, task.id, self.tasktoken, None))
        # dreamserve's Detail carries the latest progress object (an extension): report it as task_output.
        progress = task.data.get("progress")
        if progress and progress != self.progress and not task.is_terminal:
            self.progress = progress
            self.seen(Event(Frame.OUTPUT, task.id, self.tasktoken, _decode_message(progress)))


class Client(_BaseClient):
    """Synchronous client. ``transport=`` takes an ``httpx.MockTransport`` in tests."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        socket_url: str | None = None,
    ) -> None:
        super().__init__(base_url, api_key, api_secret, socket_url)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._parse(self._send("POST", self._url(path), headers=self._headers(), **kwargs))

    def run(
        self,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        images: Sequence[ImageInput] = (),
        size: str | None = None,
        max_images: int = 1,
        watermark: bool = False,
        callback_url: str | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> RunResult:
        """Queue a task. Not retried on failure: a repeated Run would queue (and bill) a second task."""
        url, kwargs = self._run_request(
            prompt,
            model=model,
            images=images,
            size=size,
            max_images=max_images,
            watermark=watermark,
            callback_url=callback_url,
            seed=seed,
            extra=extra,
        )
        return self._run_result(self._parse(self._send("POST", url, headers=self._headers(), **kwargs)))

    def detail(self, taskid: str | int | None = None, tasktoken: str | None = None) -> Task:
        task = self._task(self._post("/v1/Task/Detail", json=self._task_key(taskid, tasktoken)))
        if task is None:
            raise NotFound("There is no task yet: Task/Detail answered an empty tasklist.")
        return task

    def cancel(self, taskid: str | int) -> Task:
        """Cancel a queued task (dreamserve also stops a running one at its next step)."""
        body = self._post("/v1/Task/Cancel", json={"taskid": str(taskid)})
        return self._task(body) or self.detail(taskid)  # Wiro's clients only rely on `result`

    def kill(self, taskid: str | int) -> Task:
        """Stop a running task at once."""
        body = self._post("/v1/Task/Kill", json={"taskid": str(taskid)})
        return self._task(body) or self.detail(taskid)

    def upload(self, image: str | os.PathLike[str] | bytes, *, folderid: str | None = None) -> dict[str, Any]:
        """Upload a file with File/Upload; the returned item's ``url`` can be passed to ``run(images=...)``."""
        data = {"folderid": folderid} if folderid else None
        body = self._post("/v1/File/Upload", data=data, files=[("file", _file_part(image, 0))])
        return dict((body.get("list") or [{}])[0])

    def events(self, tasktoken: str, *, timeout: float | None = None) -> Generator[Event, None, None]:
        """The task's events, earlier ones first, ending after a terminal one.

        Raises ``TimeoutError`` after ``timeout`` seconds, websockets/OS errors if the socket fails,
        and ``NotFound`` if the server does not know the token.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with sync_connect(self.socket_url, **self._connect_kwargs()) as socket:
            socket.send(self._register(tasktoken))
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"No terminal event for the task within {timeout} s.")
                event = self._event(socket.recv(timeout=left))
                if event is None:
                    continue
                yield event
                if event.is_terminal:
                    return

    def wait(
        self,
        taskid: str | int | None = None,
        tasktoken: str | None = None,
        *,
        timeout: float = DEFAULT_WAIT,
        poll: Sequence[float] = POLL_STEPS,
        on_event: EventHandler | None = None,
    ) -> Task:
        """Follow the task to its end and return the final Task (check ``succeeded``).

        Uses the socket; if it fails, polls Task/Detail with the ``poll`` backoff (2 s, 5 s, then 10 s).
        ``on_event`` sees every event; while polling, it sees status changes as events.
        Raises ``TimeoutError`` when the task is still running after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        if not tasktoken:
            task = self.detail(taskid=taskid)  # the socket needs the token
            if task.is_terminal:
                return task
            tasktoken = task.socketaccesstoken
        watch = _Watch(tasktoken, on_event)
        events = self.events(tasktoken, timeout=max(0.0, deadline - time.monotonic()))
        # closing(): if on_event raises, the socket is closed now rather than when the generator is collected.
        with closing(_until_failure(events)) as quiet:
            for event in quiet:
                watch.seen(event)
        return self._poll(tasktoken, deadline, poll, watch)

    def _poll(self, tasktoken: str, deadline: float, poll: Sequence[float], watch: _Watch) -> Task:
        steps = list(poll) or list(POLL_STEPS)
        attempt = 0
        while True:
            delay = steps[min(attempt, len(steps) - 1)]
            attempt += 1
            try:
                task = self.detail(tasktoken=tasktoken)
                watch.polled(task)
                if task.is_terminal:
                    return task
            except RateLimited as exc:
                delay = max(delay, float(exc.retry_after))
            except TransportError:
                pass  # a restarting server or a flaky network: keep trying until the deadline
            time.sleep(_pause(delay, deadline, tasktoken, watch))

    def download(self, output: OutputRef, dest_dir: str | os.PathLike[str], *, filename: str | None = None) -> Path:
        """Save one output (an item of ``Task.outputs`` or its URL) in ``dest_dir``; returns the file's path.

        Output URLs need no credentials and none are sent (they may redirect to a storage bucket).
        """
        url, path = _download_target(output, dest_dir, filename)
        partial = path.with_name(f".{path.name}.part")
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if _maybe_error(response):
                    response.read()
                    _raise_download_error(response, url)
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            partial.replace(path)  # never leave a truncated image under the real name
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return path


class AsyncClient(_BaseClient):
    """Asynchronous client, the same API as ``Client`` with ``await`` (``events`` is an async iterator)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        socket_url: str | None = None,
    ) -> None:
        super().__init__(base_url, api_key, api_secret, socket_url)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc

    async def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._parse(await self._send("POST", self._url(path), headers=self._headers(), **kwargs))

    async def run(
        self,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        images: Sequence[ImageInput] = (),
        size: str | None = None,
        max_images: int = 1,
        watermark: bool = False,
        callback_url: str | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> RunResult:
        """Queue a task. Not retried on failure: a repeated Run would queue (and bill) a second task."""
        url, kwargs = self._run_request(
            prompt,
            model=model,
            images=images,
            size=size,
            max_images=max_images,
            watermark=watermark,
            callback_url=callback_url,
            seed=seed,
            extra=extra,
        )
        return self._run_result(self._parse(await self._send("POST", url, headers=self._headers(), **kwargs)))

    async def detail(self, taskid: str | int | None = None, tasktoken: str | None = None) -> Task:
        task = self._task(await self._post("/v1/Task/Detail", json=self._task_key(taskid, tasktoken)))
        if task is None:
            raise NotFound("There is no task yet: Task/Detail answered an empty tasklist.")
        return task

    async def cancel(self, taskid: str | int) -> Task:
        body = await self._post("/v1/Task/Cancel", json={"taskid": str(taskid)})
        return self._task(body) or await self.detail(taskid)

    async def kill(self, taskid: str | int) -> Task:
        body = await self._post("/v1/Task/Kill", json={"taskid": str(taskid)})
        return self._task(body) or await self.detail(taskid)

    async def upload(self, image: str | os.PathLike[str] | bytes, *, folderid: str | None = None) -> dict[str, Any]:
        data = {"folderid": folderid} if folderid else None
        body = await self._post("/v1/File/Upload", data=data, files=[("file", _file_part(image, 0))])
        return dict((body.get("list") or [{}])[0])

    async def events(self, tasktoken: str, *, timeout: float | None = None) -> AsyncGenerator[Event, None]:
        """As ``Client.events``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with async_connect(self.socket_url, **self._connect_kwargs()) as socket:
            await socket.send(self._register(tasktoken))
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"No terminal event for the task within {timeout} s.")
                event = self._event(await asyncio.wait_for(socket.recv(), left))
                if event is None:
                    continue
                yield event
                if event.is_terminal:
                    return

    async def wait(
        self,
        taskid: str | int | None = None,
        tasktoken: str | None = None,
        *,
        timeout: float = DEFAULT_WAIT,
        poll: Sequence[float] = POLL_STEPS,
        on_event: EventHandler | None = None,
    ) -> Task:
        """As ``Client.wait``."""
        deadline = time.monotonic() + timeout
        if not tasktoken:
            task = await self.detail(taskid=taskid)
            if task.is_terminal:
                return task
            tasktoken = task.socketaccesstoken
        watch = _Watch(tasktoken, on_event)
        events = self.events(tasktoken, timeout=max(0.0, deadline - time.monotonic()))
        async with aclosing(_until_failure_async(events)) as quiet:
            async for event in quiet:
                watch.seen(event)
        return await self._poll(tasktoken, deadline, poll, watch)

    async def _poll(self, tasktoken: str, deadline: float, poll: Sequence[float], watch: _Watch) -> Task:
        steps = list(poll) or list(POLL_STEPS)
        attempt = 0
        while True:
            delay = steps[min(attempt, len(steps) - 1)]
            attempt += 1
            try:
                task = await self.detail(tasktoken=tasktoken)
                watch.polled(task)
                if task.is_terminal:
                    return task
            except RateLimited as exc:
                delay = max(delay, float(exc.retry_after))
            except TransportError:
                pass
            await asyncio.sleep(_pause(delay, deadline, tasktoken, watch))

    async def download(
        self, output: OutputRef, dest_dir: str | os.PathLike[str], *, filename: str | None = None
    ) -> Path:
        """As ``Client.download``."""
        url, path = _download_target(output, dest_dir, filename)
        partial = path.with_name(f".{path.name}.part")
        try:
            async with self._http.stream("GET", url, follow_redirects=True) as response:
                if _maybe_error(response):
                    await response.aread()
                    _raise_download_error(response, url)
                with partial.open("wb") as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
            partial.replace(path)
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return path


# -- helpers -----------------------------------------------------------------------------------------


def _until_failure(events: Generator[Event, None, None]) -> Generator[Event, None, None]:
    """The socket's events until it fails. A failure ends the stream quietly: the socket is a convenience,
    Task/Detail is the record. Errors raised by the consumer (``on_event``) are not swallowed."""
    try:
        yield from events
    except _SOCKET_ERRORS:
        return


async def _until_failure_async(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except _SOCKET_ERRORS:
            return


def _is_url(image: ImageInput) -> bool:
    return isinstance(image, str) and image.startswith(("http://", "https://"))


def _to_ws(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url.removeprefix("https://")
    return "ws://" + url.removeprefix("http://")


def _form_value(value: Any) -> str:
    """Multipart fields are strings: booleans as Wiro's "true"/"false", containers as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number == number and abs(number) != float("inf") else None


def _decode_message(message: Any) -> Any:
    """Progress objects and output lists sometimes arrive JSON-encoded inside a string (WiroKit parses them)."""
    if isinstance(message, str) and message.lstrip().startswith(("{", "[")):
        try:
            return json.loads(message)
        except ValueError:
            return message
    return message


def _sniff(data: bytes) -> tuple[str, str]:
    """(extension, content type) from magic bytes; servers check the content, not the name."""
    if data.startswith(b"\x89PNG"):
        return "png", "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg", "image/jpeg"
    if data.startswith(b"GIF8"):
        return "gif", "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return "bin", "application/octet-stream"


def _file_part(image: ImageInput, number: int) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        ext, content_type = _sniff(image)
        return f"image-{number}.{ext}", image, content_type
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"Cannot read input image {str(path)!r}: {exc.strerror or exc}.") from exc
    guessed = mimetypes.guess_type(path.name)[0]
    return path.name, data, guessed if guessed and guessed.startswith("image/") else _sniff(data)[1]


def _error_from(body: Mapping[str, Any], response: httpx.Response) -> DreamError:
    """Wiro's ``{"result": false, "errors": [{"code", "message"}]}`` as the matching error class."""
    status = response.status_code
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else {}
    if not isinstance(first, dict):
        first = {"message": str(first)}
    message = str(first.get("message") or body.get("message") or f"HTTP {status} with result: false")
    code = _int(first.get("code")) or 0
    typed = _typed_error(first, message, response)
    if typed is not None:
        return typed
    # A server that sends no ``type`` (Wiro itself): tell the classes apart by status, code and wording.
    lowered = message.lower()
    if status in (401, 403) or code == 99 or lowered.startswith(("project authorization", "project requires sign")):
        return AuthError(message)
    if status == 429 or code == 96:
        return RateLimited(message, _retry_after(response.headers.get("retry-after")))
    if code == 1:
        # Wiro uses code 1 for both "not found" and "wrong state"; the message tells them apart.
        wrong_state = ("state", "could not be killed", "already finished", "must be completed")
        return InvalidState(message) if any(w in lowered for w in wrong_state) else NotFound(message)
    if status == 404:
        return RouteNotFound(message)
    if status >= 500:
        return TransportError(message, status)
    return InvalidRequest(message)


def _typed_error(item: Mapping[str, Any], message: str, response: httpx.Response) -> DreamError | None:
    """dreamserve's items name their class in ``type`` (and the field at fault in ``param``)."""
    cls = error_class(str(item.get("type") or ""))
    if cls is None:
        return None
    if issubclass(cls, RateLimited):
        return cls(message, _retry_after(response.headers.get("retry-after")))
    if issubclass(cls, InvalidRequest):
        param = item.get("param")
        return cls(message, param=str(param) if param else None)
    if issubclass(cls, HTTPProtocolError):
        return HTTPProtocolError(message, response.status_code)
    if cls.http_status >= 500 and not issubclass(cls, TaskFailed):
        return TransportError(message, response.status_code)
    return cls(message)


def _retry_after(value: str | None) -> int:
    try:
        return max(1, int(float(value or "")))
    except ValueError:
        return 1  # absent, or an HTTP date: retry soon rather than parse calendars


def _download_target(output: OutputRef, dest_dir: str | os.PathLike[str], filename: str | None) -> tuple[str, Path]:
    url = output if isinstance(output, str) else str(output.get("url") or "")
    if not url:
        raise InvalidRequest("This output has no url to download.")
    name = filename or (None if isinstance(output, str) else output.get("name")) or unquote(urlsplit(url).path)
    # Only the last component: a server-sent name must not write outside dest_dir.
    safe = Path(str(name).replace("\\", "/")).name.lstrip(".") or "output"
    folder = Path(dest_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return url, folder / safe


def _maybe_error(response: httpx.Response) -> bool:
    # Wiro-style servers answer a missing file with HTTP 200 and a result:false envelope.
    return not response.is_success or response.headers.get("content-type", "").startswith("application/json")


def _raise_download_error(response: httpx.Response, url: str) -> None:
    """Raise for an error answer to a download; return for a successful one that happens to be JSON."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("result") is False:
        raise _error_from(body, response)
    if not response.is_success:
        raise TransportError(f"GET {url} answered HTTP {response.status_code}.", response.status_code)


def _pause(delay: float, deadline: float, tasktoken: str, watch: _Watch) -> float:
    """How long to sleep before the next poll; raises ``TimeoutError`` once the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"Task {tasktoken} has not finished within the wait timeout (last: {watch.status}).")
    return min(delay, left)
