"""Bounded load test on 127.0.0.1: N concurrent clients submit tasks and poll Task/Detail for a fixed time.

Starts its own server (the tiny model, small outputs) in a fresh data folder, unless ``--url`` points at
one (then ``--key``/``--secret`` are needed and no RSS is measured). Each client loops: ``POST /v1/Run``,
then ``POST /v1/Task/Detail`` every ``--poll`` seconds until the task ends, then the next task. Reported:
p50/p95/p99/max of the submit and Detail latencies, errors (transport errors, HTTP >= 500, or
``result: false``), tasks finished, and the server's RSS (API process and model process) at the start,
each 15 s, and at the end. Not a test: run it by hand, e.g.

    .venv/bin/python bench/load.py --clients 50 --seconds 120 --json bench/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

from dreamserve.signing import auth_headers

if TYPE_CHECKING:
    from dreamserve.projects import Credentials

MODEL = "bytedance/seedream-v4"
TERMINAL = ("task_postprocess_end", "task_cancel")


@dataclass
class Stats:
    submit: list[float] = field(default_factory=list)
    detail: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    rss: list[dict[str, Any]] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(1000 * ordered[-1], 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
    }


def start_server(
    data_dir: Path,
    port: int,
    projects: Sequence[str],
    env: Mapping[str, str],
    ready_seconds: float = 120,
    trace: Path | None = None,
) -> tuple[subprocess.Popen[bytes], list[Credentials]]:
    """A server subprocess with the tiny model (64x64 outputs, batches of 4) and ``env`` on top of its settings;
    returns it, once ``/readyz`` answers 200, with a signature project of each name in ``projects``. With
    ``trace``, the server runs under ``traced.py`` (tracemalloc), which writes its figures there."""
    from dreamserve.projects import create_project
    from dreamserve.settings import ModelSpec, Settings

    spec = ModelSpec(source="tiny", max_pixels=64 * 64, max_batch=4)
    settings = Settings(data_dir=data_dir, port=port, models={MODEL: spec}, min_pixels=64 * 64)
    creds = [create_project(settings, name, signature=True) for name in projects]
    environment = {
        **os.environ,
        "DREAMSERVE_DATA_DIR": str(data_dir),
        "DREAMSERVE_MODELS": json.dumps({MODEL: spec.model_dump()}),
        "DREAMSERVE_MIN_PIXELS": str(64 * 64),
        **env,
    }
    log = (data_dir / "server.log").open("ab")
    serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if trace is None:
        command = [sys.executable, "-m", "dreamserve", *serve]
    else:
        command = [sys.executable, str(Path(__file__).parent / "traced.py"), str(trace), "--", *serve]
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ready_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(data_dir / 'server.log').read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process, creds
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"server not ready in {ready_seconds:.0f} s")


def memory(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    try:
        server = psutil.Process(pid)
        children = server.children(recursive=True)
        api = server.memory_info()
        return {
            "api_mb": round(api.rss / 2**20, 1),
            # anonymous pages: the process's own memory; the rest is shared libraries and files, the kernel's to drop
            "api_anon_mb": round((api.rss - api.shared) / 2**20, 1),
            "children_mb": round(sum(c.memory_info().rss for c in children) / 2**20, 1),
        }
    except psutil.Error:
        return {}


@dataclass(frozen=True)
class Client:
    """What one simulated client sends: its project's credentials and its tasks' prompt and size."""

    url: str
    key: str
    secret: str | None
    size: str = "64x64"
    prompt: str = "load"


async def client(
    http: httpx.AsyncClient, who: Client, poll: float, deadline: float, stats: Stats, follow_seconds: float = 0.0
) -> None:
    """Submit a task, poll Task/Detail every ``poll`` s until it ends, submit the next, until ``deadline``.

    The task in flight at the deadline is followed ``follow_seconds`` more; one that has not ended by then
    counts as ``unfinished``."""
    number = 0
    while time.monotonic() < deadline:
        number += 1
        body = {"prompt": f"{who.prompt} {number}", "size": who.size, "maxImages": 1}
        answer = await _call(http, who, f"/v1/Run/{MODEL}", body, "submit", stats.submit, stats)
        if answer is None:
            await asyncio.sleep(poll)
            continue
        follow_until = max(deadline, time.monotonic()) + follow_seconds
        outcome = "unfinished"
        while time.monotonic() < follow_until:
            await asyncio.sleep(poll)
            detail = await _call(
                http, who, "/v1/Task/Detail", {"taskid": answer["taskid"]}, "detail", stats.detail, stats
            )
            task = detail["tasklist"][0] if detail else {}
            if task.get("status") in TERMINAL:
                outcome = f"pexit {task['pexit']}"
                break
        stats.finished[outcome] = stats.finished.get(outcome, 0) + 1


async def _call(
    http: httpx.AsyncClient, who: Client, path: str, body: dict[str, Any], kind: str, took: list[float], stats: Stats
) -> dict[str, Any] | None:
    """One signed POST, its latency added to ``took``; None (and an error counted) unless it answered a result."""
    started = time.monotonic()
    try:
        response = await http.post(f"{who.url}{path}", headers=auth_headers(who.key, who.secret), json=body)
    except httpx.HTTPError as exc:
        stats.error(f"{kind} {type(exc).__name__}")
        return None
    took.append(time.monotonic() - started)
    answer = response.json() if response.headers.get("content-type") == "application/json" else {}
    if response.status_code >= 500 or not answer.get("result"):
        stats.error(f"{kind} HTTP {response.status_code}")
        return None
    result: dict[str, Any] = answer
    return result


async def sample_memory(pid: int | None, deadline: float, stats: Stats, every: float = 15.0) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))
        stats.rss.append({"t": round(time.monotonic() - started), **memory(pid)})


async def run(args: argparse.Namespace, url: str, key: str, secret: str | None, pid: int | None) -> Stats:
    stats = Stats()
    stats.rss.append({"t": 0, **memory(pid)})
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        deadline = time.monotonic() + args.seconds
        who = Client(url, key, secret, size=args.size)
        clients = [client(http, who, args.poll, deadline, stats) for _ in range(args.clients)]
        await asyncio.gather(sample_memory(pid, deadline, stats), *clients)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--poll", type=float, default=0.5, help="Seconds between a client's Detail calls.")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--url", help="An already running server (else one is started here).")
    parser.add_argument("--key")
    parser.add_argument("--secret")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    args = parser.parse_args()

    process = None
    if args.url:
        url, key, secret, pid = args.url.rstrip("/"), args.key, args.secret, None
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-load-"))
        port = 18000 + os.getpid() % 1000
        # The clients share one project: this measures the server, not the per-project rate limit and quotas.
        unlimited = {"DREAMSERVE_RATE_LIMIT_PER_MINUTE": "0", "DREAMSERVE_MAX_QUEUED_TASKS": "0"}
        process, (creds,) = start_server(data_dir, port, ["load"], unlimited)
        key, secret = creds.api_key, creds.api_secret
        url, pid = f"http://127.0.0.1:{port}", process.pid
    try:
        stats = asyncio.run(run(args, url, key, secret, pid))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    figures = {
        **run_header(args),
        "poll_seconds": args.poll,
        "size": args.size,
        "submit": percentiles(stats.submit),
        "detail": percentiles(stats.detail),
        "errors": stats.errors,
        "finished": stats.finished,
        "rss": stats.rss,
    }
    publish(figures, args.json)


def run_header(args: argparse.Namespace) -> dict[str, Any]:
    """When, on what machine, and how many clients for how long: the first keys of a report."""
    gib = round(psutil.virtual_memory().total / 2**30)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {gib} GiB",
        "clients": args.clients,
        "seconds": args.seconds,
    }


def publish(figures: dict[str, Any], path: Path | None) -> None:
    """Print the figures as JSON, and write them to ``path`` too when given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
