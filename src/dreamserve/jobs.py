"""Plain records that cross the process boundary between a supervisor and its model child.

They are dataclasses of JSON-able fields (sent as dicts over a multiprocessing pipe), so the
supervisor side never needs torch to build or read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationJob:
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
    #: ``[width, height]`` to downscale the images to after generating at ``width`` x ``height``: OpenAI's small
    #: sizes (256x256), below what a model is asked to generate. None: the images are ``width`` x ``height``.
    output_size: list[int] | None = None
    #: ``png`` (lossless, the default) or ``jpeg`` (Ark's default): the files are written in it.
    output_format: str = "png"
    #: The model's public name (``bytedance/seedream-v4``), written into the PNGs; never its weights' path.
    model: str = ""
    #: Write the prompt into the PNGs too (``png_embed_prompt``).
    embed_prompt: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationJob:
        return cls(**data)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationResult:
        images = [GeneratedImage(**img) for img in data["images"]]
        failed = [FailedImage(**item) for item in data.get("failed", [])]
        return cls(images=images, method=data["method"], timings=dict(data.get("timings", {})), failed=failed)
