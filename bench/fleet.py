"""The control plane at fleet scale: the real API, queue, supervisor and pipe, with scripted model processes.

One configuration per run. The bench starts ``dreamserve serve`` itself (``--api-processes`` of them: the
first runs the model workers, the others are API-only replicas, ``serve --no-workers``, each on its own port;
clients spread over all ports), the model being the tests' scripted engine (``tests/scripted_engine.py``:
the real pipe protocol, real PNGs of the asked size, ``--steps`` x ``--step-seconds`` per call, no torch).

``--gpus`` simulated GPUs are ``--gpus / --gpus-per-process`` supervisors, each with one scripted model
process whose ``max_batch`` is ``--gpus-per-process``: a batch of B images costs one call, as B GPUs side by
side would make B images in the time of one. One model process per GPU (100 Python processes, 3-4 GiB and a
spawn storm on 2 cores) would measure the host, not the control plane; the API and the queue see the same
claims, leases, heartbeats and events either way, only fewer ``claim_next`` polls while idle.

Before the server starts, the backlog (``--backlog`` queued tasks of one "backlog" project, priority 0) is
inserted straight through SQLAlchemy in one transaction (rows as ``store.create`` writes them, with their
``task_queue`` event; no token digest, as they are only read by taskid): 100,000 rows take seconds, where
``store.create`` one by one would take minutes. The bench's own projects run at priority 1 (``max_priority``
1), so their tasks are claimed before the backlog, and the fleet takes backlog tasks only when it has room:
every Detail of a queued task, every queue position and every claim still sees the whole backlog.

Phases (``--seconds`` each), through a minimal keep-alive HTTP/1.1 client on ``--connections`` sockets (httpx
costs about 1 ms of CPU a request, which the server would lose on a 2-core machine):

1. **fleet**: signed Wiro Runs at ``--submit-rate`` a second (open loop, below the fleet's capacity), each
   task polled with Task/Detail every 2 s until it ends (as n8n does), ``--follow`` of them followed on the
   socket and ``--webhook`` of them with a callbackUrl to a receiver in this process; plus ``--pollers``
   clients polling a backlog task every 2 s each. Reported: Detail/s, socket events/s, callbacks/s, dispatch
   latency (``createtime`` -> ``accepttime`` and -> ``assigntime``, from the rows) p50/p99.
2. **detail**: Task/Detail as fast as ``--connections`` clients can, on random tasks (backlog and own).
3. **run**: signed Run as fast as ``--connections`` clients can.

API latency p50/p99/p999 per route per phase; database time per request is the server's own figure where it
reports one (not here: see bench/RESULTS.md for the profile). Checks, all of which must be 0: HTTP 5xx,
transport errors, tasks lost (an accepted taskid with no row) or doubled (two rows for one request, found by
the unique prompt), tasks started twice (more than one ``task_start`` event, or ``attempts`` > 1), and fleet
tasks that did not end. Not a test: it prints figures, e.g.

    .venv/bin/python bench/fleet.py --backlog 100 --seconds 20
    .venv/bin/python bench/fleet.py --backlog 100000 --seconds 20
    scripts/scaleout-env .venv/bin/python bench/fleet.py --db postgres --api-processes 2 --backlog 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from dreamserve.signing import sign  # noqa: E402

MODEL = "bytedance/seedream-v4"
SCRIPTED = "tests.scripted_engine:ScriptedEngine"
FINAL = ("task_postprocess_end", "task_cancel")


# -- a minimal HTTP/1.1 client: keep-alive, Content-Length bodies -------------------------------------------


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            try:
                return await self._answer()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()  # the server closed an idle keep-alive connection: once more on a fresh one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _answer(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        closing = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                closing = True
        body = await self.reader.readexactly(length)
        if closing:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Route:
    """Latencies (seconds) and outcomes of one route in one phase."""

    took: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


class Clients:
    """A pool of connections to the API processes (round-robin), signing with a nonce per second (the SDK's
    timestamp nonce, reused within its second as Wiro's clients do)."""

    def __init__(self, ports: Sequence[int], connections: int) -> None:
        self.pool: asyncio.Queue[Connection] = asyncio.Queue()
        for index in range(connections):
            self.pool.put_nowait(Connection("127.0.0.1", ports[index % len(ports)]))
        self.routes: dict[str, Route] = {}
        self._signed: dict[str, tuple[int, dict[str, str]]] = {}
        #: Requests still waiting for a connection at this time (``time.monotonic()``) are dropped and counted
        #: as ``late``: an overloaded server slows the phase down, it does not stretch it without end.
        self.deadline = float("inf")

    def headers(self, key: str, secret: str) -> dict[str, str]:
        second = int(time.time())
        cached = self._signed.get(key)
        if cached is None or cached[0] != second:
            nonce = str(second)
            cached = (second, {"x-api-key": key, "x-nonce": nonce, "x-signature": sign(key, secret, nonce)})
            self._signed[key] = cached
        return cached[1]

    async def post(self, route: str, path: str, who: Project, body: dict[str, Any]) -> dict[str, Any] | None:
        stats = self.routes.setdefault(route, Route())
        connection = await self.pool.get()
        if time.monotonic() > self.deadline:
            self.pool.put_nowait(connection)
            stats.errors["late"] += 1
            return None
        started = time.perf_counter()
        try:
            status, raw = await connection.request(path, self.headers(who.key, who.secret), json.dumps(body).encode())
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            connection.close()
            stats.errors[type(exc).__name__] += 1
            return None
        finally:
            self.pool.put_nowait(connection)
        stats.took.append(time.perf_counter() - started)
        stats.statuses[status] += 1
        answer: dict[str, Any] = json.loads(raw) if raw else {}
        return answer if status == 200 and answer.get("result") else None

    def close(self) -> None:
        while not self.pool.empty():
            self.pool.get_nowait().close()


# -- the server ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    key: str
    secret: str
    id: int


@dataclass
class Fleet:
    processes: list[subprocess.Popen[bytes]]
    ports: list[int]
    data_dir: Path
    db_url: str
    backlog_ids: list[int]
    bench: Project
    backlog: Project


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_env(args: argparse.Namespace, data_dir: Path, db_url: str, hook_port: int) -> dict[str, str]:
    per = args.gpus_per_process
    spec = {"engine": SCRIPTED, "steps": args.steps, "max_batch": per, "workers": max(1, args.gpus // per)}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DREAMSERVE_DATA_DIR": str(data_dir),
        "DREAMSERVE_DATABASE_URL": db_url,
        "DREAMSERVE_MODELS": json.dumps({MODEL: spec}),
        "DREAMSERVE_MIN_PIXELS": str(64 * 64),
        "DREAMSERVE_SCRIPTED_STEP_SECONDS": str(args.step_seconds),
        "DREAMSERVE_LOG_LEVEL": "WARNING",
        # Quotas and limits on, but out of reach: their checks run on every request, as in production.
        "DREAMSERVE_MAX_QUEUED_TASKS": str(10**7),
        "DREAMSERVE_MAX_QUEUED_MEGAPIXELS": str(10**9),
        "DREAMSERVE_RATE_LIMIT_PER_MINUTE": str(10**8),
        "DREAMSERVE_SOCKET_MAX_PER_ADDRESS": "4096",
        "DREAMSERVE_SOCKET_MAX_PER_PROJECT": "100000",
        "DREAMSERVE_CALLBACK_ALLOW_HOSTS": json.dumps([f"127.0.0.1:{hook_port}", "127.0.0.1"]),
        "DREAMSERVE_WEBHOOK_PER_HOST": "32",
        "DREAMSERVE_HTTP_KEEPALIVE_SECONDS": "60",
    }
    if args.redis:
        env["DREAMSERVE_REDIS_URL"] = args.redis
    if args.dispatch == "celery":
        env["DREAMSERVE_DISPATCH"] = "celery"
    return env


async def seed(
    db_url: str, settings: Any, count: int, *, same_project: bool = False
) -> tuple[Project, Project, list[int]]:
    """The two projects, and ``count`` queued backlog tasks inserted in one transaction (see the docstring);
    ``same_project``: the backlog is the bench project's own."""
    from sqlalchemy import insert, select, update

    from dreamserve.jobs import TaskJob
    from dreamserve.projects import add_project
    from dreamserve.queue.db import Project as ProjectRow
    from dreamserve.queue.db import Task, TaskEvent, make_engine, make_sessionmaker
    from dreamserve.queue.keyring import ServerKey, new_salt
    from dreamserve.queue.migrate import upgrade

    engine = make_engine(db_url, 2)
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    keys = ServerKey.load(settings)
    bench = await add_project(sessions, keys, "fleet", signature=True, max_priority=1)
    backlog = await add_project(sessions, keys, "backlog", signature=True, max_priority=0)
    owner = bench if same_project else backlog
    now = time.time()
    job = TaskJob(prompt="backlog", width=64, height=64, num_images=1, seed=1, asked_size="64x64").dump()
    rows = [
        {
            "project_id": owner.project_id,
            "token_salt": new_salt(),
            "model": MODEL,
            "status": "task_queue",
            "priority": 0,
            "parameters": {},
            "job": job,
            "width": 64,
            "height": 64,
            "num_images": 1,
            "has_inputs": False,
            "inputs_ready": True,
            "callback_url": "",
            "callback_events": ["completed"],
            "details": {},
            "createtime": now,
            "debugoutput": "",
        }
        for _ in range(count)
    ]
    async with sessions.begin() as session:
        for start in range(0, count, 5000):
            await session.execute(insert(Task), rows[start : start + 5000])
        query = select(Task.id).where(Task.project_id == owner.project_id).order_by(Task.id)
        ids = list((await session.execute(query)).scalars())
        events = [{"task_id": i, "type": "task_queue", "message": None, "created": now} for i in ids]
        for start in range(0, len(events), 5000):
            await session.execute(insert(TaskEvent), events[start : start + 5000])
        if hasattr(ProjectRow, "unfinished_tasks"):  # the counters store.create keeps (absent before issue 27)
            counted = {"unfinished_tasks": count, "unfinished_pixels": count * 64 * 64}
            mine = ProjectRow.id == owner.project_id
            await session.execute(update(ProjectRow).where(mine).values(**counted))
    await engine.dispose()

    def project(creds: Any) -> Project:
        return Project(creds.api_key, creds.api_secret, creds.project_id)

    return project(bench), project(backlog), ids


async def reset_postgres(db_url: str) -> None:
    from sqlalchemy import text

    from dreamserve.queue.db import make_engine

    engine = make_engine(db_url, 1)
    async with engine.begin() as connection:
        await connection.execute(text("DROP SCHEMA public CASCADE"))
        await connection.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


def start(args: argparse.Namespace, hook_port: int) -> Fleet:
    from dreamserve.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-fleet-"))
    if args.db == "postgres":
        db_url = os.environ["DREAMSERVE_TEST_POSTGRES"]
        asyncio.run(reset_postgres(db_url))
    else:
        db_url = f"sqlite+aiosqlite:///{data_dir / 'dreamserve.db'}"
    settings = Settings(data_dir=data_dir, database_url=db_url)
    seeded = time.perf_counter()
    bench, backlog, ids = asyncio.run(seed(db_url, settings, args.backlog))
    print(f"seeded {len(ids)} backlog tasks in {time.perf_counter() - seeded:.1f} s", flush=True)
    env = server_env(args, data_dir, db_url, hook_port)
    processes, ports = [], []
    celery = args.dispatch == "celery"
    for index in range(args.api_processes):
        port = free_port()
        command = [sys.executable, "-m", "dreamserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if index or celery or not args.gpus:
            command.append("--no-workers")
        with (data_dir / f"server-{index}.log").open("ab") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        ports.append(port)
    if celery and args.gpus:
        # One ``dreamserve worker`` process per simulated GPU group: each runs one supervisor (Celery's one
        # slot) with one scripted model process of ``max_batch`` --gpus-per-process.
        spec = {"engine": SCRIPTED, "steps": args.steps, "max_batch": args.gpus_per_process, "workers": 1}
        worker_env = {**env, "DREAMSERVE_MODELS": json.dumps({MODEL: spec})}
        for index in range(max(1, args.gpus // args.gpus_per_process)):
            command = [sys.executable, "-m", "dreamserve", "worker", "--name", f"gpu{index}"]
            with (data_dir / f"worker-{index}.log").open("ab") as log:
                processes.append(subprocess.Popen(command, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
    fleet = Fleet(processes, ports, data_dir, db_url, ids, bench, backlog)
    asyncio.run(wait_ready(fleet, args))
    return fleet


async def wait_ready(fleet: Fleet, args: argparse.Namespace, timeout: float = 180) -> None:
    """Every API process answers /readyz 200, and the first one's workers are all ready."""
    import httpx

    deadline = time.monotonic() + timeout
    workers = max(1, args.gpus // args.gpus_per_process) if args.gpus else 0
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            for process in fleet.processes:
                if process.poll() is not None:
                    logs = "".join(p.read_text()[-2000:] for p in fleet.data_dir.glob("*.log"))
                    raise SystemExit(f"a server process exited:\n{logs}")
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                ready = [(await http.get(f"http://127.0.0.1:{p}/readyz")).status_code == 200 for p in fleet.ports]
                health = (await http.get(f"http://127.0.0.1:{fleet.ports[0]}/healthz")).json()
                loaded = [w for w in health.get("workers", []) if w["state"] in ("ready", "busy")]
                if args.dispatch == "celery":
                    logs = [path.read_text(errors="replace") for path in fleet.data_dir.glob("worker-*.log")]
                    loaded = [log for log in logs if " ready." in log]
                if all(ready) and len(loaded) >= workers:
                    return
            await asyncio.sleep(0.5)
    raise SystemExit("the fleet was not ready in time")


def stop(fleet: Fleet) -> None:
    for process in fleet.processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in fleet.processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# -- clients --------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    submitted: dict[str, int] = field(default_factory=dict)  # unique prompt -> taskid
    ended: dict[int, str] = field(default_factory=dict)
    socket_events: int = 0
    socket_errors: Counter[str] = field(default_factory=Counter)
    callbacks: int = 0
    fleet_ids: list[int] = field(default_factory=list)


async def submit(clients: Clients, who: Project, tally: Tally, tag: str, callback: str | None) -> dict[str, Any] | None:
    body: dict[str, Any] = {"prompt": tag, "size": "64x64", "maxImages": "1", "priority": "1"}
    if callback:
        body["callbackUrl"] = callback
    answer = await clients.post("Run", f"/v1/Run/{MODEL}", who, body)
    if answer is not None:
        tally.submitted[tag] = int(answer["taskid"])
    return answer


async def poll_until_done(clients: Clients, who: Project, taskid: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(2.0)
        answer = await clients.post("Detail", "/v1/Task/Detail", who, {"taskid": str(taskid)})
        task = answer["tasklist"][0] if answer and answer.get("tasklist") else {}
        if task.get("status") in FINAL:
            tally.ended[taskid] = f"{task['status']} {task['pexit']}"
            return


async def follow(port: int, token: str, tally: Tally, until: float) -> None:
    import websockets

    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1") as socket:
            await socket.send(json.dumps({"type": "task_info", "tasktoken": token}))
            while time.monotonic() < until:
                frame = json.loads(await asyncio.wait_for(socket.recv(), until - time.monotonic()))
                tally.socket_events += 1
                if frame.get("type") in FINAL:
                    return
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        tally.socket_errors[type(exc).__name__] += 1


async def receiver(tally: Tally, port: int) -> asyncio.Server:
    """The callback receiver on ``port``: answers 200 to every POST and counts them."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = next((int(x.split(":")[1]) for x in head.split("\r\n") if x.startswith("content-length")), 0)
                await reader.readexactly(length)
                tally.callbacks += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def paced(rate: float, seconds: float, make: Any) -> list[asyncio.Task[Any]]:
    """Start ``make(n)`` ``rate`` times a second for ``seconds`` (open loop); returns the started tasks."""
    started: list[asyncio.Task[Any]] = []
    begin = time.monotonic()
    number = 0
    while (now := time.monotonic()) < begin + seconds:
        due = int((now - begin) * rate) + 1
        while number < due:
            started.append(asyncio.create_task(make(number)))
            number += 1
        await asyncio.sleep(min(0.01, 1 / rate))
    return started


async def fleet_phase(clients: Clients, fleet: Fleet, args: argparse.Namespace, tally: Tally, hook: int) -> float:
    """Open-loop submits with their pollers, followers and callbacks, and pollers of backlog tasks."""
    seconds = args.seconds
    clients.deadline = time.monotonic() + seconds + 10
    drain = time.monotonic() + seconds + 30
    followers: list[asyncio.Task[Any]] = []

    async def one(number: int) -> None:
        tag = f"fleet {number} {random.getrandbits(48):x}"
        callback = f"http://127.0.0.1:{hook}/hook" if random.random() < args.webhook else None
        answer = await submit(clients, fleet.bench, tally, tag, callback)
        if answer is None:
            return
        taskid = int(answer["taskid"])
        tally.fleet_ids.append(taskid)
        if random.random() < args.follow:
            port = fleet.ports[number % len(fleet.ports)]
            followers.append(asyncio.create_task(follow(port, answer["socketaccesstoken"], tally, drain)))
        await poll_until_done(clients, fleet.bench, taskid, tally, drain)

    backlog = fleet.backlog_ids

    async def background(number: int) -> None:
        taskid = backlog[number % len(backlog)] if backlog else 1
        await clients.post("Detail", "/v1/Task/Detail", fleet.backlog, {"taskid": str(taskid)})

    started = time.monotonic()
    pollers = asyncio.create_task(paced(args.pollers / 2, seconds, background)) if args.pollers else None
    submits = await paced(args.submit_rate, seconds, one)
    if pollers is not None:
        await asyncio.gather(*await pollers)
    elapsed = time.monotonic() - started
    await asyncio.gather(*submits)
    await asyncio.gather(*followers)
    return elapsed


async def closed_loop(seconds: float, connections: int, call: Any) -> float:
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def loop(number: int) -> None:
        n = number
        while time.monotonic() < deadline:
            await call(n)
            n += connections

    await asyncio.gather(*(loop(i) for i in range(connections)))
    return time.monotonic() - started


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"count": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999)}


def report(name: str, clients: Clients, seconds: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"seconds": round(seconds, 1)}
    for route, stats in sorted(clients.routes.items()):
        figures[route] = {
            "per_second": round(len(stats.took) / seconds, 1),
            **percentiles(stats.took),
            "statuses": dict(stats.statuses),
            "errors": dict(stats.errors),
        }
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


async def measure(fleet: Fleet, args: argparse.Namespace, hook: int) -> dict[str, Any]:
    tally = Tally()
    server = await receiver(tally, hook)
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    phases = args.phases
    if "fleet" in phases:
        clients = Clients(fleet.ports, args.connections)
        seconds = await fleet_phase(clients, fleet, args, tally, hook)
        results["fleet"] = report("fleet", clients, seconds)
        results["fleet"]["socket_events_per_second"] = round(tally.socket_events / seconds, 1)
        results["fleet"]["socket_errors"] = dict(tally.socket_errors)
        results["fleet"]["callbacks_per_second"] = round(tally.callbacks / seconds, 1)
        extras = {k: results["fleet"][k] for k in ("socket_events_per_second", "socket_errors", "callbacks_per_second")}
        print(f"fleet: {json.dumps(extras)}", flush=True)
        clients.close()
    own = list(tally.submitted.values())
    if "detail" in phases:
        clients = Clients(fleet.ports, args.connections)
        pool = fleet.backlog_ids + own

        async def detail(n: int) -> None:
            taskid = random.choice(pool)
            who = fleet.backlog if taskid in backlog_set else fleet.bench
            await clients.post("Detail", "/v1/Task/Detail", who, {"taskid": str(taskid)})

        backlog_set = set(fleet.backlog_ids)
        results["detail"] = report("detail", clients, await closed_loop(args.seconds, args.connections, detail))
        clients.close()
    if "run" in phases:
        clients = Clients(fleet.ports, args.connections)

        async def run(n: int) -> None:
            await submit(clients, fleet.bench, tally, f"run {n} {random.getrandbits(48):x}", None)

        results["run"] = report("run", clients, await closed_loop(args.seconds, args.connections, run))
        clients.close()
    results["load_after"] = os.getloadavg()
    server.close()
    results["tally"] = tally
    return results


async def check(fleet: Fleet, tally: Tally) -> dict[str, Any]:
    """Lost, doubled and twice-run tasks, from the database; dispatch latency of the fleet phase's tasks (read once
    the servers are stopped: unfinished ones are those the fleet had not ended by then)."""
    from sqlalchemy import func, select

    from dreamserve.queue.db import Task, TaskEvent, make_engine, make_sessionmaker

    engine = make_engine(fleet.db_url, 2)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        mine = Task.project_id == fleet.bench.id
        rows = (await session.execute(select(Task.id, Task.job["prompt"].as_string()).where(mine))).all()
        starts = select(TaskEvent.task_id).where(TaskEvent.type == "task_start").group_by(TaskEvent.task_id)
        twice = (await session.execute(starts.having(func.count() > 1))).all()
        retried = (await session.execute(select(func.count()).where(Task.attempts > 1))).scalar_one()
        fleet = Task.id.in_(tally.fleet_ids or [0])
        stamps = (await session.execute(select(Task.createtime, Task.accepttime, Task.assigntime).where(fleet))).all()
        unfinished = (await session.execute(select(func.count()).where(fleet, Task.status.not_in(FINAL)))).scalar_one()
    await engine.dispose()
    by_prompt = Counter(prompt for _, prompt in rows)
    ids = {task_id for task_id, _ in rows}
    claimed = [a - c for c, a, _ in stamps if a]
    assigned = [s - c for c, _, s in stamps if s]
    return {
        "accepted": len(tally.submitted),
        "lost": sum(1 for taskid in tally.submitted.values() if taskid not in ids),
        "doubled": sum(count - 1 for prompt, count in by_prompt.items() if prompt in tally.submitted and count > 1),
        "started_twice": len(twice),
        "attempts_over_1": int(retried),
        "fleet_tasks": len(tally.fleet_ids),
        "fleet_unfinished": int(unfinished),
        "fleet_end_not_seen_by_poller": sum(1 for taskid in tally.fleet_ids if taskid not in tally.ended),
        "fleet_outcomes": dict(Counter(tally.ended.values())),
        "dispatch_claim": percentiles(claimed),
        "dispatch_assign": percentiles(assigned),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--api-processes", type=int, default=1)
    parser.add_argument("--dispatch", choices=("local", "celery"), default="local")
    parser.add_argument("--redis", default=os.environ.get("DREAMSERVE_TEST_REDIS"), help="Events hub (and broker).")
    parser.add_argument("--gpus", type=int, default=100, help="0: the API alone (serve --no-workers), no fleet.")
    parser.add_argument("--gpus-per-process", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=0.25, help="4 x 0.25 s: an image a second.")
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--submit-rate", type=float, default=40)
    parser.add_argument("--pollers", type=int, default=400, help="Clients polling a backlog task every 2 s each.")
    parser.add_argument("--follow", type=float, default=0.5, help="Share of fleet tasks followed on the socket.")
    parser.add_argument("--webhook", type=float, default=0.5, help="Share of fleet tasks with a callbackUrl.")
    parser.add_argument("--phases", nargs="+", default=["fleet", "detail", "run"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.api_processes > 1 and not args.redis:
        parser.error("several API processes need --redis (or DREAMSERVE_TEST_REDIS) for the sockets' events")

    hook = free_port()  # the receiver's, fixed before the servers start: their callback allowlist names it
    fleet = start(args, hook)
    try:
        results = asyncio.run(measure(fleet, args, hook))
    finally:
        stop(fleet)
    results["checks"] = asyncio.run(check(fleet, results.pop("tally")))
    print(f"checks: {json.dumps(results['checks'])}", flush=True)
    results["config"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
