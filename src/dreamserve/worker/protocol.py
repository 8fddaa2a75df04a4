"""The messages between a supervisor and its model process: small frozen dataclasses, pickled by the
``multiprocessing`` pipe and dispatched with ``match`` on either side (see ``child.py`` for the exchange).

Only stdlib and the records of ``jobs.py`` cross the pipe, so the supervisor never needs torch to read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamserve.jobs import FailedImage, GeneratedImage, GenerationJob, GenerationResult
from dreamserve.logs import Log

# -- supervisor -> model process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run one job (text-to-image, or editing with its references)."""

    job: GenerationJob


@dataclass(frozen=True)
class RunGroup:
    """Run same-shape jobs of several tasks in shared pipeline calls; they are numbered by their place here."""

    jobs: tuple[GenerationJob, ...]


@dataclass(frozen=True)
class Stop:
    """Stop member ``job`` of the running group at its next step (the others go on); ignored between jobs."""

    job: int


@dataclass(frozen=True)
class Exit:
    """Leave the loop and end the process."""


ToChild = Run | RunGroup | Stop | Exit


# -- model process -> supervisor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The model is loaded; the process takes jobs."""

    load_seconds: float


@dataclass(frozen=True)
class Fatal:
    """The model could not be loaded; the process ends."""

    message: str


@dataclass(frozen=True)
class Started:
    """A ``Run`` or ``RunGroup`` was received and runs now."""


@dataclass(frozen=True)
class Step:
    """A denoising step of job ``job``: ``step`` of ``total`` over all its batches, with a preview on some steps
    (a ``data:image/jpeg;base64,...`` URI)."""

    job: int
    step: int
    total: int
    elapsed: float
    preview: str | None = None


@dataclass(frozen=True)
class ImageSaved:
    """One image of job ``job`` is finished and saved, as soon as it is (before the job ends)."""

    job: int
    image: GeneratedImage


@dataclass(frozen=True)
class ImageFailed:
    """One image of job ``job`` could not be finished; the job's other images still come."""

    job: int
    failed: FailedImage


@dataclass(frozen=True)
class JobCanceled:
    """Member ``job`` of the running group was stopped by a ``Stop``: it gets no more images."""

    job: int


@dataclass(frozen=True)
class Done:
    """A job's outcome: its result."""

    result: GenerationResult


@dataclass(frozen=True)
class Canceled:
    """A job's outcome: stopped on request (the shared stop event, or a ``Stop`` of a group member)."""


@dataclass(frozen=True)
class Error:
    """A job's outcome: the model failed. The text and traceback are for the supervisor's log; only the kind (the
    exception's class name) reaches the client, with an error id."""

    kind: str
    message: str
    traceback: str


#: What a job ended with.
Outcome = Done | Canceled | Error


@dataclass(frozen=True)
class GroupDone:
    """A ``RunGroup`` ended: one outcome per job, in order."""

    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True)
class Gone:
    """Not sent by the child: the supervisor's reader says so when the pipe closed (the process ended)."""


#: Everything the supervisor's reader hands on (``Log`` records are replayed into its log instead).
FromChild = (
    Ready
    | Fatal
    | Started
    | Step
    | ImageSaved
    | ImageFailed
    | JobCanceled
    | Done
    | Canceled
    | Error
    | GroupDone
    | Log
    | Gone
)
