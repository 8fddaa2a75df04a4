"""The running parts of one server process, built from ``Settings`` and shared by the API and workers.

``Services.start`` opens the database, starts one supervisor per configured model worker (when
``run_workers``), the lease reaper and the callback sender; ``close`` stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dreamserve.blobs import BlobStore, make_blob_store
from dreamserve.db import make_engine, make_sessionmaker
from dreamserve.events import TERMINAL, EventHub, Hub
from dreamserve.keyring import ServerKey, private_dir
from dreamserve.migrate import upgrade
from dreamserve.projects import seal_webhook_secrets
from dreamserve.settings import Settings
from dreamserve.store import TaskStore
from dreamserve.webhooks import deliver_due
from dreamserve.wire import task_object
from dreamserve.worker.supervisor import Supervisor, worker_alive

log = logging.getLogger(__name__)


def make_hub(settings: Settings) -> Hub:
    if settings.redis_url:
        from dreamserve.redis_events import RedisEventHub

        return RedisEventHub(settings.redis_url)
    return EventHub()


class Services:
    """``workers="poll"`` (embedded) runs supervisors that poll the tasks table; ``"dispatched"`` (a Celery
    worker) creates them idle, for ``Supervisor.run_one``; ``"none"`` (an API replica) creates none."""

    def __init__(self, settings: Settings, workers: str | None = None) -> None:
        self.settings = settings
        self.workers = workers or ("poll" if settings.run_workers else "none")
        self.engine: AsyncEngine = make_engine(settings.db_url)
        self.sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.hub = make_hub(settings)
        self.keys = ServerKey.load(settings)
        self.store = TaskStore(self.sessions, self.hub, self.keys)
        #: The clock nonces are judged by (tests inject one).
        self.clock: Callable[[], float] = time.time
        self.blobs: BlobStore = make_blob_store(settings)
        self.supervisors: list[Supervisor] = []
        self._loops: list[asyncio.Task[None]] = []
        self._dispatch: Callable[[int, str, int], Awaitable[None]] | None = None

    async def start(self) -> None:
        private_dir(self.settings.data_dir)
        await upgrade(self.engine)
        await seal_webhook_secrets(self.sessions, self.keys)
        # Tasks left running by a previous process of this host are recovered before anything new runs.
        await self.store.reap(worker_alive, self.settings.max_attempts)
        if self.workers != "none":
            for slug, spec in self.settings.models.items():
                for index in range(spec.workers):
                    self.supervisors.append(Supervisor(slug, spec, index, self.settings, self.store, self.blobs))
        if self.workers == "poll":
            for supervisor in self.supervisors:
                self._loops.append(asyncio.create_task(supervisor.run(), name=f"worker {supervisor.worker_id}"))
        if self.workers == "dispatched":
            return  # a dispatched worker only runs tasks; API replicas reap, deliver and dispatch
        reap_every = max(0.5, self.settings.lease_seconds / 4)
        self._loops.append(asyncio.create_task(self._every(reap_every, self._reap), name="reaper"))
        self._loops.append(asyncio.create_task(self._every(0.5, self._deliver), name="webhooks"))
        if self.settings.dispatch == "celery":
            from dreamserve.scale.dispatch import celery_dispatcher

            self._dispatch = celery_dispatcher(self.settings)
            self._loops.append(asyncio.create_task(self._every(0.2, self._send_queued), name="dispatcher"))

    async def close(self) -> None:
        for supervisor in self.supervisors:
            await supervisor.close()
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.hub.close()
        await self.engine.dispose()

    # -- used by the API -------------------------------------------------------------------------

    def wake(self, model: str) -> None:
        for supervisor in self.supervisors:
            if supervisor.slug == model:
                supervisor.wake()

    async def stop_task(self, task_id: int, kind: str) -> None:
        """Ask whichever worker runs the task to stop it: the DB flag reaches any host, the call is instant here."""
        await self.store.request_stop(task_id, kind)
        for supervisor in self.supervisors:
            await supervisor.stop(task_id, kind)

    async def wait_terminal(self, task_id: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = await self.store.get_by_id(task_id)
            if task is None or task.status in TERMINAL:
                return
            await asyncio.sleep(0.05)

    async def render(self, task_id: int) -> dict[str, Any] | None:
        task = await self.store.get_by_id(task_id)
        if task is None:
            return None
        outputs = (await self.store.files([task.id], "output"))[task.id]
        inputs = (await self.store.files([task.id], "input"))[task.id]
        return task_object(
            task,
            outputs,
            inputs=inputs,
            keys=self.keys,
            base_url=self.settings.base_url,
            cps=self.settings.cost_per_second,
            now=time.time(),
        )

    # -- background loops ------------------------------------------------------------------------

    async def _every(self, seconds: float, action: Callable[[], Awaitable[Any]]) -> None:
        while True:
            try:
                await action()
            except Exception:
                log.exception("background loop failed; retrying")
            await asyncio.sleep(seconds)

    async def _reap(self) -> None:
        for task_id in await self.store.reap(worker_alive, self.settings.max_attempts):
            task = await self.store.get_by_id(task_id)
            if task is not None:
                self.wake(task.model)

    async def _send_queued(self) -> None:
        """Send new and re-queued tasks to their model's queue; the conditional mark lets one replica send each."""
        assert self._dispatch is not None
        for task_id, model, priority in await self.store.undispatched():
            if await self.store.mark_dispatched(task_id):
                try:
                    await self._dispatch(task_id, model, priority)
                except Exception:
                    await self.store.unmark_dispatched(task_id)
                    raise

    async def _deliver(self) -> None:
        await deliver_due(self.sessions, self.settings, self.keys, self.render)
