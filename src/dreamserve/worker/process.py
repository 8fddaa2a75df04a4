"""The model process as its supervisor holds it: spawned, its pipe read by a thread into an asyncio queue,
killed or closed. Whether a worker id's process still lives (``worker_alive``) is read here too.

``serve`` spawns the model processes first of all (``prestart``), so that they load the model while the API
imports its modules, migrates the database and starts; each supervisor takes its own (``adopt``) when it would
spawn one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import threading
from multiprocessing.connection import Connection

from dreamserve.logs import Log, replay
from dreamserve.settings import ModelSpec
from dreamserve.worker.child import child_main
from dreamserve.worker.protocol import Exit, FromChild, Gone, ToChild

log = logging.getLogger(__name__)

#: Model processes spawned by ``prestart``, by worker (``slug:index``), until their supervisor adopts them.
_prestarted: dict[str, ChildProcess] = {}


def worker_alive(worker_id: str) -> bool | None:
    """Whether the process behind a worker id lives: known only for workers of this host."""
    host, _, rest = worker_id.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChildProcess:
    """One spawned model process, and a thread turning its pipe into an asyncio queue (``messages``; a ``Gone``
    when the pipe closes). Its ``Log`` records are replayed into this process's log as they come."""

    def __init__(self, spec: ModelSpec, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.spec = spec
        self.conn, self._child_conn = context.Pipe()
        self.stop_event = context.Event()
        self.process = context.Process(
            target=child_main,
            args=(self._child_conn, self.stop_event, spec, log.getEffectiveLevel()),
            name=name,
            daemon=True,
        )
        self.messages: asyncio.Queue[FromChild] = asyncio.Queue()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def spawn(self) -> None:
        """Start the process (it loads the model); nothing reads its pipe until ``start``."""
        self.process.start()
        self._child_conn.close()

    async def start(self) -> None:
        if self.process.pid is None:
            await asyncio.to_thread(self.spawn)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop, self.conn), daemon=True).start()

    def _read(self, loop: asyncio.AbstractEventLoop, conn: Connection) -> None:
        while True:
            try:
                message: FromChild = conn.recv()
            except (EOFError, OSError):
                message = Gone()
            if isinstance(message, Log):
                replay(message)  # the child's logging, into this process's log
                continue
            try:
                loop.call_soon_threadsafe(self.messages.put_nowait, message)
            except RuntimeError:
                return  # the supervisor's loop has closed (the server stopped): nobody reads any more
            if isinstance(message, Gone):
                return

    def send(self, message: ToChild) -> None:
        self.conn.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(Exit())
        await asyncio.to_thread(self.process.join, timeout)
        self.kill()
        await asyncio.to_thread(self.process.join, timeout)
        self.conn.close()


def child_name(slug: str) -> str:
    """The model process's name (``ps``, logs)."""
    return f"dreamserve-model-{slug}"


def worker_key(slug: str, index: int) -> str:
    """A worker among its model's on this host (``slug:index``): what ``prestart`` and ``adopt`` match on."""
    return f"{slug}:{index}"


def prestart(spec: ModelSpec, slug: str, index: int) -> ChildProcess:
    """Spawn the model process of worker ``index`` of ``slug`` now, before its supervisor exists (``serve``, at its
    start)."""
    child = ChildProcess(spec, child_name(slug))
    child.spawn()
    _prestarted[worker_key(slug, index)] = child
    return child


def adopt(spec: ModelSpec, worker: str) -> ChildProcess | None:
    """The process ``prestart`` spawned for ``worker``, once, if it loads this very spec and still lives."""
    child = _prestarted.pop(worker, None)
    if child is None:
        return None
    if child.spec == spec and child.process.is_alive():
        return child
    child.kill()  # settings changed since (a test's) or it died: a fresh spawn says why
    return None
