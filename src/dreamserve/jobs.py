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


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    #: How the requested size was reached, e.g. "native 1024x1024" or
    #: "generated 512x512, upscaled (lanczos) to 2048x2048".
    method: str
    #: Seconds per stage: encode, denoise, decode, save.
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationResult:
        images = [GeneratedImage(**img) for img in data["images"]]
        return cls(images=images, method=data["method"], timings=dict(data.get("timings", {})))
