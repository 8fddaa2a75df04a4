"""``Client``: the synchronous client (httpx and websockets' sync API)."""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect as sync_connect

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


class Client(BaseClient):
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
        body = self._post("/v1/File/Upload", data=data, files=[("file", file_part(image, 0))])
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
        watch = Watch(tasktoken, on_event)
        events = self.events(tasktoken, timeout=max(0.0, deadline - time.monotonic()))
        # closing(): if on_event raises, the socket is closed now rather than when the generator is collected.
        with closing(_until_failure(events)) as quiet:
            for event in quiet:
                watch.seen(event)
        return self._poll(tasktoken, deadline, poll, watch)

    def _poll(self, tasktoken: str, deadline: float, poll: Sequence[float], watch: Watch) -> Task:
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
            time.sleep(pause(delay, deadline, tasktoken, watch))

    def download(self, output: OutputRef, dest_dir: str | os.PathLike[str], *, filename: str | None = None) -> Path:
        """Save one output (an item of ``Task.outputs`` or its URL) in ``dest_dir``; returns the file's path.

        Output URLs need no credentials and none are sent (they may redirect to a storage bucket).
        """
        url, path = download_target(output, dest_dir, filename)
        partial = path.with_name(f".{path.name}.part")
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if maybe_error(response):
                    response.read()
                    raise_download_error(response, url)
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            partial.replace(path)  # never leave a truncated image under the real name
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return path


def _until_failure(events: Generator[Event, None, None]) -> Generator[Event, None, None]:
    """The socket's events until it fails. A failure ends the stream quietly: the socket is a convenience,
    Task/Detail is the record. Errors raised by the consumer (``on_event``) are not swallowed."""
    try:
        yield from events
    except SOCKET_ERRORS:
        return
