"""Faults under load: the server and the model process are killed with SIGKILL at random moments while
tasks stream in, and afterwards every task has ended exactly once, in Wiro's order, with its files whole.

The default run submits 60 tasks to the scripted model process and kills the server once and the model process
three times; the ``slow`` variant (``DREAMSERVE_SLOW=1``) submits 200 to the tiny diffusers pipeline with 3 and 5
kills. ``DREAMSERVE_CHAOS_TASKS`` and
``DREAMSERVE_CHAOS_SEED`` change the default run's count and the seed, and ``DREAMSERVE_CHAOS_REPORT=<path>``
writes the figures (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from tests.conftest import MODEL, SCRIPTED, Server, png_bytes, until

LIFECYCLE = [
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_assign",
    "task_start",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
    "task_cancel",
]
TERMINAL = {"task_postprocess_end", "task_cancel"}
# Events that are not status changes (task_output_image: one image saved, for Ark streams).
LOGS = {"task_output", "task_output_full", "task_error", "task_error_full", "task_output_image"}
SUCCESS_PATH = [
    "task_accept",
    "task_assign",
    "task_start",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
]
SIZES = [(64, 64), (96, 64), (64, 96)]

log = logging.getLogger(__name__)


@dataclass
class Chaos:
    server: Server
    rng: random.Random
    count: int
    server_kills: int
    child_kills: int
    submitted: list[str] = field(default_factory=list)
    submit_errors: int = 0
    #: Submits answered 429 (the project's unfinished-task cap) and sent again.
    quota_waits: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    #: (seconds since start, what, seconds it took) per kill, for the report.
    timeline: list[tuple[float, str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def submit_all(self) -> None:
        with httpx.Client(timeout=10) as client:  # reconnects by itself after a server kill
            self._submit_all(client)

    def _submit_all(self, client: httpx.Client) -> None:
        for index in range(self.count):
            width, height = self.rng.choice(SIZES)
            data: dict[str, Any] = {
                "prompt": f"chaos {index}",
                "size": f"{width}x{height}",
                "maxImages": str(self.rng.choice([1, 1, 1, 2])),
            }
            files = None
            if index % 10 == 3:  # some tasks with a reference: they run alone, with preprocessing
                files = [("inputImage", ("ref.png", png_bytes(80, 80), "image/png"))]
            while True:
                try:
                    with self.lock:
                        headers = self.server.headers()
                        url = self.server.url
                    response = client.post(f"{url}/v1/Run/{MODEL}", headers=headers, data=data, files=files)
                    body = response.json()
                    if response.status_code == 429:
                        # The project's queue is at its cap (200 tasks outrun a server that keeps being killed):
                        # wait as told, as a client would, and send it again.
                        assert body["errors"][0]["code"] == 96, body
                        self.quota_waits += 1
                        time.sleep(min(float(response.headers.get("retry-after", 1)), 2.0))
                        continue
                    assert body["result"] is True, body
                    self.submitted.append(body["taskid"])
                    break
                except (httpx.HTTPError, json.JSONDecodeError):
                    # The server is down (or died mid-request: the task may exist even so; the DB has the truth).
                    self.submit_errors += 1
                    time.sleep(0.2)
            time.sleep(self.rng.uniform(0.0, 0.12))

    def kill_at_random(self, span: float) -> None:
        """Kill the server or the model process at random moments within ``span`` seconds."""
        plan = ["server"] * self.server_kills + ["child"] * self.child_kills
        self.rng.shuffle(plan)
        for what in plan:
            time.sleep(self.rng.uniform(0.3, 2 * span / len(plan)))
            at = time.monotonic()
            if what == "server":
                with self.lock:
                    self.server.stop(signal.SIGKILL)
                    self.kills["server"] += 1
                    self.server.start()  # back when /readyz says the model is loaded
            else:
                pid = self._child_pid()
                if pid is None:
                    continue
                os.kill(pid, signal.SIGKILL)
                self.kills["child"] += 1
            self.timeline.append((round(at - self.started, 1), what, round(time.monotonic() - at, 1)))

    def _child_pid(self) -> int | None:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=5) as client:  # one client: a new one per poll costs CPU the server needs
            while time.monotonic() < deadline:
                try:
                    workers = client.get(f"{self.server.url}/healthz").json()["workers"]
                except httpx.HTTPError:
                    workers = []
                pid = workers[0]["pid"] if workers else None
                if pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return int(pid)
                time.sleep(0.1)
        return None


def _wait_all_terminal(db: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending: list[Any] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(db, timeout=30) as conn:
            pending = conn.execute(
                "SELECT id, status FROM tasks WHERE status NOT IN ('task_postprocess_end', 'task_cancel')"
            ).fetchall()
        if not pending:
            return
        time.sleep(0.1)
    raise AssertionError(f"{len(pending)} tasks never ended: {pending[:10]}")


def check_invariants(server: Server, submitted: list[str]) -> dict[str, Any]:
    """Every task ended exactly once, in order, with its outputs whole. Returns the figures."""
    db = server.settings.data_dir / "dreamserve.db"
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    tasks = {row["id"]: row for row in conn.execute("SELECT * FROM tasks")}
    events: dict[int, list[str]] = {task_id: [] for task_id in tasks}
    for row in conn.execute("SELECT task_id, type FROM task_events ORDER BY id"):
        events[row["task_id"]].append(row["type"])
    outputs: dict[int, list[Any]] = {task_id: [] for task_id in tasks}
    for row in conn.execute("SELECT * FROM files WHERE role = 'output' ORDER BY task_id, position"):
        outputs[row["task_id"]].append(row)
    conn.close()

    assert {int(t) for t in submitted} <= set(tasks), "every accepted task is stored"
    pexits: Counter[str] = Counter()
    requeued = 0
    for task_id, task in tasks.items():
        log = events[task_id]
        terminal = [e for e in log if e in TERMINAL]
        assert len(terminal) == 1, (task_id, log)
        assert log[0] == "task_queue" and log[-1] == terminal[0] == task["status"], (task_id, log)
        # Between re-queues, statuses only move forward in Wiro's order.
        attempts: list[list[str]] = []
        for event in log:
            if event == "task_queue":
                attempts.append([])
            elif event not in LOGS:
                attempts[-1].append(event)
        for attempt in attempts:
            order = [LIFECYCLE.index(e) for e in attempt]
            assert order == sorted(set(order)), (task_id, log)
        requeued += len(attempts) - 1
        assert task["attempts"] <= server.settings.max_attempts, (task_id, task["attempts"])
        pexits[task["pexit"]] += 1
        job = json.loads(task["job"])
        files = outputs[task_id]
        if task["pexit"] == "0":
            last = attempts[-1]
            assert [e for e in last if e in SUCCESS_PATH] == SUCCESS_PATH, (task_id, log)
            assert "task_output" in log[len(log) - 1 - log[::-1].index("task_queue") :], (task_id, log)
            assert len(files) == job["num_images"], (task_id, len(files))
            for file in files:
                path = server.settings.blob_dir / file["blob_key"]
                assert ".tmp" not in file["blob_key"] and path.is_file(), file["blob_key"]
                assert path.stat().st_size == file["size"], file["blob_key"]
                with Image.open(path) as image:
                    assert image.format == "PNG" and image.size == (job["width"], job["height"])
                    image.load()  # decodes whole: no truncated file
        else:
            assert task["pexit"] in {"1", "2", "3"}, (task_id, task["pexit"], task["debugerror"])
            assert task["debugerror"].strip() and files == [], task_id
    written = [p for p in (server.settings.blob_dir / "outputs").rglob("*") if p.is_file()]
    referenced = {str(server.settings.blob_dir / f["blob_key"]) for rows in outputs.values() for f in rows}
    return {
        "tasks": len(tasks),
        "pexit": dict(sorted(pexits.items())),
        "requeued_attempts": requeued,
        "events": sum(len(log) for log in events.values()),
        "output_files": len(referenced),
        "unreferenced_files": len([p for p in written if str(p) not in referenced]),
        "temp_files_left": len([p for p in written if p.name.startswith(".tmp")]),
    }


#: The default run's model process: the scripted engine (the real child, pipe and PNG files; no torch), so each of
#: its restarts costs a second, not torch's imports. The slow run keeps the tiny diffusers pipeline.
SCRIPTED_CHAOS: dict[str, Any] = {"engine": SCRIPTED, "steps": 4}


def run_chaos(
    make_server: Any, count: int, server_kills: int, child_kills: int, model: dict[str, Any] | None = None
) -> dict[str, Any]:
    seed = int(os.environ.get("DREAMSERVE_CHAOS_SEED", random.randrange(1 << 30)))
    log.info("chaos seed %s", seed)  # shown with a failure; reproduce it with DREAMSERVE_CHAOS_SEED
    env = {"DREAMSERVE_SCRIPTED_STEP_SECONDS": "0.02"}
    spec = {"max_pixels": 64 * 64, "max_batch": 4, **(model or {})}
    server = make_server(model=spec, min_pixels=64 * 64, env=env)
    chaos = Chaos(server, random.Random(seed), count, server_kills, child_kills)
    started = time.monotonic()
    submitter = threading.Thread(target=chaos.submit_all)
    submitter.start()
    chaos.kill_at_random(span=count * 0.07)
    submitter.join()
    _wait_all_terminal(server.settings.data_dir / "dreamserve.db", timeout=120)
    seconds = time.monotonic() - started
    server.stop()
    figures = check_invariants(server, chaos.submitted)
    figures.update(
        seed=seed,
        submitted=len(chaos.submitted),
        submit_retries=chaos.submit_errors,
        quota_waits=chaos.quota_waits,
        kills=dict(chaos.kills),
        timeline=chaos.timeline,
        seconds=round(seconds, 1),
    )
    log.info("chaos figures %s", json.dumps(figures))
    report = os.environ.get("DREAMSERVE_CHAOS_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2))
    assert chaos.kills["server"] == server_kills and chaos.kills["child"] >= 1
    return figures


def test_kill_server_and_model_process_during_a_stream_of_tasks(make_server: Any) -> None:
    count = int(os.environ.get("DREAMSERVE_CHAOS_TASKS", 60))
    run_chaos(make_server, count, server_kills=1, child_kills=3, model=SCRIPTED_CHAOS)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DREAMSERVE_SLOW"), reason="set DREAMSERVE_SLOW=1 to run (a few minutes)")
def test_kill_during_a_stream_of_200_tasks(make_server: Any) -> None:
    run_chaos(make_server, 200, server_kills=3, child_kills=5)


#: The two tests below run on the scripted model process in-process (the real supervisor, pipe and heartbeats).
BEATING = {"model": {"max_pixels": 64 * 64, "max_batch": 4}, "min_pixels": 64 * 64, "heartbeat_seconds": 0.02}


def test_model_process_killed_while_idle_is_replaced(scripted: Any) -> None:
    server = scripted(**BEATING)
    pid = server.workers()[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    # Until the supervisor has seen it die (it is restarting, or already has a new one).
    until(lambda: server.workers()[0]["state"] != "ready" or server.workers()[0]["pid"] != pid, "the death noticed")
    for index in range(2):
        task = server.wait(server.run({"prompt": f"after the kill {index}", "size": "64x64"})["taskid"])
        assert task["pexit"] == "0", task["debugerror"]
    assert server.workers()[0]["pid"] != pid


def test_frequent_heartbeats_do_not_kill_a_batch(scripted: Any) -> None:
    """Heartbeats every 20 ms make the race of 'task ended' and 'heartbeat' certain within a few batches."""
    server = scripted(**BEATING)
    pid = server.workers()[0]["pid"]
    runs = [server.run({"prompt": f"batch {index}", "size": "64x64"}) for index in range(24)]
    tasks = [server.wait(run["taskid"]) for run in runs]
    assert [task["pexit"] for task in tasks] == ["0"] * len(runs), {t["pexit"]: t["debugerror"] for t in tasks}
    assert server.workers()[0]["pid"] == pid, "the model process was never killed"
