"""The group commit of running tasks' steps (``queue/steps.py``), with a fake writer: order, settling, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dreamserve.facts import Progress
from dreamserve.queue.steps import Step, StepWriter


class Recorder:
    """A writer that records each transaction's steps; ``failing`` transactions of several steps raise."""

    def __init__(self, failing: bool = False) -> None:
        self.transactions: list[list[int]] = []
        self.alone: list[int] = []
        self.failing = failing

    async def write_all(self, take: Callable[[], list[Step]]) -> list[bool]:
        await asyncio.sleep(0.01)  # waiting for the writer: steps posted meanwhile join this transaction
        steps = take()
        if self.failing and len(steps) > 1:
            raise RuntimeError("the shared transaction failed")
        self.transactions.append([step.progress.step for step in steps if step.progress])
        return [step.task_id != 13 for step in steps]

    async def write_one(self, step: Step) -> bool:
        assert step.progress is not None
        self.alone.append(step.progress.step)
        return True


def step(task_id: int, number: int) -> Step:
    return Step(task_id, "w", progress=Progress(step=number, total=100, elapsed=0.1))


async def test_steps_are_written_together_in_the_order_posted_and_each_gets_its_guard() -> None:
    recorder = Recorder()
    writer = StepWriter(recorder.write_all, recorder.write_one, tick=0.02)
    written = [writer.post(step(task_id, n)) for n in range(1, 4) for task_id in (12, 13)]
    await writer.settle(12)
    await writer.settle(13)
    assert recorder.transactions == [[1, 1, 2, 2, 3, 3]]
    assert [future.result() for future in written] == [True, False] * 3  # task 13 is not the worker's any more


async def test_settle_waits_for_the_steps_posted_before_it_not_for_those_that_keep_coming() -> None:
    """A running task posts steps without end; a transition of it (a kill) must not wait for them all."""
    recorder = Recorder()
    writer = StepWriter(recorder.write_all, recorder.write_one, tick=0.02)
    posting = True

    async def run() -> None:
        number = 0
        while posting:
            number += 1
            writer.post(step(12, number))
            await asyncio.sleep(0.001)

    runner = asyncio.create_task(run())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(writer.settle(12), 1.0)
    posting = False
    await runner
    await writer.close()
    steps = [number for transaction in recorder.transactions for number in transaction]
    assert steps == list(range(1, len(steps) + 1))


async def test_a_failed_shared_transaction_writes_each_step_alone() -> None:
    recorder = Recorder(failing=True)
    writer = StepWriter(recorder.write_all, recorder.write_one, tick=0.02)
    written = [writer.post(step(12, n)) for n in (1, 2, 3)]
    await writer.settle(12)
    assert recorder.alone == [1, 2, 3] and all(future.result() for future in written)
