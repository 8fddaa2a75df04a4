"""``GET /metrics`` in Prometheus' text format.

Task figures are read from the database at scrape time, so every API replica reports the whole
service whichever worker ran the tasks; request counts and worker memory are this process's own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from dreamserve.api.deps import ServicesDep
from dreamserve.db import Task

router = APIRouter()
#: Finished tasks whose stage timings feed the summaries (the most recent ones).
TIMING_WINDOW = 10_000

REQUESTS: Counter[tuple[str, str, int]] = Counter()


class RequestCounter(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS[(request.method, path, response.status_code)] += 1
        return response


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(services: ServicesDep) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

    async with services.sessions() as session:
        by_status = (
            await session.execute(select(Task.model, Task.status, func.count()).group_by(Task.model, Task.status))
        ).all()
        by_pexit = (
            await session.execute(
                select(Task.model, Task.pexit, func.count())
                .where(Task.status == "task_postprocess_end")
                .group_by(Task.model, Task.pexit)
            )
        ).all()
        recent = (
            await session.execute(
                select(Task.model, Task.details)
                .where(Task.status == "task_postprocess_end", Task.pexit == "0")
                .order_by(Task.id.desc())
                .limit(TIMING_WINDOW)
            )
        ).all()

    metric("dreamserve_tasks", "gauge", "Tasks by model and status (task_queue is the queue depth).")
    for model, status, count in by_status:
        lines.append(f'dreamserve_tasks{{model="{model}",status="{status}"}} {count}')
    metric("dreamserve_tasks_finished_total", "counter", "Finished tasks by model and pexit (0 = success).")
    for model, pexit, count in by_pexit:
        lines.append(f'dreamserve_tasks_finished_total{{model="{model}",pexit="{pexit}"}} {count}')

    sums: dict[tuple[str, str], float] = defaultdict(float)
    counts: Counter[tuple[str, str]] = Counter()
    for model, details in recent:
        for stage, seconds in (details or {}).get("timings", {}).items():
            sums[(model, stage)] += float(seconds)
            counts[(model, stage)] += 1
    metric("dreamserve_task_stage_seconds", "summary", f"Seconds per stage over the last {TIMING_WINDOW} successes.")
    for (model, stage), total in sorted(sums.items()):
        labels = f'model="{model}",stage="{stage}"'
        lines.append(f"dreamserve_task_stage_seconds_sum{{{labels}}} {total:.6f}")
        lines.append(f"dreamserve_task_stage_seconds_count{{{labels}}} {counts[(model, stage)]}")

    metric("dreamserve_worker_up", "gauge", "1 when this process's model worker has its model loaded.")
    metric("dreamserve_worker_rss_bytes", "gauge", "Resident memory of the model process (weights included).")
    for supervisor in services.supervisors:
        worker = supervisor.status()
        labels = f'worker="{worker["id"]}",model="{worker["model"]}"'
        lines.append(f"dreamserve_worker_up{{{labels}}} {int(worker['state'] in ('ready', 'busy'))}")
        rss = _rss(worker["pid"])
        if rss is not None:
            lines.append(f"dreamserve_worker_rss_bytes{{{labels}}} {rss}")

    metric("dreamserve_http_requests_total", "counter", "HTTP requests answered by this process.")
    for (method, path, code), count in sorted(REQUESTS.items()):
        lines.append(f'dreamserve_http_requests_total{{method="{method}",route="{path}",status="{code}"}} {count}')
    return "\n".join(lines) + "\n"
