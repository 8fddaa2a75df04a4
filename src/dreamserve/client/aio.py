"""``AsyncClient``: the asyncio face of the calls ``base.BaseClient`` writes once, method for method as ``Client``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import httpx
from websockets.asyncio.client import connect as async_connect

from dreamserve.client.base import (
    SOCKET_ERRORS,
    BaseClient,
    EventReader,
    Finished,
    Flow,
    Follow,
    Operation,
    Save,
    Send,
    Sleep,
    T,
    awaiting,
    resume,
    saving,
    transport_error,
)
from dreamserve.client.errors import maybe_error, raise_download_error
from dreamserve.client.records import Event


class AsyncClient(BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """Asynchronous client, the same API as ``Client`` with ``await`` (``events`` is an async iterator)."""

    def _open(self, timeout: httpx.Timeout | float, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    run = awaiting(BaseClient._run)
    detail = awaiting(BaseClient._detail)
    cancel = awaiting(BaseClient._cancel)
    kill = awaiting(BaseClient._kill)
    upload = awaiting(BaseClient._upload)
    wait = awaiting(BaseClient._wait)
    download = awaiting(BaseClient._download)

    async def events(self, tasktoken: str, *, timeout: float | None = None) -> AsyncGenerator[Event, None]:
        """As ``Client.events``."""
        reader = EventReader(timeout)  # the deadline counts the connection too
        async with async_connect(self.socket_url, **self._connect_kwargs()) as socket:
            await socket.send(self._register(tasktoken))
            while not reader.done:
                if (event := reader.read(await asyncio.wait_for(socket.recv(), reader.left()))) is not None:
                    yield event

    async def _drive(self, flow: Flow[T]) -> T:
        step = resume(flow)
        while not isinstance(step, Finished):
            step = resume(flow, await self._perform(step))
        return step.value

    async def _perform(self, operation: Operation) -> Any:
        match operation:
            case Send(method, url, options):
                try:
                    return await self._http.request(method, url, **options)
                except httpx.HTTPError as exc:
                    return transport_error(method, url, exc)
            case Sleep(seconds):
                await asyncio.sleep(seconds)
            case Follow(tasktoken, timeout, watch):
                async with aclosing(_until_failure(self.events(tasktoken, timeout=timeout))) as quiet:
                    async for event in quiet:
                        watch.seen(event)
            case Save(url, path):
                async with self._http.stream("GET", url, follow_redirects=True) as response:
                    with saving(url, path) as handle:
                        if maybe_error(response):
                            await response.aread()
                            raise_download_error(response, url)
                        async for chunk in response.aiter_bytes():
                            handle.write(chunk)
        return None


async def _until_failure(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except SOCKET_ERRORS:
            return
