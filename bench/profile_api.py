"""Where an API process's time goes on one route: the app in this process under cProfile, driven by a child. The
database is seeded as ``bench/fleet.py`` seeds it (``--backlog`` queued tasks, of the bench's project here), the
app runs API-only (no model workers: the API's own cost; ``--gpus`` adds fleet.py's scripted ones) under uvicorn
in this process's main thread with cProfile on, and a child process (``--drive``) sends signed Runs or
Task/Details (on random backlog tasks; ``replicate`` and ``fal``: those dialects' GET polls of them) from
``--connections`` keep-alive connections for ``--seconds``. Prints
the rate, then the top entries by own time and by cumulative time. The session path's database work runs in
aiosqlite's thread, which cProfile does not see (it shows as the awaits of ``aiosqlite``'s calls); the direct reads
of ``queue/reads.py`` run in this thread and show as ``sqlite3.Connection.execute``.
Not a test, e.g.

    .venv/bin/python bench/profile_api.py --route detail --backlog 100000
    .venv/bin/python bench/profile_api.py --route run --backlog 100
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import fleet  # noqa: E402

#: The GET polls of the bearer dialects: Replicate's prediction, fal's queue status (``{id}``: a backlog task).
POLLS = {
    "replicate": ("Bearer", "/v1/predictions/{id}"),
    "fal": ("Key", "/fal/queue/fal-ai/bytedance/requests/{id}/status"),
}


class Getter(fleet.Connection):
    """fleet's keep-alive connection, sending GETs (the polls of Replicate's and fal's clients)."""

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.writer.write(f"{head}\r\n".encode())
        return await self._answer()


def asked_through(path: Path, dialect: str) -> None:
    """The seeded tasks as if asked through ``dialect``: fal finds only the tasks it queued."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET job = json_set(job, '$.dialect', ?)", (dialect,))


async def poll(args: argparse.Namespace, ids: list[int]) -> None:
    scheme, path = POLLS[args.route]
    headers = {"authorization": f"{scheme} {args.key}:{args.secret}"}
    pool: asyncio.Queue[Getter] = asyncio.Queue()
    for _ in range(args.connections):
        pool.put_nowait(Getter("127.0.0.1", args.drive))
    stats = fleet.Route()

    async def call(n: int) -> None:
        connection = await pool.get()
        started = time.perf_counter()
        try:
            status, _ = await connection.get(path.format(id=ids[n % len(ids)]), headers)
        finally:
            pool.put_nowait(connection)
        stats.took.append(time.perf_counter() - started)
        stats.statuses[status] += 1

    seconds = await fleet.closed_loop(args.seconds, args.connections, call)
    answer = {"per_second": round(len(stats.took) / seconds, 1), **fleet.percentiles(stats.took)}
    print(f"{args.route}: {json.dumps({**answer, 'statuses': dict(stats.statuses)})}", flush=True)


async def drive(args: argparse.Namespace) -> None:
    ids = json.loads(args.ids)
    if args.route in POLLS:
        await poll(args, ids)
        return
    bench = fleet.Project(args.key, args.secret, 0)
    clients = fleet.Clients([args.drive], args.connections)

    async def call(n: int) -> None:
        if args.route == "run":
            body = {"prompt": f"profile {n}", "size": "64x64", "maxImages": "1", "priority": "1"}
            await clients.post("Run", f"/v1/Run/{fleet.MODEL}", bench, body)
        else:
            await clients.post("Detail", "/v1/Task/Detail", bench, {"taskid": str(ids[n % len(ids)])})

    seconds = await fleet.closed_loop(args.seconds, args.connections, call)
    fleet.report(args.route, clients, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=("detail", "run", *POLLS), default="detail")
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gpus", type=int, default=0, help="Scripted model workers too (bench/fleet.py's).")
    parser.add_argument("--gpus-per-process", type=int, default=4)
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        asyncio.run(drive(args))
        return
    import uvicorn

    from dreamserve.api.app import create_app
    from dreamserve.settings import ModelSpec, Settings

    per = args.gpus_per_process
    workers = args.gpus // per if args.gpus else 0
    os.environ.setdefault("DREAMSERVE_SCRIPTED_STEP_SECONDS", "0.25")
    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-profile-"))
    db_url = f"sqlite+aiosqlite:///{data_dir / 'dreamserve.db'}"
    port = fleet.free_port()
    settings = Settings(
        data_dir=data_dir,
        database_url=db_url,
        port=port,
        run_workers=bool(args.gpus),
        models={fleet.MODEL: ModelSpec(engine=fleet.SCRIPTED, workers=workers, max_batch=per, steps=4)},
        min_pixels=64 * 64,
        max_queued_tasks=10**7,
        max_queued_megapixels=10**9,
        rate_limit_per_minute=10**8,
        log_level="WARNING",
    )
    # The backlog tasks are read by the bench's project: Detail finds a project's own tasks only.
    bench, _, ids = asyncio.run(fleet.seed(db_url, settings, args.backlog, same_project=True))
    if args.route in POLLS:
        asked_through(data_dir / "dreamserve.db", args.route)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    sample = json.dumps(ids[:: max(1, len(ids) // 2000)])
    command = [sys.executable, __file__, "--route", args.route, "--seconds", str(args.seconds)]
    command += ["--connections", str(args.connections), "--drive", str(port), "--key", bench.key]
    command += ["--secret", bench.secret, "--ids", sample]

    def load() -> None:
        while not server.started:
            time.sleep(0.1)
        time.sleep(3 if args.gpus else 0)  # the model processes load
        subprocess.run(command, check=True)
        server.should_exit = True

    threading.Thread(target=load, daemon=True).start()
    profile = cProfile.Profile()
    profile.runcall(server.run)
    profile.dump_stats(data_dir / "api.prof")
    print(f"profile: {data_dir / 'api.prof'}", flush=True)
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
