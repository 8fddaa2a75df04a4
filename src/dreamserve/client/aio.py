"""``AsyncClient``: the asyncio client, method for method as ``Client``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect as async_connect

from dreamserve.client.base import (
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    DEFAULT_WAIT,
    POLL_STEPS,
    SOCKET_ERRORS,
    BaseClient,
    Watch,
    pause,
)
from dreamserve.client.errors import TransportError, maybe_error, raise_download_error
from dreamserve.client.files import download_target, file_part
from dreamserve.client.records import Event, EventHandler, ImageInput, OutputRef, RunResult, Task
from dreamserve.errors import NotFound, RateLimited


class AsyncClient(BaseClient):
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
        body = await self._post("/v1/File/Upload", data=data, files=[("file", file_part(image, 0))])
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
        watch = Watch(tasktoken, on_event)
        events = self.events(tasktoken, timeout=max(0.0, deadline - time.monotonic()))
        async with aclosing(_until_failure_async(events)) as quiet:
            async for event in quiet:
                watch.seen(event)
        return await self._poll(tasktoken, deadline, poll, watch)

    async def _poll(self, tasktoken: str, deadline: float, poll: Sequence[float], watch: Watch) -> Task:
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
            await asyncio.sleep(pause(delay, deadline, tasktoken, watch))

    async def download(
        self, output: OutputRef, dest_dir: str | os.PathLike[str], *, filename: str | None = None
    ) -> Path:
        """As ``Client.download``."""
        url, path = download_target(output, dest_dir, filename)
        partial = path.with_name(f".{path.name}.part")
        try:
            async with self._http.stream("GET", url, follow_redirects=True) as response:
                if maybe_error(response):
                    await response.aread()
                    raise_download_error(response, url)
                with partial.open("wb") as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
            partial.replace(path)
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return path


async def _until_failure_async(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except SOCKET_ERRORS:
            return
