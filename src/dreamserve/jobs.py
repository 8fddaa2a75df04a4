"""The records of a task's work: the job as stored (``TaskJob``), and those that cross the process boundary
between a supervisor and its model child (``GenerationJob`` and what comes back).

``TaskJob`` is written once, by ``submit.py``, as its dump in the ``tasks.job`` JSON column, and read back with
validation (``TaskJob.load``, which also reads the rows stored before it had this shape). The others are plain
dataclasses, pickled over the pipe (``worker/protocol.py``), so the supervisor never needs torch to build or read
them. ``ModelEngine`` is what the model process runs them on, with its callbacks' types written once here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class StoredReference(BaseModel):
    """A reference image of a task: a blob in the blob store, or (until the preprocess stage fetched it) a URL.

    A fetched URL keeps its ``url`` beside the ``blob_key`` it was stored under."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    blob_key: str | None = None
    url: str | None = None

    @property
    def fetched(self) -> bool:
        return self.blob_key is not None


class TaskJob(BaseModel):
    """What a worker needs to run a task, checked at Run and stored with it (``tasks.job``).

    The shape is also kept as columns (``width``, ``height``, ``num_images``, ``has_inputs``) for the claims.
    Rows stored before this record called the references ``inputs``; ``load`` reads them under either name.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    prompt: str
    width: int
    height: int
    num_images: int
    seed: int
    watermark: bool = False
    #: Reference images in request order: uploads (blobs) and URLs, which ``preprocess.py`` turns into blobs.
    references: tuple[StoredReference, ...] = Field(default=(), validation_alias=AliasChoices("references", "inputs"))
    #: Lines the worker puts first in ``debugoutput`` (the task's own log), e.g. why a callbackUrl is not called.
    notes: tuple[str, ...] = ()
    #: ``(width, height)`` to downscale the images to after generating at ``width`` x ``height`` (OpenAI's small
    #: sizes); None: the images are ``width`` x ``height``.
    output_size: tuple[int, int] | None = None
    #: The format the images are written in: ``png`` (Wiro's, OpenAI's) or ``jpeg`` (Ark's default).
    output_format: Literal["png", "jpeg"] = "png"
    #: Seconds the preprocess stage took to fetch the URL references (``details.timings.fetch``).
    fetch_seconds: float | None = None
    #: The request's facts that only Task/Detail shows (``wiro.render.request_parameters``): the size as the
    #: client spelled it (``2K``, ``2048x2048``), and its callbackUrl, called or refused. ``asked_size`` is None
    #: on rows stored before the job kept them; those show the ``parameters`` column stored with them.
    asked_size: str | None = None
    asked_callback: str = ""
    #: The API the task was asked through (``dialects/<name>``): which dialect renders its callbacks. Rows
    #: stored before it are Wiro's.
    dialect: str = "wiro"
    #: The request as a dialect echoes it back (Replicate's ``input``): opaque to the core, rendered by its
    #: dialect only. None: the dialect echoes nothing (Wiro's echo is built from the fields above).
    echo: dict[str, Any] | None = None

    @classmethod
    def load(cls, stored: dict[str, Any]) -> TaskJob:
        """The job of a stored row, validated (``pydantic.ValidationError`` if it is not one)."""
        return cls.model_validate(stored)

    def dump(self) -> dict[str, Any]:
        """What is stored in ``tasks.job`` (JSON; unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def work(self) -> int:
        """Pixels to generate, for the quotas: images x width x height."""
        return self.num_images * self.width * self.height

    @property
    def inputs_ready(self) -> bool:
        """Every reference is a blob: no URL is left for the preprocess stage to fetch."""
        return all(reference.fetched for reference in self.references)

    @property
    def size(self) -> tuple[int, int]:
        """The size of the images delivered (after any downscaling)."""
        return self.output_size or (self.width, self.height)


@dataclass
class GenerationJob:
    """A task's job as the model process runs it: the ``TaskJob``'s fields, with its references on local disk."""

    task_id: int
    prompt: str
    width: int
    height: int
    num_images: int
    seed: int
    #: Local paths of the reference images, in request order (0-14).
    references: list[str]
    watermark: bool
    #: Folder the child writes ``0.png``, ``1.png``, ... into (each written to a temp name, then renamed).
    output_dir: str
    #: ``(width, height)`` to downscale the images to after generating at ``width`` x ``height``: OpenAI's small
    #: sizes (256x256), below what a model is asked to generate. None: the images are ``width`` x ``height``.
    output_size: tuple[int, int] | None = None
    #: ``png`` (lossless, the default) or ``jpeg`` (Ark's default): the files are written in it.
    output_format: str = "png"
    #: The model's public name (``bytedance/seedream-v4``), written into the PNGs; never its weights' path.
    model: str = ""
    #: Write the prompt into the PNGs too (``png_embed_prompt``).
    embed_prompt: bool = False

    @classmethod
    def of(
        cls,
        task_id: int,
        job: TaskJob,
        references: list[str],
        output_dir: str,
        *,
        model: str,
        embed_prompt: bool,
    ) -> GenerationJob:
        """The stored job of a task, with ``references`` the local paths of its ``job.references``, in order."""
        return cls(
            task_id=task_id,
            prompt=job.prompt,
            width=job.width,
            height=job.height,
            num_images=job.num_images,
            seed=job.seed,
            references=references,
            watermark=job.watermark,
            output_dir=output_dir,
            output_size=job.output_size,
            output_format=job.output_format,
            model=model,
            embed_prompt=embed_prompt,
        )


class Interrupted(Exception):
    """The job was stopped on request between denoising steps (raised, or returned per job of a group)."""


@dataclass
class StepInfo:
    #: Steps done so far over the whole task (all batches), 1-based.
    step: int
    total: int
    elapsed: float
    #: Every ``ModelSpec.preview_every`` steps: a small JPEG (<= 256 px on the long side) of the job's first image
    #: in the current batch, as a ``data:image/jpeg;base64,...`` URI; None on the other steps and when off.
    preview: str | None = None


@dataclass
class GeneratedImage:
    name: str
    path: str
    width: int
    height: int
    seed: int
    size_bytes: int
    #: Its place among the job's images (the ``N`` of ``N.png``).
    index: int = 0


@dataclass
class FailedImage:
    """An image of a job that could not be finished (upscaled or saved); the job's other images still are."""

    index: int
    seed: int
    message: str


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    #: How the requested size was reached, e.g. "native 1024x1024" or
    #: "generated 512x512, upscaled (lanczos) to 2048x2048".
    method: str
    #: Seconds per stage: encode, denoise, decode, save.
    timings: dict[str, float] = field(default_factory=dict)
    failed: list[FailedImage] = field(default_factory=list)


# The callbacks of an engine's ``generate_group`` (see ``engine.Engine.generate_group`` for their contract), each
# called with the index of the job of the group it is about.
#: ``on_step(i, info)``: job ``i`` made a denoising step.
OnStep = Callable[[int, StepInfo], None]
#: ``should_stop(i)``: whether job ``i`` is to stop at its next step.
ShouldStop = Callable[[int], bool]
#: ``on_image(i, image)``: an image of job ``i`` is finished and saved, or failed.
OnImage = Callable[[int, GeneratedImage | FailedImage], None]
GroupRunner = Callable[[list[GenerationJob], OnStep, ShouldStop, OnImage | None], list[GenerationResult | Exception]]


class ModelEngine(Protocol):
    """What a model process runs jobs on: diffusers' ``engine.Engine``, or the class ``ModelSpec.engine`` names
    (its ``load(spec)`` classmethod builds one)."""

    load_seconds: float

    def generate_group(
        self, jobs: list[GenerationJob], on_step: OnStep, should_stop: ShouldStop, on_image: OnImage | None = None
    ) -> list[GenerationResult | Exception]: ...


def generate_alone(
    generate_group: GroupRunner,
    job: GenerationJob,
    on_step: Callable[[StepInfo], None],
    should_stop: Callable[[], bool],
    on_image: Callable[[GeneratedImage | FailedImage], None] | None = None,
) -> GenerationResult:
    """One job as a group of one (an engine's ``generate_group``): its result, or the exception that ended it."""
    saved = (lambda _, image: on_image(image)) if on_image is not None else None
    (result,) = generate_group([job], lambda _, info: on_step(info), lambda _: should_stop(), saved)
    if isinstance(result, Exception):
        raise result
    return result
