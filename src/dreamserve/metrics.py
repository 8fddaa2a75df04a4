"""What ``/metrics`` reports: a ``prometheus_client`` collector over the service's state, read at scrape time.

Task figures come from the database, so every API replica reports the whole service whichever
worker ran the tasks: gauges (queue depth, tasks in flight) are counted at scrape time, and
finished tasks are read once each from the event log (``TaskStats``) into counters and stage
histograms. HTTP counts and model-process memory are this process's own.

A scrape reads first (``Monitor.scrape``, async: the database, ``nvidia-smi``), then ``prometheus_client``
renders the ``Scrape`` it returns (its ``collect`` yields metric families from what was read), in the text
format or OpenMetrics as the scraper asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.facts import WorkerStatus
from dreamserve.queue.db import File, Task, TaskEvent
from dreamserve.status import FINAL, Pexit, TaskStatus

#: Label values of one series, in the order of its family's label names.
Labels = tuple[str, ...]

#: Seconds: from a fast cached request to a long 4K generation behind a queue.
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0)


class Histogram:
    """Cumulative-bucket histograms, one per label set, kept between scrapes."""

    def __init__(self, label_names: Sequence[str], buckets: Iterable[float]) -> None:
        self.label_names = tuple(label_names)
        self.bounds = tuple(sorted(buckets))
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        counts[index] += 1
        total[0] += value

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, help_text, labels=self.label_names)
        for labels, (counts, total) in sorted(self.series.items()):
            running, buckets = 0, list[tuple[str, float]]()
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))  # "1.0", as Prometheus' clients write it
                buckets.append((le, float(running)))
            family.add_metric(labels, buckets, round(total[0], 6))
        return family


def counter_family(name: str, help_text: str, label_names: Sequence[str], counts: Counter[Labels]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=label_names)
    for labels, count in sorted(counts.items()):
        family.add_metric(labels, count)
    return family


def gauge_family(
    name: str, help_text: str, label_names: Sequence[str], values: Iterable[tuple[Labels, float]]
) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=label_names)
    for labels, value in values:
        family.add_metric(labels, value)
    return family


#: Methods counted by name; any other (the client's text: h11 takes any token) shares the label "other",
#: so label values stay few, as routes do ("unmatched").
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestStats:
    """HTTP requests answered by this process, by method, route template and status."""

    def __init__(self) -> None:
        self.counts: Counter[Labels] = Counter()
        self.seconds = Histogram(["route"], HTTP_BUCKETS)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.counts[(method if method in METHODS else "other", route, str(status))] += 1
        self.seconds.observe((route,), seconds)

    def families(self) -> Iterator[Metric]:
        yield counter_family(
            "dreamserve_http_requests",
            "HTTP requests answered by this process.",
            ["method", "route", "status"],
            self.counts,
        )
        yield self.seconds.family("dreamserve_http_request_seconds", "Time to answer HTTP requests, by route.")


class TaskStats:
    """Finished tasks, each counted once, in the order their terminal events were logged.

    The cursor is an event id. Ids are handed out before commit, so on PostgreSQL a smaller id may
    become visible after a larger one: events younger than ``SETTLE`` seconds are read again on the
    next scrape (and skipped if already counted) before the cursor moves past them. Counting starts
    with the events logged after this process started, as Prometheus counters do.
    """

    SETTLE = 30.0
    BATCH = 1000

    def __init__(self) -> None:
        self.cursor: int | None = None
        self.counted: dict[int, float] = {}  # event id -> its time, for ids above the cursor
        self.finished: Counter[Labels] = Counter()
        self.stages = Histogram(["model", "stage"], TASK_BUCKETS)
        self._lock = asyncio.Lock()

    async def begin(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            self.cursor = int((await session.execute(select(func.max(TaskEvent.id)))).scalar_one_or_none() or 0)

    async def catch_up(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with self._lock:  # two concurrent scrapes must not count a task twice
            if self.cursor is None:
                await self.begin(sessions)
            after = self.cursor or 0
            while True:
                rows = await self._read(sessions, after)
                for row in rows:
                    if row.id not in self.counted:
                        self.counted[row.id] = row.created
                        self._count(row)
                if len(rows) < self.BATCH:
                    break
                after = rows[-1].id
            settled = [i for i, created in self.counted.items() if created < time.time() - self.SETTLE]
            if settled:
                self.cursor = max(settled)
                self.counted = {i: t for i, t in self.counted.items() if i > self.cursor}

    async def _read(self, sessions: async_sessionmaker[AsyncSession], after: int) -> list[Any]:
        query = (
            select(
                TaskEvent.id,
                TaskEvent.created,
                Task.model,
                Task.pexit,
                Task.details,
                Task.createtime,
                Task.postprocessendtime,
            )
            .join(Task, Task.id == TaskEvent.task_id)
            .where(TaskEvent.id > after, TaskEvent.type.in_(sorted(FINAL)))
            .order_by(TaskEvent.id)
            .limit(self.BATCH)
        )
        async with sessions() as session:
            return list((await session.execute(query)).all())

    def _count(self, row: Any) -> None:
        self.finished[(row.model, row.pexit or "unknown")] += 1
        if row.pexit != Pexit.OK:
            return
        timings = row.details.timings if row.details is not None else None
        for stage, seconds in sorted(timings.stages().items() if timings is not None else ()):
            self.stages.observe((row.model, stage), seconds)
        if row.postprocessendtime:
            self.stages.observe((row.model, "total"), row.postprocessendtime - row.createtime)

    def families(self) -> Iterator[Metric]:
        yield counter_family(
            "dreamserve_tasks_finished",
            "Tasks finished since this process started, by pexit.",
            ["model", "pexit"],
            self.finished,
        )
        yield self.stages.family(
            "dreamserve_task_stage_seconds",
            "Seconds per stage of successful tasks (details.timings; total = created to done).",
        )


@dataclass(frozen=True)
class Unfinished:
    """Unfinished tasks of one model and status, and when the oldest of them was created."""

    model: str
    status: str
    count: int
    oldest_created: float


async def read_unfinished(sessions: async_sessionmaker[AsyncSession]) -> list[Unfinished]:
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Task.model, Task.status, func.count(), func.min(Task.createtime))
                .where(Task.status.not_in(sorted(FINAL)))
                .group_by(Task.model, Task.status)
            )
        ).all()
    return [Unfinished(*row) for row in sorted(rows)]


def queue_families(unfinished: Sequence[Unfinished], models: Iterable[str], now: float) -> Iterator[Metric]:
    """Tasks not finished yet, by model and status (``task_queue`` is the queue), and the oldest queued one's age."""
    depth = dict.fromkeys(models, 0)
    oldest = dict.fromkeys(models, 0.0)
    for row in unfinished:
        if row.status == TaskStatus.QUEUE:
            depth[row.model], oldest[row.model] = row.count, now - row.oldest_created
    yield gauge_family(
        "dreamserve_tasks",
        "Unfinished tasks by model and status.",
        ["model", "status"],
        (((row.model, row.status), row.count) for row in unfinished),
    )
    yield gauge_family(
        "dreamserve_queue_depth",
        "Queued tasks waiting for a worker, by model.",
        ["model"],
        (((model,), count) for model, count in sorted(depth.items())),
    )
    yield gauge_family(
        "dreamserve_queue_oldest_seconds",
        "Age of the oldest queued task, by model (0 = none).",
        ["model"],
        (((model,), round(age, 3)) for model, age in sorted(oldest.items())),
    )


async def read_storage(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[int, int, int]]:
    """(project id, bytes, files) of every project that stores files: what its storage quota counts."""
    query = select(File.project_id, func.sum(File.size), func.count(File.id)).group_by(File.project_id)
    async with sessions() as session:
        return sorted((int(p), int(b or 0), int(n)) for p, b, n in (await session.execute(query)).all())


def storage_families(storage: Sequence[tuple[int, int, int]]) -> Iterator[Metric]:
    yield gauge_family(
        "dreamserve_project_stored_bytes",
        "Bytes of the files a project stores (uploads, task inputs and outputs), as its storage quota counts them.",
        ["project"],
        (((str(project),), size) for project, size, _ in storage),
    )
    yield gauge_family(
        "dreamserve_project_stored_files",
        "Files a project stores.",
        ["project"],
        (((str(project),), files) for project, _, files in storage),
    )


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux), weights included once they are loaded."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class GpuMemory:
    """GPU memory from ``nvidia-smi`` (the API never imports torch), cached for a few seconds.

    Per process where the driver can tell (``pid -> bytes``), and per device. Inside a container the
    driver may list host pids, which match no worker: the per-device figures still hold.
    """

    TTL = 5.0

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-smi")
        self.read_at = 0.0
        self.by_pid: dict[int, int] = {}
        self.by_gpu: dict[str, tuple[int, int]] = {}

    async def refresh(self) -> None:
        if self.binary is None or time.monotonic() - self.read_at < self.TTL:
            return
        self.read_at = time.monotonic()
        apps = await self._query("--query-compute-apps=pid,used_memory")
        self.by_pid = {int(pid): int(used) * 2**20 for pid, used in apps if pid.isdigit() and used.isdigit()}
        gpus = await self._query("--query-gpu=index,memory.used,memory.total")
        self.by_gpu = {
            index: (int(used) * 2**20, int(total) * 2**20)
            for index, used, total in gpus
            if used.isdigit() and total.isdigit()
        }

    async def _query(self, query: str) -> list[list[str]]:
        assert self.binary is not None
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                query,
                "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return []
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), timeout=5)
        except TimeoutError:  # a wedged driver must not hang the scrape
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return []
        return [[cell.strip() for cell in line.split(",")] for line in stdout.decode().splitlines() if line.strip()]

    def families(self) -> Iterator[Metric]:
        if not self.by_gpu:
            return
        devices = sorted(self.by_gpu.items())
        yield gauge_family(
            "dreamserve_gpu_memory_used_bytes",
            "GPU memory in use on each device (nvidia-smi).",
            ["gpu"],
            (((index,), used) for index, (used, _) in devices),
        )
        yield gauge_family(
            "dreamserve_gpu_memory_total_bytes",
            "GPU memory of each device (nvidia-smi).",
            ["gpu"],
            (((index,), total) for index, (_, total) in devices),
        )


def worker_families(workers: Iterable[WorkerStatus], gpu: GpuMemory) -> Iterator[Metric]:
    """One series per model worker of this process: loaded or not, load time, RSS and GPU memory of its child;
    a family with no series (no child process, no GPU figure) is left out."""
    families = {
        "dreamserve_worker_up": "1 when the model worker has its model loaded (ready or busy).",
        "dreamserve_worker_load_seconds": "Seconds the model process took to load its model.",
        "dreamserve_worker_rss_bytes": "Resident memory of the model process (weights included).",
        "dreamserve_worker_gpu_memory_bytes": "GPU memory the driver reports for the model process.",
    }
    samples: dict[str, list[tuple[Labels, float]]] = {name: [] for name in families}
    for worker in workers:
        labels = (worker.id, worker.model)
        samples["dreamserve_worker_up"].append((labels, int(worker.loaded)))
        samples["dreamserve_worker_load_seconds"].append((labels, worker.load_seconds))
        pid = worker.pid
        rss = rss_bytes(pid) if pid is not None else None
        if rss is not None:
            samples["dreamserve_worker_rss_bytes"].append((labels, rss))
        if pid is not None and pid in gpu.by_pid:
            samples["dreamserve_worker_gpu_memory_bytes"].append((labels, gpu.by_pid[pid]))
    for name, help_text in families.items():
        if samples[name]:
            yield gauge_family(name, help_text, ["worker", "model"], samples[name])


@dataclass
class Scrape:
    """What one scrape read, as a ``prometheus_client`` collector: ``collect`` yields its metric families."""

    monitor: Monitor
    unfinished: list[Unfinished]
    models: list[str]
    workers: list[WorkerStatus]
    now: float
    storage: list[tuple[int, int, int]]

    def collect(self) -> Iterator[Metric]:
        yield from queue_families(self.unfinished, self.models, self.now)
        yield from storage_families(self.storage)
        yield from self.monitor.tasks.families()
        yield from worker_families(self.workers, self.monitor.gpu)
        yield from self.monitor.gpu.families()
        yield from self.monitor.requests.families()


class Monitor:
    """The figures one API process keeps between scrapes."""

    def __init__(self) -> None:
        self.requests = RequestStats()
        self.tasks = TaskStats()
        self.gpu = GpuMemory()

    async def scrape(
        self, sessions: async_sessionmaker[AsyncSession], models: Iterable[str], workers: Iterable[WorkerStatus]
    ) -> Scrape:
        """Read what is read at scrape time (unfinished tasks, newly finished ones, GPU memory)."""
        unfinished = await read_unfinished(sessions)
        await self.tasks.catch_up(sessions)
        await self.gpu.refresh()
        storage = await read_storage(sessions)
        return Scrape(self, unfinished, list(models), list(workers), time.time(), storage)
