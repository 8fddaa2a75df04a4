"""What the core records and reports, as typed records: a step's progress, a task's details (method, seeds, stage
timings, failed images, deleted inputs), a file's metadata, one image's report and a worker's status.

They hold facts, never a wire shape: the dialects' renderers (``dialects/*/render.py``) turn them into
their clients' strings. The pydantic ones are stored as JSON (``queue/db.py``'s ``RecordJSON`` columns, the event
log, Redis streams) and read back with ``read``, which also validates what earlier versions stored there (Wiro's
progress object, Ark's image error) into the same record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from dreamserve.status import WorkerState


class Record(BaseModel):
    """A fact stored as JSON: ``dump`` leaves unset fields out, ``read`` validates a stored value."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def read(cls, stored: Any) -> Self:
        return stored if isinstance(stored, cls) else cls.model_validate(stored)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _seconds(text: Any) -> float:
    """``"12s"`` (a duration as Wiro's progress object spells it) as seconds."""
    match = re.match(r"\s*(-?[0-9.]+)", str(text))
    return float(match.group(1)) if match else 0.0


class Progress(Record):
    """A denoising step of a task: ``step`` of ``total`` over all its batches, ``elapsed`` seconds in."""

    step: int
    total: int
    elapsed: float
    #: A small JPEG of the image so far (a ``data:`` URI): sent to live followers only, never stored.
    preview: str | None = None
    #: Steps a second and seconds left as an earlier version stored them (Wiro's strings, read back); None: they
    #: follow from ``step``, ``total`` and ``elapsed``.
    speed: float | None = None
    remaining: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _stored_by_earlier_versions(cls, value: Any) -> Any:
        """Earlier versions stored Wiro's progress object itself (every value a string)."""
        if not isinstance(value, dict) or "stepCurrent" not in value:
            return value
        return {
            "step": int(float(value.get("stepCurrent") or 0)),
            "total": int(float(value.get("stepTotal") or 0)),
            "elapsed": _seconds(value.get("elapsedTime", 0)),
            "speed": float(value.get("speed") or 0),
            "remaining": _seconds(value.get("remainingTime", 0)),
            "preview": value.get("preview"),
        }

    @property
    def rate(self) -> float:
        """Steps a second."""
        if self.speed is not None:
            return self.speed
        return self.step / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def seconds_left(self) -> float:
        if self.remaining is not None:
            return self.remaining
        rate = self.rate
        return (self.total - self.step) / rate if rate > 0 else 0.0

    def stored(self) -> Progress:
        """What the task row and the event log keep: no preview."""
        return self.model_copy(update={"preview": None}) if self.preview is not None else self


class ImageReport(Record):
    """One image of a running task was saved (``name``, its file's name) or could not be finished (``failure``,
    the text the client gets: an error id, never the raw error)."""

    index: int
    name: str | None = None
    failure: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _stored_by_earlier_versions(cls, value: Any) -> Any:
        """Earlier versions stored the failure as Ark's error object, ``{"error": {"code", "message"}}``."""
        if isinstance(value, dict) and "error" in value and "failure" not in value:
            return {**value, "failure": value["error"]}
        return value

    @field_validator("failure", mode="before")
    @classmethod
    def _message_of_an_error_object(cls, value: Any) -> Any:
        return value.get("message", "") if isinstance(value, dict) else value


class LogText(Record):
    """A task's whole output or error log (the ``task_output_full`` and ``task_error_full`` events)."""

    raw: str = ""


class FailedImage(Record):
    """An image of a succeeded task that could not be finished; the task's other images were."""

    index: int
    seed: int
    message: str


#: The stages timed around the engine's, shown after them (the engine's own come between ``queue`` and these).
_AFTER_ENGINE = ("batch_wait", "fetch", "preprocess")


class StageTimings(Record):
    """Seconds per stage of a task: in the queue, then the engine's stages (an engine plugged in may report stages
    of its own names, kept as extras), then the worker's waits and the inputs' fetch and preprocessing."""

    model_config = ConfigDict(frozen=True, extra="allow")
    __pydantic_extra__: dict[str, float]

    queue: float | None = None
    load: float | None = None
    encode: float | None = None
    denoise: float | None = None
    decode: float | None = None
    upscale: float | None = None
    save: float | None = None
    batch_wait: float | None = None
    fetch: float | None = None
    preprocess: float | None = None

    @model_serializer(mode="wrap")
    def _in_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An engine's own stages among its others, before the worker's: as the task's details always showed."""
        dumped: dict[str, Any] = handler(self)
        after = {name: dumped.pop(name) for name in _AFTER_ENGINE if name in dumped}
        return {**dumped, **after}

    def stages(self) -> dict[str, float]:
        """Every stage timed, by name."""
        return {name: float(seconds) for name, seconds in self.dump().items()}


class DeletedInput(Record):
    """An input file of a task that ended cancelled or failed, whose row and bytes were deleted then: what its URL
    is derived from (``keyring.ServerKey.accesskey``), so the task still echoes the URL it was given."""

    position: int
    id: int
    name: str
    key_salt: str | None = None
    #: A legacy row's sealed access key.
    accesskey_sealed: str | None = None


class TaskDetails(Record):
    """What a task's end left beyond Wiro's task object (``tasks.details``): how it was generated, its seeds, its
    stage timings, the project's tasks it shared its pipeline calls with, the images that failed; and the inputs its
    end deleted. Keys stored by earlier versions are kept (extra)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str | None = None
    seeds: list[int] | None = None
    timings: StageTimings | None = None
    batched_with: list[int] | None = None
    failed_images: list[FailedImage] | None = None
    deleted_inputs: list[DeletedInput] | None = None


class FileMeta(Record):
    """What a file row knows of its image: its size in pixels, the seed of a generated one, the URL a fetched
    input came from."""

    width: int | None = None
    height: int | None = None
    seed: int | None = None
    url: str | None = None
    #: An upload's digests (hex) and the metadata its client attached (Replicate's ``files.create``).
    sha256: str | None = None
    md5: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """A model worker as ``/healthz``, ``/readyz`` and ``/metrics`` report it."""

    id: str
    model: str
    #: Its ``WorkerState``, or ``restarting after a kill`` while a killed model process is replaced.
    state: str
    pid: int | None
    #: Ids of the tasks it runs now.
    tasks: list[int]
    load_seconds: float
    error: str

    @property
    def loaded(self) -> bool:
        return self.state in (WorkerState.READY, WorkerState.BUSY)
