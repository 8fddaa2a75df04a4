"""The task lifecycle as a state machine (hypothesis): random sequences of submits, claims by two workers, steps,
successes, failures, cancels of queued and running tasks, refunded re-queues and lost workers, run against the
real ``TaskStore`` on SQLite, and checked after every step against a model of what each task must be.

What must hold whatever the order: a task is held by at most the one worker that claimed it, and only that
worker's transitions move it; the claim takes the highest priority first; a lost worker's task is queued again
until it has been started ``max_attempts`` times, then given up; an ended task never moves again; its event log
starts with ``task_queue`` and holds exactly one terminal event, last.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dreamserve.jobs import TaskJob
from dreamserve.queue.db import Project
from dreamserve.queue.migrate import upgrade
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import FINAL, RUNNING, Pexit, StopKind, TaskStatus

MODEL = "bytedance/seedream-v4"
WORKERS = ("host:1:model:0", "host:2:model:0")
MAX_ATTEMPTS = 2
T = TypeVar("T")


@dataclass
class Expected:
    priority: int
    #: None while queued; the worker holding it while claimed; "" once ended.
    worker: str | None = None
    attempts: int = 0
    started: bool = False
    pexit: str | None = None

    @property
    def queued(self) -> bool:
        return self.worker is None and self.pexit is None


_TEMPLATE: list[Path] = []


async def template() -> Path:
    """A database with the current schema and project 1, made once per test session."""
    if not _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="dreamserve-lifecycle-template-"))
        services = Services(Settings(data_dir=folder, models={MODEL: ModelSpec(workers=0)}), workers="none")
        await upgrade(services.engine)
        async with services.sessions.begin() as session:
            session.add(Project(id=1, name="p", api_key_hash="h", api_key_prefix="k", created=0.0))
        await services.engine.dispose()
        _TEMPLATE.append(folder / "dreamserve.db")
    return _TEMPLATE[0]


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="dreamserve-lifecycle-"))
        self.loop = asyncio.new_event_loop()
        # A copy of a database migrated once: examples (and hypothesis' shrinking) start in milliseconds.
        shutil.copy(self.run(template()), self.folder / "dreamserve.db")
        self.services = Services(Settings(data_dir=self.folder, models={MODEL: ModelSpec(workers=0)}), workers="none")
        self.store = self.services.store
        self.tasks: dict[int, Expected] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.services.engine.dispose())
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def held_by(self, worker: str) -> list[int]:
        return sorted(i for i, task in self.tasks.items() if task.worker == worker)

    # -- rules ------------------------------------------------------------------------------------------

    @rule(priority=st.integers(0, 2))
    def submit(self, priority: int) -> None:
        job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1)
        task = self.run(
            self.store.create(project_id=1, model=MODEL, job=job, callback_url="", priority=priority, inputs=[])
        )
        self.tasks[task.id] = Expected(priority)

    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        claimed = self.run(self.store.claim_next(worker, [MODEL], 30.0))
        queued = [i for i, task in self.tasks.items() if task.queued]
        if not queued:
            assert claimed is None
            return
        assert claimed is not None and claimed.id in queued
        assert self.tasks[claimed.id].priority == max(self.tasks[i].priority for i in queued)
        expected = self.tasks[claimed.id]
        expected.worker, expected.attempts, expected.started = worker, expected.attempts + 1, False

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 99))
    def start(self, worker: str, pick: int) -> None:
        held = self.held_by(worker)
        if held:
            task_id = held[pick % len(held)]
            assert self.run(self.store.assign(task_id, worker)) and self.run(self.store.start(task_id, worker))
            self.tasks[task_id].started = True

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 99))
    def another_worker_cannot_move_it(self, worker: str, pick: int) -> None:
        others = sorted(i for i, t in self.tasks.items() if t.worker not in (None, "", worker))
        if others:
            task_id = others[pick % len(others)]
            assert not self.run(self.store.start(task_id, worker))
            assert not self.run(self.store.succeed(task_id, worker, [], "", {}))
            assert not self.run(self.store.cancel(task_id, StopKind.CANCEL, worker))

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 99), how=st.sampled_from(["succeed", "fail", "stop"]))
    def end(self, worker: str, pick: int, how: str) -> None:
        held = self.held_by(worker)
        if not held:
            return
        task_id = held[pick % len(held)]
        if how == "succeed":
            assert self.run(self.store.succeed(task_id, worker, [], "done", {}))
            pexit = Pexit.OK
        elif how == "fail":
            assert self.run(self.store.fail(task_id, Pexit.FAILED, "boom", expect=RUNNING, worker_id=worker))
            pexit = Pexit.FAILED
        else:
            assert self.run(self.store.cancel(task_id, StopKind.KILL, worker))
            pexit = Pexit.KILLED
        self.tasks[task_id].worker, self.tasks[task_id].pexit = "", pexit

    @rule(pick=st.integers(0, 99))
    def cancel_queued(self, pick: int) -> None:
        if not self.tasks:
            return
        task_id = sorted(self.tasks)[pick % len(self.tasks)]
        cancelled = self.run(self.store.cancel_queued(task_id))
        assert (cancelled is not None) == self.tasks[task_id].queued
        if cancelled is not None:
            self.tasks[task_id].worker, self.tasks[task_id].pexit = "", Pexit.CANCELLED

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 99))
    def requeue_refunded(self, worker: str, pick: int) -> None:
        # The model process was gone before the task reached it: the attempt does not count.
        held = self.held_by(worker)
        if held:
            task_id = held[pick % len(held)]
            assert self.run(self.store.requeue(task_id, "gone", worker, refund=True))
            expected = self.tasks[task_id]
            expected.worker, expected.attempts = None, expected.attempts - 1

    @precondition(lambda self: any(t.worker in WORKERS for t in self.tasks.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def worker_lost(self, worker: str) -> None:
        recovered = self.run(self.store.reap(lambda worker_id: worker_id != worker, MAX_ATTEMPTS))
        assert sorted(recovered) == self.held_by(worker)
        for task_id in recovered:
            expected = self.tasks[task_id]
            if expected.attempts < MAX_ATTEMPTS:
                expected.worker = None
            else:
                expected.worker, expected.pexit = "", Pexit.GAVE_UP

    # -- what always holds ---------------------------------------------------------------------------------

    @invariant()
    def rows_match_the_model(self) -> None:
        for task_id, expected in self.tasks.items():
            row = self.run(self.store.get_by_id(task_id))
            assert row is not None
            assert row.attempts == expected.attempts <= MAX_ATTEMPTS
            if expected.queued:
                assert row.status == TaskStatus.QUEUE and row.worker_id is None
            elif expected.pexit is None:
                assert row.status in RUNNING and row.worker_id == expected.worker
                assert (row.status == TaskStatus.START) == expected.started
            else:
                assert row.status in FINAL and row.pexit == expected.pexit and row.worker_id is None

    @invariant()
    def logs_start_queued_and_end_once(self) -> None:
        for task_id, expected in self.tasks.items():
            types = [event.type for event in self.run(self.store.events(task_id))]
            assert types[0] == TaskStatus.QUEUE
            ends = [i for i, kind in enumerate(types) if kind in FINAL]
            assert ends == ([len(types) - 1] if expected.pexit is not None else []), types


Lifecycle.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_task_lifecycle = Lifecycle.TestCase
