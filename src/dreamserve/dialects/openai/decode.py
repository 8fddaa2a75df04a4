"""OpenAI's images API bodies (``/v1/images/generations`` JSON, ``/v1/images/edits`` multipart), decoded into the
core's ``RunRequest``. ``seed`` and ``watermark`` are ours, beyond OpenAI's fields."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreamserve.dialects.wire import flag, number
from dreamserve.errors import InvalidField, NotFound
from dreamserve.request import MAX_SEED, MAX_TOTAL_IMAGES, Field, RunRequest, Upload
from dreamserve.settings import DEFAULT_MODEL, Settings

#: OpenAI's names for the core's fields, in its messages and ``param``.
NAMES: dict[str, str] = {Field.NUM_IMAGES: "n", Field.REFERENCES: "image"}
#: ``auto`` lets the server choose: the 1K tier, at the aspect ratio of the first reference image.
AUTO_SIZE = "1K"
#: The sizes the openai package lists (``ImageGenerateParams.size``). The GPT image models also take any WxH;
#: every WxH Seedream takes is accepted, and smaller ones (256x256, 512x512) are generated at the smallest size
#: the server generates (``min_pixels``) with their aspect ratio, then downscaled.
OPENAI_SIZES = ("auto", "256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792")
_WXH = re.compile(r"^(\d{1,5})x(\d{1,5})$")
#: Smallest side of a downscaled output.
MIN_OUTPUT_SIDE = 16


@dataclass(frozen=True)
class OpenAIRequest:
    """An OpenAI images request: the images to make, and how to answer them."""

    slug: str
    run: RunRequest
    response_format: str
    output_format: str
    quality: int


def decode(settings: Settings, body: Mapping[str, Sequence[Any]], images: Sequence[Upload] = ()) -> OpenAIRequest:
    """``images``: the edit's uploaded images (none for a generation)."""

    def one(name: str, default: Any = None) -> Any:
        values = body.get(name)
        return values[-1] if values not in (None, []) and values[-1] is not None else default

    response_format = str(one("response_format", "url"))
    if response_format not in ("url", "b64_json"):
        raise InvalidField("response_format", "must be 'url' or 'b64_json'.")
    output_format = str(one("output_format", "png")).lower()
    if output_format not in ("png", "jpeg", "webp"):
        raise InvalidField("output_format", "must be 'png', 'jpeg' or 'webp'.")
    if output_format != "png" and response_format == "url":
        raise InvalidField("output_format", "url outputs are PNG; use b64_json for jpeg or webp.")
    quality = _quality(one("output_compression"))  # checked before the task exists, like every other field
    asked = str(one("size", "auto"))
    size, output_size = generation_size(asked, settings.min_pixels)
    seed = one("seed")
    run = RunRequest(
        dialect="openai",
        prompt=str(one("prompt", "")),
        size=size,
        references=tuple(images),
        num_images=_integer(one("n", 1), Field.NUM_IMAGES, 1, MAX_TOTAL_IMAGES),
        seed=None if seed is None else _integer(seed, Field.SEED, 0, MAX_SEED),
        watermark=flag(str(one("watermark", "")), "watermark"),
        output_size=output_size,
    )
    return OpenAIRequest(_model(settings, str(one("model", ""))), run, response_format, output_format, quality)


def generation_size(size: str, min_pixels: int) -> tuple[str, tuple[int, int] | None]:
    """OpenAI's ``size`` as the Seedream size to generate at, and the size to downscale the images to (or None).

    A WxH under ``min_pixels`` (OpenAI's 256x256 and 512x512 with Seedream's 1280x720 floor) is generated at the
    smallest size of its aspect ratio with at least ``min_pixels`` (sides multiples of 16), then downscaled.
    """
    text = size.strip().lower().replace("×", "x")
    if text in ("", "auto"):
        return AUTO_SIZE, None
    match = _WXH.match(text)
    if match is None:
        return size, None  # 1K/2K/4K, or an error from Seedream's size check
    width, height = int(match.group(1)), int(match.group(2))
    if (
        width * height >= min_pixels
        or min(width, height) < MIN_OUTPUT_SIDE
        or max(width, height) > 16 * min(width, height)
    ):
        return text, None  # Seedream takes it as it is, or refuses it with its own message
    scale = math.sqrt(min_pixels / (width * height))
    gen_width, gen_height = (16 * math.ceil(side * scale / 16) for side in (width, height))
    return f"{gen_width}x{gen_height}", (width, height)


def _integer(value: Any, name: Field, low: int, high: int) -> int:
    """A JSON number, or a form's text ("2", "2.0")."""
    if isinstance(value, bool):
        raise InvalidField(name, f"must be an integer from {low} to {high}.", limit=high)
    if isinstance(value, int):
        return value
    return number(str(value), name, low=low, high=high)


def _model(settings: Settings, requested: str) -> str:
    """A served slug is used as given; any other name (``gpt-image-1``, ``dall-e-3``) means the default model."""
    served = settings.models
    slug = requested.strip().lower()
    if slug in served:
        return slug
    if DEFAULT_MODEL in served:
        return DEFAULT_MODEL
    if not served:
        raise NotFound("This server serves no model.")
    return next(iter(served))


def _quality(value: Any) -> int:
    text = str(value if value is not None else 90).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 3 or not 0 <= int(text) <= 100:
        raise InvalidField("output_compression", "must be an integer from 0 to 100.", limit=100)
    return int(text)
