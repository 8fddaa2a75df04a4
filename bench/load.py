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
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from dreamserve.signing import auth_headers

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


def start_server(data_dir: Path, port: int, min_pixels: int) -> tuple[subprocess.Popen[bytes], str, str | None]:
    """A server subprocess with the tiny model; returns it with a signature project's key and secret."""
    from dreamserve.projects import create_project
    from dreamserve.settings import ModelSpec, Settings

    spec = ModelSpec(source="tiny", max_pixels=64 * 64, max_batch=4)
    settings = Settings(data_dir=data_dir, port=port, models={MODEL: spec}, min_pixels=min_pixels)
    creds = create_project(settings, "load", signature=True)
    env = {
        **os.environ,
        "DREAMSERVE_DATA_DIR": str(data_dir),
        "DREAMSERVE_MODELS": json.dumps({MODEL: spec.model_dump()}),
        "DREAMSERVE_MIN_PIXELS": str(min_pixels),
        # The clients share one project: this measures the server, not the per-project rate limit and quotas.
        "DREAMSERVE_RATE_LIMIT_PER_MINUTE": "0",
        "DREAMSERVE_MAX_QUEUED_TASKS": "0",
    }
    log = (data_dir / "server.log").open("ab")
    command = [sys.executable, "-m", "dreamserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(data_dir / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process, creds.api_key, creds.api_secret
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready in 120 s")


def memory(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    try:
        server = psutil.Process(pid)
        children = server.children(recursive=True)
        return {
            "api_mb": round(server.memory_info().rss / 2**20, 1),
            "children_mb": round(sum(c.memory_info().rss for c in children) / 2**20, 1),
        }
    except psutil.Error:
        return {}


async def client(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    secret: str | None,
    size: str,
    poll: float,
    deadline: float,
    stats: Stats,
) -> None:
    number = 0
    while time.monotonic() < deadline:
        number += 1
        started = time.monotonic()
        try:
            response = await http.post(
                f"{url}/v1/Run/{MODEL}",
                headers=auth_headers(key, secret),
                json={"prompt": f"load {number}", "size": size, "maxImages": 1},
            )
        except httpx.HTTPError as exc:
            stats.error(f"submit {type(exc).__name__}")
            await asyncio.sleep(poll)
            continue
        stats.submit.append(time.monotonic() - started)
        body = response.json() if response.headers.get("content-type") == "application/json" else {}
        if response.status_code >= 500 or not body.get("result"):
            stats.error(f"submit HTTP {response.status_code}")
            await asyncio.sleep(poll)
            continue
        taskid = body["taskid"]
        while time.monotonic() < deadline:
            await asyncio.sleep(poll)
            started = time.monotonic()
            try:
                response = await http.post(
                    f"{url}/v1/Task/Detail", headers=auth_headers(key, secret), json={"taskid": taskid}
                )
            except httpx.HTTPError as exc:
                stats.error(f"detail {type(exc).__name__}")
                continue
            stats.detail.append(time.monotonic() - started)
            detail = response.json()
            if response.status_code >= 500 or not detail.get("result"):
                stats.error(f"detail HTTP {response.status_code}")
                continue
            task = detail["tasklist"][0]
            if task["status"] in TERMINAL:
                outcome = f"pexit {task['pexit']}"
                stats.finished[outcome] = stats.finished.get(outcome, 0) + 1
                break


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
        clients = [client(http, url, key, secret, args.size, args.poll, deadline, stats) for _ in range(args.clients)]
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
        process, key, secret = start_server(data_dir, port, min_pixels=64 * 64)
        url, pid = f"http://127.0.0.1:{port}", process.pid
    try:
        stats = asyncio.run(run(args, url, key, secret, pid))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    gib = round(psutil.virtual_memory().total / 2**30)
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {gib} GiB",
        "clients": args.clients,
        "seconds": args.seconds,
        "poll_seconds": args.poll,
        "size": args.size,
        "submit": percentiles(stats.submit),
        "detail": percentiles(stats.detail),
        "errors": stats.errors,
        "finished": stats.finished,
        "rss": stats.rss,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
