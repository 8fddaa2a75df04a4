"""Both clients, written once: every call is a *flow*, a generator that yields the I/O it needs (``Send`` an HTTP
request, ``Sleep``, ``Follow`` the task's socket, ``Save`` a download) and gets its outcome back. ``sync.Client``
and ``aio.AsyncClient`` are the two faces that perform those operations, blocking or awaited, the way httpx keeps
one request model over two transports; neither holds any logic of its own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Concatenate, Generic, ParamSpec, TypeVar

import httpx
from websockets.exceptions import WebSocketException

from dreamserve import __version__
from dreamserve.client.errors import TransportError, error_from
from dreamserve.client.files import download_target, file_part, form_value, is_url
from dreamserve.client.records import Event, EventHandler, ImageInput, OutputRef, RunResult, Task, decode_message
from dreamserve.errors import DreamError, NotFound, RateLimited
from dreamserve.signing import auth_headers
from dreamserve.status import Frame

DEFAULT_MODEL = "bytedance/seedream-v4"
#: Run uploads up to 14 images and a busy server may take a while to answer: generous reads, quick connects.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: How long ``wait`` follows a task by default (queue time included).
DEFAULT_WAIT = 3600.0
#: Polling backoff when the socket is unavailable (Wiro's MCP client uses the same steps).
POLL_STEPS: tuple[float, ...] = (2.0, 5.0, 10.0)
#: Frames may carry preview images; WiroKit allows 8 MiB too.
MAX_FRAME_BYTES = 8 * 1024 * 1024

# What a failing socket can raise; ``wait`` then falls back to polling Task/Detail.
SOCKET_ERRORS = (OSError, WebSocketException, DreamError)

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Send:
    """Send an HTTP request (``options`` are httpx's keyword arguments); the flow gets the ``httpx.Response``, or
    the ``TransportError`` that stood in its place (``sent``): a poll retries it, any other call raises it."""

    method: str
    url: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Follow:
    """Follow the task's socket for up to ``timeout`` seconds, reporting every event to ``watch``, until its
    terminal event; a socket that fails ends quietly (Task/Detail is the record), ``on_event``'s errors do not."""

    tasktoken: str
    timeout: float
    watch: Watch


@dataclass(frozen=True)
class Save:
    """Stream ``url`` (sent without credentials: output URLs are capabilities) into the file ``path``."""

    url: str
    path: Path


Operation = Send | Sleep | Follow | Save
#: A call written once: the operations it needs, one at a time, then its result.
Flow = Generator[Operation, Any, T]


@dataclass(frozen=True)
class Finished(Generic[T]):
    value: T


def resume(flow: Flow[T], reply: Any = None) -> Operation | Finished[T]:
    """Give the flow the outcome of its last operation; its next operation, or its result. An operation that
    raises ends the call with its error: only a ``Send``'s failure is an outcome the flow sees (``sent``)."""
    try:
        return flow.send(reply)
    except StopIteration as stop:
        return Finished(stop.value)


def blocking(flow: Callable[Concatenate[Any, P], Flow[T]]) -> Callable[Concatenate[Any, P], T]:
    """A flow as a method of the synchronous face."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._drive(flow(self, *args, **kwargs))
        return result

    return named_after(method, flow)


def awaiting(flow: Callable[Concatenate[Any, P], Flow[T]]) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """A flow as a coroutine method of the asyncio face."""

    async def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = await self._drive(flow(self, *args, **kwargs))
        return result

    return named_after(method, flow)


F = TypeVar("F", bound=Callable[..., Any])


def named_after(method: F, flow: Callable[..., Any]) -> F:
    """``method`` with the flow's docstring, its public name and its signature, returning what the flow returns
    (``help()`` and IDEs show ``-> Task``, not the generator)."""
    functools.update_wrapper(method, flow)
    del method.__wrapped__  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = flow.__name__.removeprefix("_")
    signature = inspect.signature(flow)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Flow[") and returns.endswith("]"):
        returns = returns.removeprefix("Flow[").removesuffix("]")
    method.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
    return method


def transport_error(method: str, url: str, exc: httpx.HTTPError) -> TransportError:
    """httpx's failure (refused, reset, timed out) as a ``TransportError`` naming the request."""
    error = TransportError(f"{method} {url} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def transport_errors(method: str, url: str) -> Iterator[None]:
    """httpx's failures within the block raised as ``TransportError``."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise transport_error(method, url, exc) from exc


def sent(reply: httpx.Response | TransportError) -> httpx.Response:
    """A ``Send``'s outcome in the flow: the response, or its failure raised here, where a poll can retry it."""
    if isinstance(reply, TransportError):
        raise reply
    return reply


class EventReader:
    """The socket's frames as the task's events until a terminal one, within ``timeout`` seconds: what both
    faces' ``events`` do between receiving frames."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.done = False

    def left(self) -> float | None:
        """How long to wait for the next frame; raises ``TimeoutError`` once the deadline has passed."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"No terminal event for the task within {self.timeout} s.")
        return left

    def read(self, raw: str | bytes) -> Event | None:
        """The frame as an event (``None`` for one that is not, see ``BaseClient._event``)."""
        event = BaseClient._event(raw)
        self.done = event is not None and event.is_terminal
        return event


@contextlib.contextmanager
def saving(url: str, path: Path) -> Iterator[IO[bytes]]:
    """A file to write a download into: it takes the real name only once complete, never left half-written."""
    partial = path.with_name(f".{path.name}.part")
    try:
        with transport_errors("GET", url), partial.open("wb") as handle:
            yield handle
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


#: A face's httpx client and the transports it takes (``httpx.MockTransport`` in tests is either).
Http = TypeVar("Http", httpx.Client, httpx.AsyncClient)
Transport = TypeVar("Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)


class BaseClient(Generic[Http, Transport]):
    """Everything but I/O: request shapes, envelope parsing, frame parsing. Shared by both clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: Transport | None = None,
        socket_url: str | None = None,
    ) -> None:
        self._http: Http = self._open(timeout, transport)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret
        # Wiro's socket is on another host (wss://socket.wiro.ai/v1); ours is the API host's /v1.
        self.socket_url = socket_url or to_ws(self.base_url) + "/v1"
        self._last_nonce = 0
        self._nonce_lock = threading.Lock()

    def _open(self, timeout: httpx.Timeout | float, transport: Transport | None) -> Http:
        """The face's httpx client."""
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        # Milliseconds, strictly increasing: a server that accepts each nonce once (unique_nonces)
        # must not see two equal ones when requests leave within the same second, or concurrently.
        with self._nonce_lock:
            self._last_nonce = max(time.time_ns() // 1_000_000, self._last_nonce + 1)
            nonce = str(self._last_nonce)
        return {"user-agent": f"dreamserve-python/{__version__}", **auth_headers(self.api_key, self.api_secret, nonce)}

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

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
        raise error_from(body, response)

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
            message=decode_message(frame.get("message")),
            result=frame.get("result") is not False,
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "open_timeout": 10,
            "max_size": MAX_FRAME_BYTES,
            "user_agent_header": f"dreamserve-python/{__version__}",
        }

    # -- the calls, each written once as a flow (the faces expose them as ``run``, ``detail``, ...) ----------------

    def _post(self, path: str, **options: Any) -> Flow[dict[str, Any]]:
        response = yield Send("POST", self._url(path), {"headers": self._headers(), **options})
        return self._parse(sent(response))

    def _run(
        self,
        /,
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
    ) -> Flow[RunResult]:
        """Queue a task. Not retried on failure: a repeated Run would queue (and bill) a second task."""
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
        response = yield Send("POST", url, {"headers": self._headers(), **run_body(fields, images)})
        return self._run_result(self._parse(sent(response)))

    def _detail(self, taskid: str | int | None = None, tasktoken: str | None = None) -> Flow[Task]:
        task = self._task((yield from self._post("/v1/Task/Detail", json=self._task_key(taskid, tasktoken))))
        if task is None:
            raise NotFound("There is no task yet: Task/Detail answered an empty tasklist.")
        return task

    def _cancel(self, taskid: str | int) -> Flow[Task]:
        """Cancel a queued task (dreamserve also stops a running one at its next step)."""
        body = yield from self._post("/v1/Task/Cancel", json={"taskid": str(taskid)})
        return self._task(body) or (yield from self._detail(taskid))  # Wiro's clients only rely on `result`

    def _kill(self, taskid: str | int) -> Flow[Task]:
        """Stop a running task at once."""
        body = yield from self._post("/v1/Task/Kill", json={"taskid": str(taskid)})
        return self._task(body) or (yield from self._detail(taskid))

    def _upload(self, image: str | os.PathLike[str] | bytes, *, folderid: str | None = None) -> Flow[dict[str, Any]]:
        """Upload a file with File/Upload; the returned item's ``url`` can be passed to ``run(images=...)``."""
        data = {"folderid": folderid} if folderid else None
        body = yield from self._post("/v1/File/Upload", data=data, files=[("file", file_part(image, 0))])
        return dict((body.get("list") or [{}])[0])

    def _wait(
        self,
        taskid: str | int | None = None,
        tasktoken: str | None = None,
        *,
        timeout: float = DEFAULT_WAIT,
        poll: Sequence[float] = POLL_STEPS,
        on_event: EventHandler | None = None,
    ) -> Flow[Task]:
        """Follow the task to its end and return the final Task (check ``succeeded``).

        Uses the socket; if it fails, polls Task/Detail with the ``poll`` backoff (2 s, 5 s, then 10 s).
        ``on_event`` sees every event; while polling, it sees status changes as events.
        Raises ``TimeoutError`` when the task is still running after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        if not tasktoken:
            task = yield from self._detail(taskid=taskid)  # the socket needs the token
            if task.is_terminal:
                return task
            tasktoken = task.socketaccesstoken
        watch = Watch(tasktoken, on_event)
        yield Follow(tasktoken, max(0.0, deadline - time.monotonic()), watch)
        return (yield from self._poll(tasktoken, deadline, poll, watch))

    def _poll(self, tasktoken: str, deadline: float, poll: Sequence[float], watch: Watch) -> Flow[Task]:
        steps = list(poll) or list(POLL_STEPS)
        attempt = 0
        while True:
            delay = steps[min(attempt, len(steps) - 1)]
            attempt += 1
            try:
                task = yield from self._detail(tasktoken=tasktoken)
                watch.polled(task)
                if task.is_terminal:
                    return task
            except RateLimited as exc:
                delay = max(delay, float(exc.retry_after))
            except TransportError:
                pass  # a restarting server or a flaky network: keep trying until the deadline
            yield Sleep(pause(delay, deadline, tasktoken, watch))

    def _download(
        self, output: OutputRef, dest_dir: str | os.PathLike[str], *, filename: str | None = None
    ) -> Flow[Path]:
        """Save one output (an item of ``Task.outputs`` or its URL) in ``dest_dir``; returns the file's path.

        Output URLs need no credentials and none are sent (they may redirect to a storage bucket).
        """
        url, path = download_target(output, dest_dir, filename)
        yield Save(url, path)
        return path


class Watch:
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
            self.seen(Event(Frame.OUTPUT, task.id, self.tasktoken, decode_message(progress)))


def run_body(fields: dict[str, Any], images: Sequence[ImageInput]) -> dict[str, Any]:
    """The httpx keyword arguments that carry a Run's fields and reference images."""
    if all(is_url(image) for image in images):
        return {"json": {**fields, **({"inputImage": [str(i) for i in images]} if images else {})}}
    # Files and URLs go in one repeated multipart field (Wiro's combinefileinput), in the caller's
    # order: the order of references matters to the model. A (None, value) part is a plain field.
    parts: list[tuple[str, Any]] = [
        ("inputImage", (None, image) if is_url(image) else file_part(image, n)) for n, image in enumerate(images)
    ]
    return {"data": {k: form_value(v) for k, v in fields.items()}, "files": parts}


def to_ws(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url.removeprefix("https://")
    return "ws://" + url.removeprefix("http://")


def pause(delay: float, deadline: float, tasktoken: str, watch: Watch) -> float:
    """How long to sleep before the next poll; raises ``TimeoutError`` once the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"Task {tasktoken} has not finished within the wait timeout (last: {watch.status}).")
    return min(delay, left)
