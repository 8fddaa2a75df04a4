"""What ``/metrics`` reports, in Prometheus' text exposition format (written here: it is small).

Task figures come from the database, so every API replica reports the whole service whichever
worker ran the tasks: gauges (queue depth, tasks in flight) are counted at scrape time, and
finished tasks are read once each from the event log (``TaskStats``) into counters and stage
histograms. HTTP counts and model-process memory are this process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.db import Task, TaskEvent
from dreamserve.events import TERMINAL
from dreamserve.status import Pexit, TaskStatus

Labels = tuple[tuple[str, str], ...]

#: Seconds: from a fast cached request to a long 4K generation behind a queue.
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(labels.items())


class Exposition:
    """One scrape's text: families (``# HELP``, ``# TYPE``) followed by their samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels | Mapping[str, str], value: float) -> None:
        pairs = labels.items() if isinstance(labels, Mapping) else labels
        inner = ",".join(f'{key}="{_escape(str(val))}"' for key, val in pairs)
        self.lines.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Histogram:
    """Cumulative-bucket histograms, one per label set."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Mapping[str, str], value: float) -> None:
        counts, total = self.series.setdefault(_key(labels), ([0] * (len(self.bounds) + 1), [0.0]))
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        counts[index] += 1
        total[0] += value

    def write(self, out: Exposition, name: str, help_text: str) -> None:
        out.family(name, "histogram", help_text)
        for labels, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))  # "1.0", as Prometheus' clients write it
                out.sample(f"{name}_bucket", (*labels, ("le", le)), running)
            out.sample(f"{name}_sum", labels, round(total[0], 6))
            out.sample(f"{name}_count", labels, running)


class RequestStats:
    """HTTP requests answered by this process, by method, route template and status."""

    def __init__(self) -> None:
        self.counts: Counter[Labels] = Counter()
        self.seconds = Histogram(HTTP_BUCKETS)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.counts[(("method", method), ("route", route), ("status", str(status)))] += 1
        self.seconds.observe({"route": route}, seconds)

    def write(self, out: Exposition) -> None:
        out.family("dreamserve_http_requests_total", "counter", "HTTP requests answered by this process.")
        for labels, count in sorted(self.counts.items()):
            out.sample("dreamserve_http_requests_total", labels, count)
        self.seconds.write(out, "dreamserve_http_request_seconds", "Time to answer HTTP requests, by route.")


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
        self.stages = Histogram(TASK_BUCKETS)
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
            .where(TaskEvent.id > after, TaskEvent.type.in_(sorted(TERMINAL)))
            .order_by(TaskEvent.id)
            .limit(self.BATCH)
        )
        async with sessions() as session:
            return list((await session.execute(query)).all())

    def _count(self, row: Any) -> None:
        self.finished[(("model", row.model), ("pexit", row.pexit or "unknown"))] += 1
        if row.pexit != Pexit.OK:
            return
        labels = {"model": row.model}
        for stage, seconds in sorted(((row.details or {}).get("timings") or {}).items()):
            self.stages.observe({**labels, "stage": stage}, float(seconds))
        if row.postprocessendtime:
            self.stages.observe({**labels, "stage": "total"}, row.postprocessendtime - row.createtime)

    def write(self, out: Exposition) -> None:
        out.family("dreamserve_tasks_finished_total", "counter", "Tasks finished since this process started, by pexit.")
        for labels, count in sorted(self.finished.items()):
            out.sample("dreamserve_tasks_finished_total", labels, count)
        self.stages.write(
            out,
            "dreamserve_task_stage_seconds",
            "Seconds per stage of successful tasks (details.timings; total = created to done).",
        )


async def task_gauges(sessions: async_sessionmaker[AsyncSession], models: Iterable[str], out: Exposition) -> None:
    """Tasks not finished yet, by model and status (``task_queue`` is the queue), and the oldest queued one's age."""
    async with sessions() as session:
        by_status = (
            await session.execute(
                select(Task.model, Task.status, func.count(), func.min(Task.createtime))
                .where(Task.status.not_in(sorted(TERMINAL)))
                .group_by(Task.model, Task.status)
            )
        ).all()
    now = time.time()
    depth = dict.fromkeys(models, 0)
    oldest = dict.fromkeys(models, 0.0)
    out.family("dreamserve_tasks", "gauge", "Unfinished tasks by model and status.")
    for model, status, count, created in sorted(by_status):
        out.sample("dreamserve_tasks", {"model": model, "status": status}, count)
        if status == TaskStatus.QUEUE:
            depth[model], oldest[model] = count, now - created
    out.family("dreamserve_queue_depth", "gauge", "Queued tasks waiting for a worker, by model.")
    for model, count in sorted(depth.items()):
        out.sample("dreamserve_queue_depth", {"model": model}, count)
    out.family("dreamserve_queue_oldest_seconds", "gauge", "Age of the oldest queued task, by model (0 = none).")
    for model, age in sorted(oldest.items()):
        out.sample("dreamserve_queue_oldest_seconds", {"model": model}, round(age, 3))


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

    def write(self, out: Exposition) -> None:
        if not self.by_gpu:
            return
        out.family("dreamserve_gpu_memory_used_bytes", "gauge", "GPU memory in use on each device (nvidia-smi).")
        for index, (used, _) in sorted(self.by_gpu.items()):
            out.sample("dreamserve_gpu_memory_used_bytes", {"gpu": index}, used)
        out.family("dreamserve_gpu_memory_total_bytes", "gauge", "GPU memory of each device (nvidia-smi).")
        for index, (_, total) in sorted(self.by_gpu.items()):
            out.sample("dreamserve_gpu_memory_total_bytes", {"gpu": index}, total)


def worker_gauges(workers: Iterable[Mapping[str, Any]], gpu: GpuMemory, out: Exposition) -> None:
    """One line per model worker of this process: loaded or not, load time, RSS and GPU memory of its child."""
    rows = list(workers)
    families = {
        "dreamserve_worker_up": ("gauge", "1 when the model worker has its model loaded (ready or busy)."),
        "dreamserve_worker_load_seconds": ("gauge", "Seconds the model process took to load its model."),
        "dreamserve_worker_rss_bytes": ("gauge", "Resident memory of the model process (weights included)."),
        "dreamserve_worker_gpu_memory_bytes": ("gauge", "GPU memory the driver reports for the model process."),
    }
    samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in families}
    for worker in rows:
        labels = {"worker": str(worker["id"]), "model": str(worker["model"])}
        samples["dreamserve_worker_up"].append((labels, int(worker["state"] in ("ready", "busy"))))
        samples["dreamserve_worker_load_seconds"].append((labels, float(worker.get("load_seconds") or 0)))
        pid = worker.get("pid")
        rss = rss_bytes(pid) if isinstance(pid, int) else None
        if rss is not None:
            samples["dreamserve_worker_rss_bytes"].append((labels, rss))
        if isinstance(pid, int) and pid in gpu.by_pid:
            samples["dreamserve_worker_gpu_memory_bytes"].append((labels, gpu.by_pid[pid]))
    for name, (kind, help_text) in families.items():
        if samples[name]:
            out.family(name, kind, help_text)
            for labels, value in samples[name]:
                out.sample(name, labels, value)


class Monitor:
    """The figures one API process keeps between scrapes."""

    def __init__(self) -> None:
        self.requests = RequestStats()
        self.tasks = TaskStats()
        self.gpu = GpuMemory()

    async def render(
        self, sessions: async_sessionmaker[AsyncSession], models: Iterable[str], workers: Iterable[Mapping[str, Any]]
    ) -> str:
        out = Exposition()
        await task_gauges(sessions, models, out)
        await self.tasks.catch_up(sessions)
        self.tasks.write(out)
        await self.gpu.refresh()
        worker_gauges(workers, self.gpu, out)
        self.gpu.write(out)
        self.requests.write(out)
        return out.text()
