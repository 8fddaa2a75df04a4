"""The Python SDK: ``Client`` and ``AsyncClient`` for dreamserve or any Wiro-compatible server.

Usage::

    with Client("http://127.0.0.1:8000", api_key, api_secret) as client:
        run = client.run("a red fox in the snow", images=["ref.png"], size="2K", max_images=2)
        task = client.wait(run.socketaccesstoken)
        paths = [client.download(output, "out/") for output in task.outputs]

Only httpx, websockets and the stdlib: the client never imports server code.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as sync_connect

from dreamserve.errors import AuthError, DreamError, InvalidRequest, InvalidState, NotFound, RateLimited
from dreamserve.signing import auth_headers

DEFAULT_MODEL = "bytedance/seedream-v4"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
TERMINAL = frozenset({"task_postprocess_end", "task_cancel"})
#: Polling backoff when the socket is unavailable (Wiro's MCP client uses the same steps).
POLL_STEPS = (2.0, 5.0, 10.0)

ImageInput = str | Path | bytes


class TransportError(DreamError):
    """The server answered with something that is not Wiro's envelope (a proxy error page, say)."""


@dataclass(frozen=True)
class RunResult:
    taskid: str
    socketaccesstoken: str


@dataclass(frozen=True)
class Task:
    """A Wiro task object, kept as the server sent it, with a few readable accessors."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def pexit(self) -> str:
        return str(self.data.get("pexit", ""))

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return list(self.data.get("outputs") or [])

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL or self.status == "task_error"

    @property
    def succeeded(self) -> bool:
        return self.status == "task_postprocess_end" and self.pexit == "0"


@dataclass(frozen=True)
class Event:
    """One socket frame. ``progress`` is the progress object of ``task_output`` frames, if any."""

    type: str
    taskid: str
    message: Any

    @property
    def progress(self) -> dict[str, Any] | None:
        message = self.message
        if isinstance(message, str) and message.startswith("{"):
            try:
                message = json.loads(message)  # some servers send the object JSON-encoded
            except json.JSONDecodeError:
                return None
        return message if self.type == "task_output" and isinstance(message, dict) else None

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL


class _BaseClient:
    def __init__(self, base_url: str, api_key: str, api_secret: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret

    @property
    def socket_url(self) -> str:
        return self.base_url.replace("https://", "wss://").replace("http://", "ws://") + "/v1"

    def _headers(self) -> dict[str, str]:
        return auth_headers(self.api_key, self.api_secret, str(time.time_ns() // 1_000_000))

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
        extra: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        fields: dict[str, Any] = {"prompt": prompt, "maxImages": str(max_images), "watermark": str(watermark).lower()}
        if size:
            fields["size"] = size
        if callback_url:
            fields["callbackUrl"] = callback_url
        if seed is not None:
            fields["seed"] = str(seed)
        fields.update({k: str(v) for k, v in extra.items()})
        urls = [str(i) for i in images if isinstance(i, str) and i.startswith(("http://", "https://"))]
        files = [_file_part(i, n) for n, i in enumerate(images) if not (isinstance(i, str) and i in urls)]
        url = f"{self.base_url}/v1/Run/{model}"
        if not files:
            return url, {"json": {**fields, **({"inputImage": urls} if urls else {})}}
        # Files and URLs share the repeated multipart field, as Wiro's combinefileinput expects.
        data: dict[str, Any] = {**fields, **({"inputImage": urls} if urls else {})}
        return url, {"data": data, "files": files}

    @staticmethod
    def _parse(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise TransportError(f"HTTP {response.status_code} from {response.url}: not a JSON answer.") from None
        if not isinstance(body, dict):
            raise TransportError(f"HTTP {response.status_code} from {response.url}: unexpected JSON.")
        if body.get("result") is True:
            return body
        errors = body.get("errors") or [{}]
        message = str(errors[0].get("message") or body.get("message") or f"HTTP {response.status_code}")
        code = errors[0].get("code", 0)
        if response.status_code == 401:
            raise AuthError(message)
        if response.status_code == 429 or code == 96:
            raise RateLimited(message, int(response.headers.get("retry-after", "1")))
        if code == 1:
            raise InvalidState(message) if "state" in message or "killed" in message else NotFound(message)
        if response.status_code >= 500:
            raise TransportError(message)
        raise InvalidRequest(message)

    @staticmethod
    def _task(body: dict[str, Any]) -> Task:
        tasks = body.get("tasklist") or []
        if not tasks:
            raise NotFound("The server returned no task.")
        return Task(tasks[0])

    @staticmethod
    def _task_key(taskid: str | None, tasktoken: str | None) -> dict[str, str]:
        if taskid:
            return {"taskid": str(taskid)}
        if tasktoken:
            return {"tasktoken": tasktoken}
        raise ValueError("give taskid or tasktoken")

    @staticmethod
    def _event(raw: str | bytes) -> Event:
        frame = json.loads(raw)
        return Event(type=str(frame.get("type", "")), taskid=str(frame.get("id", "")), message=frame.get("message"))

    @staticmethod
    def _register(tasktoken: str) -> str:
        return json.dumps({"type": "task_info", "tasktoken": tasktoken})


def _file_part(image: ImageInput, number: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, bytes):
        return "inputImage", (f"image-{number}.png", image, "application/octet-stream")
    path = Path(image)
    return "inputImage", (path.name, path.read_bytes(), "application/octet-stream")


def _output_url(output: dict[str, Any] | str) -> tuple[str, str]:
    url = output if isinstance(output, str) else str(output["url"])
    return url, url.rsplit("/", 1)[-1] or "output"


class Client(_BaseClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, api_secret)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._parse(self._http.post(f"{self.base_url}{path}", json=payload, headers=self._headers()))

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
        body = self._parse(self._http.post(url, headers=self._headers(), **kwargs))
        return RunResult(str(body["taskid"]), str(body["socketaccesstoken"]))

    def detail(self, taskid: str | None = None, tasktoken: str | None = None) -> Task:
        return self._task(self._post("/v1/Task/Detail", self._task_key(taskid, tasktoken)))

    def cancel(self, taskid: str) -> Task:
        return self._task(self._post("/v1/Task/Cancel", {"taskid": str(taskid)}))

    def kill(self, taskid: str) -> Task:
        return self._task(self._post("/v1/Task/Kill", {"taskid": str(taskid)}))

    def events(self, tasktoken: str, timeout: float = 3600) -> Iterator[Event]:
        """Every event of the task, earlier ones first, until a terminal one."""
        with sync_connect(self.socket_url, open_timeout=10) as socket:
            socket.send(self._register(tasktoken))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                event = self._event(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
                if event.type == "error":
                    raise NotFound(str(event.message))
                yield event
                if event.is_terminal:
                    return

    def wait(self, tasktoken: str, timeout: float = 3600) -> Task:
        """Follow the socket to the end, falling back to polling Detail if the socket fails."""
        try:
            for _ in self.events(tasktoken, timeout):
                pass
        except (OSError, TimeoutError, WebSocketException):
            return self._poll(tasktoken, timeout)
        return self.detail(tasktoken=tasktoken)

    def _poll(self, tasktoken: str, timeout: float) -> Task:
        deadline = time.monotonic() + timeout
        for attempt in range(1_000_000):
            task = self.detail(tasktoken=tasktoken)
            if task.is_terminal or time.monotonic() > deadline:
                return task
            time.sleep(POLL_STEPS[min(attempt, len(POLL_STEPS) - 1)])
        return task

    def download(self, output: dict[str, Any] | str, dest_dir: str | Path) -> Path:
        url, name = _output_url(output)
        response = self._http.get(url)
        response.raise_for_status()
        path = Path(dest_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path


class AsyncClient(_BaseClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, api_secret)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._parse(await self._http.post(f"{self.base_url}{path}", json=payload, headers=self._headers()))

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
        body = self._parse(await self._http.post(url, headers=self._headers(), **kwargs))
        return RunResult(str(body["taskid"]), str(body["socketaccesstoken"]))

    async def detail(self, taskid: str | None = None, tasktoken: str | None = None) -> Task:
        return self._task(await self._post("/v1/Task/Detail", self._task_key(taskid, tasktoken)))

    async def cancel(self, taskid: str) -> Task:
        return self._task(await self._post("/v1/Task/Cancel", {"taskid": str(taskid)}))

    async def kill(self, taskid: str) -> Task:
        return self._task(await self._post("/v1/Task/Kill", {"taskid": str(taskid)}))

    async def events(self, tasktoken: str) -> AsyncIterator[Event]:
        async with async_connect(self.socket_url, open_timeout=10) as socket:
            await socket.send(self._register(tasktoken))
            async for raw in socket:
                event = self._event(raw)
                if event.type == "error":
                    raise NotFound(str(event.message))
                yield event
                if event.is_terminal:
                    return

    async def wait(self, tasktoken: str) -> Task:
        async for _ in self.events(tasktoken):
            pass
        return await self.detail(tasktoken=tasktoken)

    async def download(self, output: dict[str, Any] | str, dest_dir: str | Path) -> Path:
        url, name = _output_url(output)
        response = await self._http.get(url)
        response.raise_for_status()
        path = Path(dest_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path
