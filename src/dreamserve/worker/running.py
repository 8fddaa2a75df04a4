"""What a supervisor knows of each task it runs now, and the moves that task may make.

A claimed task is PREPARING (its references go to local disk, its job is built), then SENT (the model process
has it), and SETTLED once its end is recorded, or once it is another worker's (its lease was lost). Many things
race to end a task (a stop, the model's outcome, a dying model process, a lost lease); ``settle`` lets exactly
one of them record it. A move out of order is a bug, and raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from dreamserve.jobs import GenerationJob, TaskJob
from dreamserve.queue.db import File, Task
from dreamserve.status import StopKind


class Phase(Enum):
    PREPARING = "preparing"
    SENT = "sent"
    SETTLED = "settled"


_MOVES = {Phase.PREPARING: {Phase.SENT, Phase.SETTLED}, Phase.SENT: {Phase.SETTLED}, Phase.SETTLED: set()}


@dataclass
class RunningTask:
    """A claimed task while a supervisor runs it."""

    task: Task
    #: Its stored job, read (and validated) once at the claim.
    stored: TaskJob
    #: Blob-store folder of its outputs.
    folder: str = ""
    #: What the model process runs, once its references are on local disk.
    job: GenerationJob | None = None
    #: Its output log (``debugoutput``): the notes made at Run, then one line per step.
    log: list[str] = field(default_factory=list)
    #: What was asked of this task, if anything.
    stop: StopKind | None = None
    #: The reaper gave it to another worker: nothing more is recorded for it here.
    lost: bool = False
    #: Position in the group sent to the model process.
    index: int = 0
    #: Output rows recorded as each image was saved (``partial`` until the task succeeds), by file name.
    partial: dict[str, File] = field(default_factory=dict)
    phase: Phase = Phase.PREPARING

    @property
    def id(self) -> int:
        return self.task.id

    @property
    def settled(self) -> bool:
        return self.phase is Phase.SETTLED

    @property
    def preparing(self) -> bool:
        return self.phase is Phase.PREPARING

    def sent(self, index: int) -> GenerationJob:
        """It is handed to the model process as member ``index`` of the group; returns its job."""
        if self.job is None:
            raise RuntimeError(f"task {self.id} is sent before its job was built")
        self._move(Phase.SENT)
        self.index = index
        return self.job

    def settle(self) -> bool:
        """Take the right to record the task's end: True the first time, False once it has ended."""
        if self.settled:
            return False
        self._move(Phase.SETTLED)
        return True

    def lose(self) -> bool:
        """Its lease is lost (the reaper re-queued it): settled without recording anything; False if it had ended."""
        self.lost = self.settle()
        return self.lost

    def _move(self, phase: Phase) -> None:
        if phase not in _MOVES[self.phase]:
            raise RuntimeError(f"task {self.id} cannot move from {self.phase.value} to {phase.value}")
        self.phase = phase
