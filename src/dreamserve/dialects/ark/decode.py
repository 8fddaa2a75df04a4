"""Ark's ``POST /api/v3/images/generations`` body (api-spec.md §2.1), decoded into the core's ``RunRequest``.

Unknown fields (and the ``null``s Ark's SDKs send) are ignored, as on Ark. Group generation
(``sequential_image_generation: "auto"``) takes its size from the prompt (``groups.image_count``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dreamserve.dialects.wire import decode_data_uri, served_model
from dreamserve.errors import InvalidField
from dreamserve.groups import image_count
from dreamserve.request import MAX_TOTAL_IMAGES, Field, RunRequest, Source
from dreamserve.settings import Settings
from dreamserve.sizes import DEFAULT_SIZE

#: Ark's names for the core's fields, in its messages and ``param``.
NAMES: dict[str, str] = {Field.REFERENCES: "image", Field.NUM_IMAGES: "sequential_image_generation_options.max_images"}
MAX_SEED = 2**31 - 1
OUTPUT_FORMATS: dict[str, Literal["png", "jpeg"]] = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}


@dataclass(frozen=True)
class ArkRequest:
    """An Ark request: the images to make, and how to answer (``model`` as the client named it)."""

    model: str
    slug: str
    run: RunRequest
    response_format: str
    stream: bool
    warnings: tuple[str, ...] = ()


def decode(settings: Settings, body: Mapping[str, Sequence[Any]]) -> ArkRequest:
    def one(name: str) -> Any:
        values = body.get(name)
        return values[-1] if values else None

    model = str(one("model") or "").strip()
    if not model:
        raise InvalidField("model", "required: send seedream-4-0-250828 or a served model.")
    slug = served(settings, model)
    response_format, output_format, stream = _answer_options(one)
    prompt = one("prompt")
    prompt = prompt if isinstance(prompt, str) else ""
    images = _images(one("image"), settings.max_upload_bytes)
    run = RunRequest(
        dialect="ark",
        prompt=prompt,
        size=str(one("size") or DEFAULT_SIZE),
        references=images,
        num_images=_group_size(one, prompt, len(images)),
        seed=_seed(one("seed")),
        watermark=_flag(one("watermark"), "watermark", default=True),
        output_format=output_format,
    )
    warnings: tuple[str, ...] = ()
    if one("optimize_prompt_options") is not None or one("optimize_prompt") is not None:
        warnings = ("optimize_prompt_options is accepted but not applied: the prompt is used as written.",)
    return ArkRequest(model, slug, run, response_format, stream, warnings)


def _answer_options(one: Callable[[str], Any]) -> tuple[str, Literal["png", "jpeg"], bool]:
    """How to answer: ``response_format``, ``output_format`` and ``stream``."""
    response_format = str(one("response_format") or "url")
    if response_format not in ("url", "b64_json"):
        raise InvalidField("response_format", "must be 'url' or 'b64_json'.")
    output_format = OUTPUT_FORMATS.get(str(one("output_format") or "jpeg").lower())
    if output_format is None:
        raise InvalidField("output_format", "must be 'jpeg' or 'png'.")
    stream = one("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidField("stream", "must be true or false.")
    return response_format, output_format, bool(stream)


def served(settings: Settings, model: str) -> str:
    """A served slug as given, else an Ark model id through ``ark_models``; anything else is Ark's 404."""
    missing = "The model or endpoint {model} does not exist or you do not have access to it. Use one of: {known}."
    return served_model(model, settings.models, settings.ark_models, missing)


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= MAX_SEED:
        raise InvalidField(Field.SEED, f"must be an integer from -1 (random) to {MAX_SEED}.", limit=MAX_SEED)
    return seed if seed >= 0 else None


def _flag(value: Any, name: str, *, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise InvalidField(name, "must be true or false.")


def _group_size(one: Callable[[str], Any], prompt: str, references: int) -> int:
    """1 unless ``auto``; then the count the prompt asks for, within ``max_images`` and references + outputs <= 15."""
    mode = one("sequential_image_generation") or "disabled"
    if mode not in ("auto", "disabled"):
        raise InvalidField("sequential_image_generation", "must be 'auto' or 'disabled'.")
    options = one("sequential_image_generation_options") or {}
    if not isinstance(options, dict):
        raise InvalidField("sequential_image_generation_options", "must be an object.")
    cap = options.get("max_images")
    cap = MAX_TOTAL_IMAGES if cap is None else cap
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TOTAL_IMAGES:
        raise InvalidField(
            Field.NUM_IMAGES, f"must be an integer from 1 to {MAX_TOTAL_IMAGES}.", limit=MAX_TOTAL_IMAGES
        )
    if mode == "disabled":
        return 1
    return image_count(prompt, max(1, min(cap, MAX_TOTAL_IMAGES - references)))


def _images(value: Any, max_bytes: int) -> tuple[Source, ...]:
    """``image``: one or a list of URLs and ``data:image/<fmt>;base64,...`` URIs, the URIs decoded to uploads."""
    if value is None:
        return ()
    entries = value if isinstance(value, list) else [value]
    return tuple(_image(entry, number, max_bytes) for number, entry in enumerate(entries, start=1))


def _image(entry: Any, number: int, max_bytes: int) -> Source:
    if not isinstance(entry, str):
        raise InvalidField(Field.REFERENCES, f"entry {number} must be a string (a URL or data URI).")
    if entry.lower().startswith(("http://", "https://")):
        return entry
    if entry.lower().startswith("data:image/"):
        return decode_data_uri(entry, number, max_bytes)
    raise InvalidField(
        Field.REFERENCES,
        f"entry {number} must be an http(s) URL or a data:image/<format>;base64,<data> URI, got {entry[:40]!r}.",
    )
