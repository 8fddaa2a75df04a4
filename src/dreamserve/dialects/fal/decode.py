"""The input of fal's two Seedream 4 apps, decoded into the core's ``RunRequest``.

``image_size`` is one of fal's named sizes, ``auto``/``auto_2K``/``auto_4K``, or ``{"width", "height"}``; a size
under the server's smallest area (``min_pixels``: 921,600 pixels, fal's floor too) is scaled up keeping its
aspect ratio, sides rounded up to multiples of 16, as fal adjusts it. ``num_images`` separate generations of up
to ``max_images`` images each (a prompt that asks for a group, as Ark's ``auto`` mode reads it) are one task here:
its images are independent (one seed each) and of one size, so they batch in the same pipeline calls; one
request id is then one task to follow or cancel. All its images and references count against the 15 a task takes.
``enable_safety_checker`` and ``enhance_prompt_mode`` are accepted, and the task's log says they are not applied.
Unknown fields are ignored, as fal's apps ignore them. The queue's ``fal_webhook`` is the task's callback, sent once
it has ended (``webhook.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreamserve.dialects.wire import check_url_text, decode_data_uri
from dreamserve.errors import InvalidField
from dreamserve.groups import image_count
from dreamserve.request import MAX_SEED, MAX_TOTAL_IMAGES, Callback, Field, RunRequest, Source
from dreamserve.settings import DEFAULT_MODEL, Settings

#: The app owner and alias, the part of an app id the queue's request URLs keep (``fal-ai/bytedance/requests/..``).
OWNER, ALIAS = "fal-ai", "bytedance"
TEXT_TO_IMAGE = f"{OWNER}/{ALIAS}/seedream/v4/text-to-image"
EDIT = f"{OWNER}/{ALIAS}/seedream/v4/edit"
APPS = (TEXT_TO_IMAGE, EDIT)

#: fal's names for the core's fields, in its error ``loc``.
NAMES: dict[str, str] = {Field.REFERENCES: "image_urls", Field.SIZE: "image_size", Field.CALLBACK_URL: "fal_webhook"}
#: fal's named sizes (its ``ImageSize`` enum), before the smallest area is applied.
NAMED_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
#: The automatic sizes: a Seedream tier at the aspect ratio of the first reference (1:1 without one).
AUTO_SIZES = {"auto": "2K", "auto_2K": "2K", "auto_4K": "4K"}
DEFAULT_SIZE = {"width": 2048, "height": 2048}
#: Largest side taken before scaling, so that no arithmetic runs on absurd numbers.
MAX_SIDE = 16_384
MAX_GENERATIONS = 6
MAX_PER_GENERATION = 6
MAX_IMAGE_URLS = 10
ENHANCE_MODES = ("standard", "fast")


@dataclass(frozen=True)
class FalRequest:
    """A request to one of the apps: the images to make, and how to answer (``sync_mode``: as data URIs)."""

    app: str
    slug: str
    run: RunRequest
    sync_mode: bool


def decode(settings: Settings, app: str, body: Mapping[str, Sequence[Any]], webhook: str | None = None) -> FalRequest:
    """``webhook``: the queue's ``fal_webhook``, called when the request ends."""

    def one(name: str) -> Any:
        values = body.get(name)
        return values[-1] if values else None

    prompt = one("prompt")
    if not isinstance(prompt, str):
        raise InvalidField(Field.PROMPT, "required: a string that describes the image.")
    references = _image_urls(one("image_urls"), settings.max_upload_bytes) if app == EDIT else ()
    size, asked = fal_size(one("image_size"), settings.min_pixels)
    generations = _integer(one("num_images"), "num_images", 1, MAX_GENERATIONS, default=1)
    per_generation = _integer(one("max_images"), "max_images", 1, MAX_PER_GENERATION, default=1)
    room = MAX_TOTAL_IMAGES - len(references)
    if per_generation > 1:
        per_generation = image_count(prompt, max(1, min(per_generation, room)))
    if generations * per_generation > room:
        raise InvalidField(
            "num_images",
            f"x {per_generation} images per generation plus the {len(references)} image_urls must be at most "
            f"{MAX_TOTAL_IMAGES} on this server: ask for fewer generations or images.",
            limit=max(1, room // per_generation),
        )
    seed = one("seed")
    sync_mode = _flag(one("sync_mode"), "sync_mode")
    run = RunRequest(
        dialect="fal",
        prompt=prompt,
        size=size,
        asked_size=asked,
        references=references,
        num_images=generations * per_generation,
        seed=None if seed is None else _integer(seed, Field.SEED, 0, MAX_SEED, default=0),
        notes=_notes(one),
        callback=_callback(webhook),
        echo={"app": app, "sync_mode": sync_mode},
    )
    return FalRequest(app, _model(settings), run, sync_mode)


def fal_size(value: Any, min_pixels: int) -> tuple[str, str]:
    """``image_size`` as the size to generate (Seedream's grammar) and as the client spelled it."""
    if value is None:
        value = DEFAULT_SIZE
    if isinstance(value, str) and value in AUTO_SIZES:
        return AUTO_SIZES[value], value
    if isinstance(value, str) and value in NAMED_SIZES:
        width, height = NAMED_SIZES[value]
        return _at_least(width, height, min_pixels), value
    if isinstance(value, dict) and set(value) >= {"width", "height"}:
        width = _integer(value["width"], Field.SIZE, 1, MAX_SIDE, default=0)
        height = _integer(value["height"], Field.SIZE, 1, MAX_SIDE, default=0)
        return _at_least(width, height, min_pixels), f"{width}x{height}"
    choices = ", ".join([*NAMED_SIZES, *AUTO_SIZES])
    raise InvalidField(Field.SIZE, f'must be one of {choices}, or {{"width": W, "height": H}}.')


def _at_least(width: int, height: int, min_pixels: int) -> str:
    """``WxH``, scaled up keeping the aspect ratio when its area is under ``min_pixels``."""
    if width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        # Rounded before the ceiling: 512 x 1.875 is 960.0000000001 in floating point.
        width, height = (16 * math.ceil(round(side * scale / 16, 6)) for side in (width, height))
    return f"{width}x{height}"


def _integer(value: Any, name: str, low: int, high: int, *, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(name, f"must be an integer from {low} to {high}.", limit=high)
    return value


def _callback(url: str | None) -> Callback:
    if url is None:
        return Callback()
    if not url.lower().startswith(("http://", "https://")):
        raise InvalidField("fal_webhook", "must be an http:// or https:// URL.")
    check_url_text(url, "fal_webhook")
    return Callback(url=url)  # fal calls it once, when the request has ended


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidField(name, "must be true or false.")


def _notes(one: Any) -> tuple[str, ...]:
    """What was accepted but not applied, for the task's log; the fields are checked as fal checks them."""
    notes = []
    if one("enable_safety_checker") is not None:
        _flag(one("enable_safety_checker"), "enable_safety_checker")
        notes.append("enable_safety_checker is accepted but not applied: this server runs no safety checker.")
    mode = one("enhance_prompt_mode")
    if mode is not None:
        if mode not in ENHANCE_MODES:
            raise InvalidField("enhance_prompt_mode", "must be 'standard' or 'fast'.")
        notes.append("enhance_prompt_mode is accepted but not applied: the prompt is used as written.")
    return tuple(notes)


def _image_urls(value: Any, max_bytes: int) -> tuple[Source, ...]:
    """The edit's ``image_urls``: 1 to 10 http(s) URLs or ``data:image/...;base64,`` URIs (decoded to uploads)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_IMAGE_URLS:
        raise InvalidField(
            Field.REFERENCES, f"required: a list of 1 to {MAX_IMAGE_URLS} image URLs.", limit=MAX_IMAGE_URLS
        )
    return tuple(_image(entry, number, max_bytes) for number, entry in enumerate(value, start=1))


def _image(entry: Any, number: int, max_bytes: int) -> Source:
    text = entry.lower() if isinstance(entry, str) else ""
    if text.startswith(("http://", "https://")):
        return str(entry)
    if text.startswith("data:image/"):
        return decode_data_uri(str(entry), number, max_bytes)
    raise InvalidField(
        Field.REFERENCES, f"entry {number} must be an http(s) URL or a data:image/<format>;base64,<data> URI."
    )


def _model(settings: Settings) -> str:
    """The served model the apps run on: Seedream's slug when served, else the first served model."""
    return DEFAULT_MODEL if DEFAULT_MODEL in settings.models else next(iter(settings.models), DEFAULT_MODEL)
