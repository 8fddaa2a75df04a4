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

from dreamserve.client.aio import AsyncClient
from dreamserve.client.base import DEFAULT_MODEL, DEFAULT_TIMEOUT, DEFAULT_WAIT, POLL_STEPS
from dreamserve.client.errors import TransportError
from dreamserve.client.records import Event, EventHandler, ImageInput, OutputRef, Progress, RunResult, Task
from dreamserve.client.sync import Client

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT",
    "POLL_STEPS",
    "AsyncClient",
    "Client",
    "Event",
    "EventHandler",
    "ImageInput",
    "OutputRef",
    "Progress",
    "RunResult",
    "Task",
    "TransportError",
]
