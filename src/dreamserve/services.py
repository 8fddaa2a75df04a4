"""The running parts of one server process, built from ``Settings`` and shared by the API and workers.

``Services.start`` opens the database, starts one supervisor per configured model worker (when
``run_workers``), the lease reaper and the callback sender; ``close`` stops them in reverse. Every
background loop is watched by ``liveness`` (``/readyz``) and survives any exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dreamserve import malloc
from dreamserve.blobs import BlobStore, make_blob_store
from dreamserve.budget import ByteBudget
from dreamserve.errors import RateLimited
from dreamserve.liveness import Liveness
from dreamserve.preprocess import Preprocessor
from dreamserve.projects import seal_webhook_secrets
from dreamserve.queue.db import make_engine, make_sessionmaker
from dreamserve.queue.events import Event, EventHub, Hub
from dreamserve.queue.keyring import ServerKey, private_dir
from dreamserve.queue.migrate import upgrade
from dreamserve.queue.reads import Reads
from dreamserve.queue.sealing import scrub_freed_pages, seal_legacy_capabilities
from dreamserve.queue.store import StorageQuota, TaskStore
from dreamserve.settings import Settings
from dreamserve.status import FINAL, StopKind, WorkerState
from dreamserve.sweep import OrphanSweep, sweep_scratch
from dreamserve.webhooks import CallbackFormat, Outbox, WebhookSender
from dreamserve.worker.process import worker_alive
from dreamserve.worker.supervisor import Supervisor

log = logging.getLogger(__name__)

#: While waiting for a task, the stored row is read this often too, in case an event never reached this hub.
WAIT_RECHECK_SECONDS = 5.0


def make_hub(settings: Settings) -> Hub:
    if settings.redis_url:
        from dreamserve.queue.redis_events import RedisEventHub

        return RedisEventHub(settings.redis_url)
    return EventHub()


class Services:
    """``workers="poll"`` (embedded) runs supervisors that poll the tasks table; ``"dispatched"`` (a Celery
    worker) creates them idle, for ``Supervisor.run_one``; ``"none"`` (an API replica) creates none."""

    def __init__(
        self,
        settings: Settings,
        workers: str | None = None,
        callback_formats: Mapping[str, Callable[[Services], CallbackFormat]] | None = None,
    ) -> None:
        """``callback_formats``: by dialect name, what builds that dialect's ``webhooks.CallbackFormat`` from
        these services (the API passes them, ``dialects/mount.py``: a dialect's shape lives above this module;
        without them no callback can be sent)."""
        self.settings = settings
        self.workers = workers or ("poll" if settings.run_workers else "none")
        self.engine: AsyncEngine = make_engine(settings.db_url, settings.database_pool_size)
        self.sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.hub = make_hub(settings)
        self.keys = ServerKey.load(settings)
        #: The clock nonces are judged by (tests inject one).
        self.clock: Callable[[], float] = time.time
        self.blobs: BlobStore = make_blob_store(settings)
        #: Bytes in flight for checking uploaded references, per process (``reference_budget_bytes``).
        self.reference_budget = ByteBudget(settings.reference_budget_bytes)
        storage = StorageQuota(settings.max_project_bytes, settings.max_project_files)
        reads = Reads.of(self.sessions)
        self.store = TaskStore(self.sessions, self.hub, self.keys, self.blobs, Outbox(), storage, reads)
        self.supervisors: list[Supervisor] = []
        self.liveness = Liveness(settings.loop_stale_seconds)
        formats = {name: build(self) for name, build in (callback_formats or {}).items()}
        self.webhooks = WebhookSender(self.sessions, settings, self.keys, formats)
        #: Fetches queued tasks' URL inputs before they can be claimed (not in a dispatched GPU worker).
        self.preprocessor = Preprocessor(settings, self.store, self.blobs, self.wake_workers)
        #: Deletes what a crash left that no row names (run one page at a time by the reaper).
        self.orphans = OrphanSweep(settings, self.sessions, self.blobs)
        self._loops: list[asyncio.Task[None]] = []
        self._dispatch: Callable[[int, str, int], Awaitable[None]] | None = None
        #: Synchronous requests waiting now, per project (``sync_slot``).
        self._sync_waiting: dict[int, int] = {}

    async def start(self) -> None:
        private_dir(self.settings.data_dir)
        migrated = await upgrade(self.engine)
        sealed = await seal_webhook_secrets(self.sessions, self.keys)
        sealed += await seal_legacy_capabilities(self.sessions, self.keys)
        if migrated or sealed:
            # Secrets sealed now or by an earlier start (webhook secrets) must not linger in SQLite's free pages.
            await scrub_freed_pages(self.engine)
        # Tasks left running by a previous process of this host are recovered before anything new runs.
        await self.store.reap(worker_alive, self.settings.max_attempts)
        # ... and their scratch folders, on this host, removed (the blobs are swept by the reaper's passes).
        await sweep_scratch(self.settings, self.sessions, time.time())
        if self.workers != "none":
            for slug, spec in self.settings.models.items():
                for index in range(spec.workers):
                    self.supervisors.append(
                        Supervisor(slug, spec, index, self.settings, self.store, self.blobs, self.liveness)
                    )
        if self.workers == "poll":
            for supervisor in self.supervisors:
                loop = asyncio.create_task(supervisor.run(), name=supervisor.loop_name)
                self.liveness.register(supervisor.loop_name, 1.0)
                self.liveness.watch(supervisor.loop_name, loop)
                self._loops.append(loop)
        if self.workers == "dispatched":
            return  # a dispatched worker only runs tasks; API replicas preprocess, reap, deliver and dispatch
        preprocess = asyncio.create_task(self.preprocessor.run(), name="preprocess")
        self.liveness.register("preprocess", 1.0)
        self.liveness.watch("preprocess", preprocess)
        self.preprocessor.on_tick = functools.partial(self.liveness.tick, "preprocess")
        self._loops.append(preprocess)
        reap_every = max(0.5, self.settings.lease_seconds / 4)
        self._loops.append(self.liveness.start("reaper", reap_every, self._reap))
        self._loops.append(self.liveness.start("webhooks", 0.5, self.webhooks.send_due))
        if self.settings.release_memory_seconds:
            self._loops.append(self.liveness.start("memory", self.settings.release_memory_seconds, self._release))
        if self.settings.dispatch == "celery":
            from dreamserve.dispatch import celery_dispatcher

            self._dispatch = celery_dispatcher(self.settings)
            self._loops.append(self.liveness.start("dispatcher", 0.2, self._send_queued))

    async def wait_loaded(self, poll: float = 0.1) -> None:
        """Return once every supervisor of this process has loaded its model, or failed to."""
        while any(s.state in (WorkerState.NEW, WorkerState.STARTING) for s in self.supervisors):
            await asyncio.sleep(poll)

    async def close(self) -> None:
        for supervisor in self.supervisors:
            await supervisor.close()
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.store.steps.close()  # the last steps the workers reported
        await self.webhooks.close()
        await self.hub.close()
        await self.engine.dispose()

    # -- used by the API -------------------------------------------------------------------------

    def wake(self, model: str, *, inputs_ready: bool = False) -> None:
        """A task was queued: its URL inputs (if any) are fetched, or a worker of its model claims it.
        ``inputs_ready``: it has none to fetch (the preprocess loop would read the queue for nothing)."""
        if not inputs_ready:
            self.preprocessor.wake()
        self.wake_workers(model)

    def wake_workers(self, model: str) -> None:
        """A task of ``model`` became claimable: wake one idle worker to claim it, and every worker forming a batch
        (it may join theirs). Waking every idle worker made a fleet's worth of claims race for each new task."""
        woke_idle = False
        for supervisor in self.supervisors:
            if supervisor.slug != model:
                continue
            if supervisor.forming:
                supervisor.wake()
            elif supervisor.idle and not woke_idle:
                supervisor.wake()
                woke_idle = True

    async def stop_task(self, task_id: int, kind: StopKind) -> None:
        """Ask whichever worker runs the task to stop it: the DB flag reaches any host, the call is instant here."""
        await self.store.request_stop(task_id, kind)
        for supervisor in self.supervisors:
            await supervisor.stop(task_id, kind)

    async def wait_terminal(
        self, task_id: int, timeout: float, gone: Callable[[], Awaitable[bool]] | None = None
    ) -> str:
        """Wait until the task ends, on the event hub (no polling): ``"done"`` (ended or unknown), ``"timeout"``,
        or ``"gone"`` when ``gone`` (checked every second, e.g. the client hung up) says so.

        The hub is subscribed to before the row is read, so an end published in between is not missed; the row
        is read again every ``WAIT_RECHECK_SECONDS`` for an end whose event never reached this hub.
        """
        deadline = time.monotonic() + timeout
        live = self.hub.subscribe(task_id)
        try:
            recheck = 0.0
            while (left := deadline - time.monotonic()) > 0:
                if time.monotonic() >= recheck:
                    task = await self.store.get_by_id(task_id)
                    if task is None or task.status in FINAL:
                        return "done"
                    recheck = time.monotonic() + WAIT_RECHECK_SECONDS
                if any(event.type in FINAL for event in await live.next(min(left, 1.0))):
                    return "done"
                if gone is not None and await gone():
                    return "gone"
            return "timeout"
        finally:
            await live.close()

    @contextlib.asynccontextmanager
    async def sync_slot(self, project_id: int) -> AsyncIterator[None]:
        """One of the project's ``sync_max_per_project`` synchronous waits; ``RateLimited`` (429) past it."""
        limit = self.settings.sync_max_per_project
        if self._sync_waiting.get(project_id, 0) >= limit:
            raise RateLimited(
                f"This project already has {limit} synchronous image requests waiting, the limit. Wait for one "
                "to answer, or submit with /v1/Run and follow the task on the socket or with Task/Detail.",
                retry_after=1,
            )
        self._sync_waiting[project_id] = self._sync_waiting.get(project_id, 0) + 1
        try:
            yield
        finally:
            self._sync_waiting[project_id] -= 1
            if not self._sync_waiting[project_id]:
                del self._sync_waiting[project_id]

    async def follow(self, task_id: int, timeout: float, poll_seconds: float = 0.5) -> AsyncIterator[Event]:
        """Every event of a task in order, the stored ones first, until its terminal event or ``timeout`` seconds.

        Subscribes before reading the log so nothing published in between is missed (ids drop the
        duplicates), and reads the log again whenever the hub is quiet, in case a writer could not reach it."""
        live = self.hub.subscribe(task_id)
        last = 0
        deadline = time.monotonic() + timeout
        try:
            pending = await self.store.events(task_id)
            while time.monotonic() < deadline:
                for event in sorted({e.id: e for e in pending if e.id > last}.values(), key=lambda e: e.id):
                    last = event.id
                    yield event
                    if event.type in FINAL:
                        return
                pending = await live.next(poll_seconds)
                if not pending:
                    pending = await self.store.events(task_id, after=last)
        finally:
            await live.close()

    async def abandon(self, task_id: int) -> None:
        """Cancel the task of a client that went away, queued or running: nobody could fetch its images."""
        if await self.store.cancel_queued(task_id) is None:
            await self.stop_task(task_id, StopKind.CANCEL)

    # -- background loops ------------------------------------------------------------------------

    async def _reap(self) -> None:
        for task_id in await self.store.reap(worker_alive, self.settings.max_attempts):
            task = await self.store.get_by_id(task_id)
            if task is not None:
                self.wake(task.model)
        await self.expire()
        await self.orphans.step()

    async def _release(self) -> None:
        malloc.release_free_memory()

    async def expire(self, now: float | None = None) -> int:
        """Delete the uploads and task files older than ``retention_seconds`` (0 keeps them); ``now`` for tests."""
        if self.settings.retention_seconds <= 0:
            return 0
        before = (time.time() if now is None else now) - self.settings.retention_seconds
        return await self.store.expire_files(before)

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
