"""The task vocabulary, one leaf module (stdlib only): Wiro's statuses and socket frames, exit codes, stop kinds,
worker states.

The enums are ``StrEnum``s, so a member equals the string stored in the database and sent on the wire
(``TaskStatus.CANCEL == "task_cancel"``, ``Pexit.CANCELLED == "130"``); the client, the CLI and the server import
them from here, and the playground gets them from the server (``/v1/playground/config``).
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """A task's ``status`` (api-spec.md §1.7), in Wiro's order. Each change is also a socket frame of that type."""

    QUEUE = "task_queue"
    ACCEPT = "task_accept"
    PREPROCESS_START = "task_preprocess_start"
    PREPROCESS_END = "task_preprocess_end"
    ASSIGN = "task_assign"
    START = "task_start"
    END = "task_end"
    POSTPROCESS_START = "task_postprocess_start"
    POSTPROCESS_END = "task_postprocess_end"
    CANCEL = "task_cancel"
    #: Wiro's status for a fatal pre-run failure; dreamserve never stores it (its failures end in
    #: ``task_postprocess_end`` with a non-zero ``pexit``), clients treat it as terminal.
    ERROR = "task_error"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def holds_lease(self) -> bool:
        """A worker has claimed the task and renews its lease (accepted up to post-processing)."""
        return self in RUNNING


_TERMINAL = frozenset({TaskStatus.POSTPROCESS_END, TaskStatus.CANCEL, TaskStatus.ERROR})
#: The statuses of a task a worker holds (and renews the lease of).
RUNNING = frozenset(
    {
        TaskStatus.ACCEPT,
        TaskStatus.PREPROCESS_START,
        TaskStatus.PREPROCESS_END,
        TaskStatus.ASSIGN,
        TaskStatus.START,
        TaskStatus.END,
        TaskStatus.POSTPROCESS_START,
    }
)
#: The statuses a task goes through, in order (``task_error`` is not one of them).
LIFECYCLE: tuple[TaskStatus, ...] = tuple(s for s in TaskStatus if s is not TaskStatus.ERROR)
#: The frames after which a task's socket closes: the statuses dreamserve ends a task with. Not ``task_error``,
#: which as a frame is a stderr line.
FINAL = frozenset({TaskStatus.POSTPROCESS_END, TaskStatus.CANCEL})


#: What the CLI and the playground show for each status.
LABELS: dict[TaskStatus, str] = {
    TaskStatus.QUEUE: "queued",
    TaskStatus.ACCEPT: "accepted",
    TaskStatus.PREPROCESS_START: "fetching inputs",
    TaskStatus.PREPROCESS_END: "inputs ready",
    TaskStatus.ASSIGN: "loading model",
    TaskStatus.START: "generating",
    TaskStatus.END: "finishing",
    TaskStatus.POSTPROCESS_START: "saving",
    TaskStatus.POSTPROCESS_END: "done",
    TaskStatus.CANCEL: "cancelled",
}


class Frame(StrEnum):
    """Socket frames and logged events that are not status changes."""

    #: Registration, sent by the client: ``{"type": "task_info", "tasktoken": ...}``.
    INFO = "task_info"
    #: A progress object (a stdout write).
    OUTPUT = "task_output"
    #: A stderr write: an interim log line, not a failure.
    ERROR = "task_error"
    OUTPUT_FULL = "task_output_full"
    ERROR_FULL = "task_error_full"
    #: Ours, not Wiro's: one image of a running task is saved (or failed), ``{"index", "name" | "error"}``, logged
    #: for followers (Ark's stream sends it on); Wiro's socket does not send it, as Wiro has no such frame.
    OUTPUT_IMAGE = "task_output_image"


class Pexit(StrEnum):
    """``pexit``, the model process's exit code as Wiro reports it (a string)."""

    OK = "0"
    #: The model failed (its traceback is in ``task_error_full``) or its process died.
    FAILED = "1"
    #: An input could not be fetched or read.
    BAD_INPUT = "2"
    #: The task's worker died ``max_attempts`` times.
    GAVE_UP = "3"
    #: Stopped by Task/Cancel (SIGINT's 128 + 2).
    CANCELLED = "130"
    #: Stopped by Task/Kill (SIGKILL's 128 + 9).
    KILLED = "137"


class WorkerState(StrEnum):
    """A model worker's state, as ``/healthz`` reports it; ``/readyz`` waits for every worker to be loaded."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    #: A new model process is loading in place of one that was killed or died (``Supervisor.restart_reason``).
    RESTARTING = "restarting"
    DEFUNCT = "defunct"

    @property
    def is_loaded(self) -> bool:
        return self in (WorkerState.READY, WorkerState.BUSY)


class StopKind(StrEnum):
    """What Task/Cancel and Task/Kill ask of a task (``tasks.stop_requested``; "" is none)."""

    CANCEL = "cancel"
    KILL = "kill"
