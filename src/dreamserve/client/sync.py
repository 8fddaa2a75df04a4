"""``Client``: the synchronous face of the calls ``base.BaseClient`` writes once (httpx and websockets' sync API)."""

from __future__ import annotations

import time
from collections.abc import Generator
from contextlib import closing
from typing import Any

import httpx
from websockets.sync.client import connect as sync_connect

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
    blocking,
    resume,
    saving,
    transport_error,
)
from dreamserve.client.errors import maybe_error, raise_download_error
from dreamserve.client.records import Event


class Client(BaseClient[httpx.Client, httpx.BaseTransport]):
    """Synchronous client. ``transport=`` takes an ``httpx.MockTransport`` in tests."""

    def _open(self, timeout: httpx.Timeout | float, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    run = blocking(BaseClient._run)
    detail = blocking(BaseClient._detail)
    cancel = blocking(BaseClient._cancel)
    kill = blocking(BaseClient._kill)
    upload = blocking(BaseClient._upload)
    wait = blocking(BaseClient._wait)
    download = blocking(BaseClient._download)

    def events(self, tasktoken: str, *, timeout: float | None = None) -> Generator[Event, None, None]:
        """The task's events, earlier ones first, ending after a terminal one.

        Raises ``TimeoutError`` after ``timeout`` seconds, websockets/OS errors if the socket fails,
        and ``NotFound`` if the server does not know the token.
        """
        reader = EventReader(timeout)  # the deadline counts the connection too
        with sync_connect(self.socket_url, **self._connect_kwargs()) as socket:
            socket.send(self._register(tasktoken))
            while not reader.done:
                if (event := reader.read(socket.recv(timeout=reader.left()))) is not None:
                    yield event

    def _drive(self, flow: Flow[T]) -> T:
        step = resume(flow)
        while not isinstance(step, Finished):
            step = resume(flow, self._perform(step))
        return step.value

    def _perform(self, operation: Operation) -> Any:
        match operation:
            case Send(method, url, options):
                try:
                    return self._http.request(method, url, **options)
                except httpx.HTTPError as exc:
                    return transport_error(method, url, exc)
            case Sleep(seconds):
                time.sleep(seconds)
            case Follow(tasktoken, timeout, watch):
                # closing(): if on_event raises, the socket is closed now rather than when the generator is collected.
                with closing(_until_failure(self.events(tasktoken, timeout=timeout))) as quiet:
                    for event in quiet:
                        watch.seen(event)
            case Save(url, path):
                with self._http.stream("GET", url, follow_redirects=True) as response, saving(url, path) as handle:
                    if maybe_error(response):
                        response.read()
                        raise_download_error(response, url)
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
        return None


def _until_failure(events: Generator[Event, None, None]) -> Generator[Event, None, None]:
    """The socket's events until it fails. A failure ends the stream quietly: the socket is a convenience,
    Task/Detail is the record. Errors raised by the consumer (``on_event``) are not swallowed."""
    try:
        yield from events
    except SOCKET_ERRORS:
        return
