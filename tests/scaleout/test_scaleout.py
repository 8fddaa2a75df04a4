"""Scale-out mode against real servers: PostgreSQL, Redis (Celery broker + event streams), SeaweedFS S3,
two API replicas and two GPU workers, all separate processes on 127.0.0.1. The workers' model processes run the
scripted engine (``tests/scripted_engine.py``: real PNGs after 0.1 s a step, no torch to load): what is under test
here is the distribution, not the pipeline.

Run through ``scripts/scaleout-env`` (``scripts/test`` does so), which starts the servers and sets
DREAMSERVE_TEST_*. Without them these tests are skipped locally; in CI they are required.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image
from websockets.sync.client import connect

from dreamserve.projects import Credentials, create_project
from dreamserve.settings import ModelSpec, S3Settings, Settings
from dreamserve.signing import auth_headers
from tests.conftest import SCRIPTED, free_port

REDIS = os.environ.get("DREAMSERVE_TEST_REDIS")
POSTGRES = os.environ.get("DREAMSERVE_TEST_POSTGRES")
S3 = os.environ.get("DREAMSERVE_TEST_S3")
MODEL = "bytedance/seedream-v4"
PRIORITY_MODEL = "test/priority"

pytestmark = pytest.mark.skipif(
    not (REDIS and POSTGRES and S3) and not os.environ.get("CI"),
    reason="scale-out servers not running: use scripts/scaleout-env (scripts/test does)",
)


@dataclass
class Proc:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as handle:  # the process has its own copy of the descriptor
            self.process = subprocess.Popen(self.command, env=self.env, stdout=handle, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class Cluster:
    apis: list[str]
    workers: dict[str, Proc]
    creds: Credentials
    settings: Settings
    tmp: Path
    #: One client for every request: ``httpx.post`` builds a client (and a TLS context) per call, some 25 ms of
    #: CPU each, which the polls below would take from the cluster's processes.
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def post(self, replica: int, path: str, creds: Credentials | None = None, **kwargs: Any) -> dict[str, Any]:
        creds = creds or self.creds
        headers = auth_headers(creds.api_key, creds.api_secret, str(int(time.time())))
        body: dict[str, Any] = self.http.post(f"{self.apis[replica]}{path}", headers=headers, **kwargs).json()
        return body

    def run(self, replica: int, model: str = MODEL, creds: Credentials | None = None, **fields: Any) -> dict[str, Any]:
        body = self.post(replica, f"/v1/Run/{model}", creds, json={"size": "1K", **fields})
        assert body["result"] is True, body
        return body

    def detail(self, replica: int, taskid: str, creds: Credentials | None = None) -> dict[str, Any]:
        task: dict[str, Any] = self.post(replica, "/v1/Task/Detail", creds, json={"taskid": taskid})["tasklist"][0]
        return task

    def wait(self, replica: int, taskid: str, timeout: float = 120, creds: Credentials | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.detail(replica, taskid, creds)
            if task["status"] in ("task_postprocess_end", "task_cancel"):
                return task
            time.sleep(0.2)
        raise AssertionError(f"task {taskid} still {task['status']}")

    def wait_progress(self, replica: int, taskid: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.detail(replica, taskid)
            if task["progress"] and task["status"] == "task_start":
                return task
            time.sleep(0.05)
        raise AssertionError(f"task {taskid} made no progress: {task['status']}")


SERVER_SECRET = "scaleout-test-server-secret-0123456789"


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def _env(tmp: Path, models: dict[str, ModelSpec], name: str) -> dict[str, str]:
    assert REDIS and POSTGRES and S3
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DREAMSERVE_DATA_DIR": str(tmp / name),
        "DREAMSERVE_DATABASE_URL": POSTGRES,
        "DREAMSERVE_REDIS_URL": REDIS,
        "DREAMSERVE_DISPATCH": "celery",
        "DREAMSERVE_S3": json.dumps({"bucket": "dreamserve", "endpoint": S3}),
        "DREAMSERVE_MODELS": json.dumps({slug: spec.model_dump() for slug, spec in models.items()}),
        "DREAMSERVE_LEASE_SECONDS": "4",
        "DREAMSERVE_HEARTBEAT_SECONDS": "0.5",
        "DREAMSERVE_FETCH_ALLOW_PRIVATE": "true",
        # Projects' priorities are capped at max_priority (0 by default); this cluster's tests order by them.
        "DREAMSERVE_MAX_PRIORITY": "9",
        # Tokens, file keys and sealed webhook secrets derive from it: one secret for the whole deployment.
        "DREAMSERVE_SERVER_SECRET": SERVER_SECRET,
        # 40 steps of 0.1 s: a task runs for 4 s, long enough to cancel or kill while it runs.
        "DREAMSERVE_SCRIPTED_STEP_SECONDS": "0.1",
    }


def _worker(tmp: Path, name: str, model: str, spec: ModelSpec) -> Proc:
    command = [sys.executable, "-m", "dreamserve", "worker", "--name", name]
    proc = Proc(name, command, _env(tmp, {model: spec}, name), tmp / f"{name}.log")
    proc.start()
    return proc


def _wait_worker(proc: Proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "ready." in proc.log.read_text(errors="replace"):
            return
        assert proc.process is not None and proc.process.poll() is None, proc.log.read_text()[-3000:]
        time.sleep(0.2)
    raise RuntimeError(f"worker {proc.name} not ready: {proc.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (REDIS and POSTGRES and S3):
        pytest.fail("CI must run the scale-out tests: start the servers with scripts/scaleout-env")
    tmp = tmp_path_factory.mktemp("cluster")
    slow = ModelSpec(engine=SCRIPTED, max_pixels=320 * 320, steps=40)
    models = {MODEL: slow, PRIORITY_MODEL: ModelSpec(engine=SCRIPTED, max_pixels=64 * 64, steps=2)}
    settings = Settings(
        data_dir=tmp / "cli",
        database_url=POSTGRES,
        redis_url=REDIS,
        dispatch="celery",
        s3=S3Settings(bucket="dreamserve", endpoint=S3),
        models=models,
        server_secret=SERVER_SECRET,
    )
    creds = create_project(settings, "scaleout", signature=True)
    procs: list[Proc] = []
    apis = []
    for index in range(2):
        port = free_port()
        command = [sys.executable, "-m", "dreamserve", "serve", "--no-workers", "--host", "127.0.0.1"]
        proc = Proc(
            f"api{index}", [*command, "--port", str(port)], _env(tmp, models, f"api{index}"), tmp / f"api{index}.log"
        )
        proc.env["DREAMSERVE_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
        proc.start()
        procs.append(proc)
        apis.append(f"http://127.0.0.1:{port}")
    workers = {name: _worker(tmp, name, MODEL, slow) for name in ("w1", "w2")}
    try:
        for url in apis:
            _wait_http(f"{url}/healthz")
        for proc in workers.values():
            _wait_worker(proc)
        cluster = Cluster(apis=apis, workers=workers, creds=creds, settings=settings, tmp=tmp)
        with cluster.http:
            yield cluster
    finally:
        for proc in [*workers.values(), *procs]:
            proc.stop()


def _socket(url: str, token: str) -> list[dict[str, Any]]:
    frames = []
    with connect(url.replace("http://", "ws://") + "/v1", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        while True:
            frame = json.loads(ws.recv(timeout=120))
            frames.append(frame)
            if frame["type"] in ("task_postprocess_end", "task_cancel"):
                return frames


def test_submit_on_one_replica_follow_on_the_other_and_download_from_s3(cluster: Cluster) -> None:
    run = cluster.run(0, prompt="across replicas", maxImages=2)
    frames = _socket(cluster.apis[1], run["socketaccesstoken"])
    types = [f["type"] for f in frames]
    assert types[0] == "task_queue" and types[-1] == "task_postprocess_end"
    assert "task_start" in types and types.count("task_output") >= 40
    task = cluster.detail(1, run["taskid"])
    assert task["pexit"] == "0" and len(task["outputs"]) == 2
    # The final frame lists the same outputs as Detail, public URLs included: the replica renders them, not the
    # worker (whose own base_url, http://127.0.0.1:8000 here, no client could reach).
    assert frames[-1]["message"] == task["outputs"]
    assert all(item["url"].startswith(cluster.apis[1] + "/v1/File/") for item in frames[-1]["message"])
    # A socket that registers after the end replays everything, on either replica, with that replica's URLs.
    replayed = _socket(cluster.apis[0], run["socketaccesstoken"])
    assert [f["type"] for f in replayed] == types
    assert replayed[-1]["message"] == cluster.detail(0, run["taskid"])["outputs"]
    # Output URLs redirect to a presigned S3 URL; no credentials needed anywhere.
    first = httpx.get(task["outputs"][0]["url"], follow_redirects=False)
    assert first.status_code == 307 and "X-Amz-Signature" in first.headers["location"]
    image = httpx.get(task["outputs"][0]["url"], follow_redirects=True)
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (1024, 1024)


def test_cancel_and_kill_across_hosts(cluster: Cluster) -> None:
    # Three shapes, so that no two of them can share a batch: one runs on each worker, the third waits.
    running = [cluster.run(0, prompt=f"busy {i}", size=size) for i, size in enumerate(["1K", "1024x1152"])]
    queued = cluster.run(0, prompt="waits", size="1152x1024")
    for run in running:
        cluster.wait_progress(1, run["taskid"])
    assert cluster.detail(1, queued["taskid"])["status"] == "task_queue"
    cancelled = cluster.post(1, "/v1/Task/Cancel", json={"taskid": queued["taskid"]})
    assert cancelled["tasklist"][0]["status"] == "task_cancel"
    killed = cluster.post(1, "/v1/Task/Kill", json={"taskid": running[0]["taskid"]})
    assert killed["tasklist"][0]["status"] == "task_cancel" and killed["tasklist"][0]["pexit"] == "137"
    stopped = cluster.post(0, "/v1/Task/Cancel", json={"taskid": running[1]["taskid"]})
    assert stopped["tasklist"][0]["status"] == "task_cancel" and stopped["tasklist"][0]["pexit"] == "130"
    after = cluster.run(1, prompt="after kill")
    assert cluster.wait(0, after["taskid"])["pexit"] == "0"
    assert cluster.detail(0, queued["taskid"])["starttime"] == "0"


def test_priority_then_projects_in_turn_in_batches(cluster: Cluster) -> None:
    """A Celery message is a turn: the worker claims as the embedded queue does (priority, then projects in turn),
    with the same-shape tasks that batch with it, whatever order Redis hands the messages out in."""
    other = create_project(cluster.settings, "scaleout-other", signature=True)
    # No worker serves this model yet: the tasks wait in its queue, then one worker (batches of 2) drains it.
    lows = [cluster.run(0, model=PRIORITY_MODEL, prompt=f"low {i}") for i in range(4)]
    others = [cluster.run(0, model=PRIORITY_MODEL, prompt=f"other {i}", creds=other) for i in range(2)]
    high = cluster.run(1, model=PRIORITY_MODEL, prompt="high", priority=9)
    time.sleep(1.0)  # let a replica dispatch them all
    spec = ModelSpec(engine=SCRIPTED, max_pixels=64 * 64, steps=2, max_batch=2)
    worker = _worker(cluster.tmp, "prio", PRIORITY_MODEL, spec)
    try:
        _wait_worker(worker)
        for run in [high, *lows]:
            assert cluster.wait(0, run["taskid"])["pexit"] == "0"
        for run in others:
            assert cluster.wait(0, run["taskid"], creds=other)["pexit"] == "0"
    finally:
        worker.stop()
    accepted = _db(f"SELECT id FROM tasks WHERE model = '{PRIORITY_MODEL}' ORDER BY accepttime, id")
    a, b = [r["taskid"] for r in lows], [r["taskid"] for r in others]
    # The other project's tasks take turns with the first project's (as FIFO messages they would run last), each
    # claim with a companion of the same shape: [high + b0], [a0 + b1], [a1 + a2], [a3].
    assert [str(row[0]) for row in accepted] == [high["taskid"], b[0], a[0], b[1], a[1], a[2], a[3]]
    # Shared pipeline calls show in details.batched_with, which names only the reader's own tasks.
    assert [str(t) for t in cluster.detail(0, a[1])["details"]["batched_with"]] == [a[2]]
    assert cluster.detail(0, a[0])["details"]["batched_with"] == []


def test_a_worker_killed_mid_task_is_replaced_by_the_other(cluster: Cluster) -> None:
    run = cluster.run(0, prompt="survives its worker")
    cluster.wait_progress(1, run["taskid"])
    holder = str(_db(f"SELECT worker_id FROM tasks WHERE id = {int(run['taskid'])}")[0][0])
    victim = next(p for p in cluster.workers.values() if p.process and f":{p.process.pid}:" in holder)
    victim_pid = victim.process.pid if victim.process else -1
    victim.stop(signal.SIGKILL)
    done = cluster.wait(0, run["taskid"], timeout=120)
    assert done["pexit"] == "0", done["debugerror"]
    assert done["attempts"] == "2" and "was lost" in done["debugerror"]
    # Clients are not shown which host ran a task (details.worker is private); the victim died by SIGKILL
    # before the second attempt, so the other worker finished it.
    assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
    # Bring the worker back for any test that follows.
    spec = ModelSpec(engine=SCRIPTED, max_pixels=320 * 320, steps=40)
    cluster.workers[victim.name] = _worker(cluster.tmp, victim.name, MODEL, spec)
    _wait_worker(cluster.workers[victim.name])


def _db(sql: str) -> list[Any]:
    """Read what is not on the wire (lease holders, exact times) straight from PostgreSQL."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def read() -> list[Any]:
        assert POSTGRES
        engine = create_async_engine(POSTGRES)
        try:
            async with engine.connect() as connection:
                return list((await connection.execute(text(sql))).all())
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_input_output_delete_on_s3_takes_the_objects_and_every_url(cluster: Cluster) -> None:
    """Issue 30 item 2 on S3: the object goes with the row, so the route and the presigned URL it redirected to
    both answer 404 at once."""
    run = cluster.run(0, prompt="deleted from the bucket")
    task = cluster.wait(0, run["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    url = task["outputs"][0]["url"]
    redirect = httpx.get(url, follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["cache-control"] == "no-store"
    presigned = redirect.headers["location"]
    assert httpx.get(presigned).status_code == 200
    answer = cluster.post(1, "/v1/Task/InputOutputDelete", json={"taskid": run["taskid"]})
    assert answer == {"result": True, "errors": []}
    assert httpx.get(url).status_code == 404 and httpx.get(presigned).status_code == 404
    assert cluster.detail(0, run["taskid"])["outputs"] == []
