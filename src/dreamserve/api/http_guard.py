"""uvicorn's HTTP protocol with a request-head timeout and a connection cap of its own.

uvicorn never times out an unfinished request head, and counts every open connection against
``limit_concurrency``: a few thousand connections that send half a request line and then nothing hold their
descriptors forever and turn every other request into a 503. This protocol closes a connection whose head has not
arrived within ``http_header_timeout_seconds``; past the cap, a new connection closes the oldest one still waiting
for its head (or, when every connection is busy with a request, is itself closed at once). The server's
descriptors are never exhausted and a good request is served in the middle of a flood, without a reverse proxy.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Descriptors kept back from the connection cap for the database, the model pipe, logs and files.
FD_RESERVE = 128


def connection_cap(wanted: int) -> int:
    """``wanted``, bounded by the process's open-file limit less the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


class GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol that times out request heads and caps its connections (class attributes set by
    :func:`guarded_protocol`)."""

    header_timeout: float = 10.0
    write_stall: float = 60.0
    max_connections: int = 1024
    #: Connections waiting for a request head, oldest first (a dict keeps insertion order): the ones to evict.
    waiting: dict[GuardedHttpTools, None] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            if not self.waiting:
                transport.abort()  # every connection is busy with a request: refuse this one at once
                return
            next(iter(self.waiting))._head_timed_out()  # the oldest idle or half-open one makes room
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self.resume_writing()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # a request after a pipelined one: its head is timed too
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_head_timer()  # idle keep-alive: evictable, and its next head is timed from now

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def pause_writing(self) -> None:
        """The client stopped reading (the write buffer is full): if it reads nothing more for ``write_stall``
        seconds, abort, which drops the buffer and ends the response (a stream's ``http.disconnect``), freeing
        what it holds (an Ark stream's synchronous slot)."""
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.write_stall, self.transport.abort)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        self.waiting[self] = None

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self.transport.abort()


def guarded_protocol(header_timeout: float, max_connections: int, write_stall: float) -> type[GuardedHttpTools]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    attrs = {
        "waiting": {},
        "header_timeout": header_timeout,
        "write_stall": write_stall,
        "max_connections": connection_cap(max_connections),
    }
    return type("GuardedHttp", (GuardedHttpTools,), attrs)
