"""Replicate's prediction body (``{"input": {...}, "webhook", "webhook_events_filter", "version"}``), decoded into
the core's ``RunRequest``, with ``bytedance/seedream-4``'s published input schema (``schema.py``).

Sizes end in Seedream's grammar (``sizes.py``): ``size`` ``1K``/``2K``/``4K`` with an ``aspect_ratio`` is that
tier's preset; with ``match_input_image`` (the default) it is the tier alone, whose preset closest to the first
reference's aspect ``submit`` picks; ``custom`` is ``width`` x ``height``. Unknown input keys are ignored, as cog
does. Own file URLs (``/v1/files/<id>``, what the client uploads an open file to) stay URLs here: the routes
resolve them to the project's stored files (``files.resolve``), which needs the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreamserve.dialects.wire import check_url_text, decode_data_uri, served_model
from dreamserve.errors import InvalidField
from dreamserve.groups import image_count
from dreamserve.request import MAX_TOTAL_IMAGES, Callback, Field, RunRequest, Source
from dreamserve.settings import Settings
from dreamserve.sizes import TIERS

#: Replicate's names for the core's fields, in the problem details' ``detail``.
NAMES: dict[str, str] = {
    Field.PROMPT: "input.prompt",
    Field.REFERENCES: "input.image_input",
    Field.NUM_IMAGES: "input.max_images",
    Field.SIZE: "input.size",
    Field.CALLBACK_URL: "webhook",
    Field.CALLBACK_EVENTS: "webhook_events_filter",
}
MAX_INPUT_IMAGES = 10
SIZES = ("1K", "2K", "4K", "custom")
ASPECT_RATIOS = ("match_input_image", "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9")
MIN_SIDE, MAX_SIDE = 1024, 4096
#: Replicate's webhook events, and the core's callback events each is delivered on (``logs`` and ``output`` both
#: ride the throttled progress event: the body is the whole prediction as it stands, with its logs and outputs).
WEBHOOK_EVENTS: dict[str, str] = {"start": "start", "output": "progress", "logs": "progress", "completed": "completed"}
ENHANCE_NOTE = "enhance_prompt is accepted but not applied: the prompt is used as written."


@dataclass(frozen=True)
class Prediction:
    """A decoded create: the served model to run, and the request for it."""

    slug: str
    run: RunRequest


def decode(settings: Settings, model: str, slug: str, body: Mapping[str, Sequence[Any]]) -> Prediction:
    """``model``: the model as the client named it (echoed in the prediction); ``slug``: the served model."""

    def one(name: str) -> Any:
        values = body.get(name)
        return values[-1] if values else None

    raw = one("input")
    if not isinstance(raw, dict):
        raise InvalidField("input", 'is required: an object with the model\'s inputs, e.g. {"prompt": "..."}.')
    prompt = raw.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidField(Field.PROMPT, "is required: a string.")
    references = _images(raw.get("image_input"), settings.max_upload_bytes)
    notes = (ENHANCE_NOTE,) if raw.get("enhance_prompt") is not None else ()
    if raw.get("enhance_prompt") is not None and not isinstance(raw.get("enhance_prompt"), bool):
        raise InvalidField("input.enhance_prompt", "must be true or false.")
    run = RunRequest(
        dialect="replicate",
        prompt=prompt,
        size=_size(raw),
        references=references,
        num_images=_group_size(raw, prompt, len(references)),
        callback=_callback(one("webhook"), one("webhook_events_filter")),
        notes=notes,
        asked_size=str(raw.get("size") or "2K"),
        echo={"model": model, "input": _echo(raw)},
    )
    return Prediction(slug, run)


def served(settings: Settings, model: str) -> str:
    """A served slug as given, else a Replicate model name through ``replicate_models``; anything else is 404."""
    missing = "The model {model} does not exist here. Use one of: {known}."
    return served_model(model, settings.models, settings.replicate_models, missing)


def _choice(raw: Mapping[str, Any], name: str, choices: Sequence[str], default: str) -> str:
    value = raw.get(name)
    if value is None:
        return default
    if value not in choices:
        raise InvalidField(f"input.{name}", f"must be one of {', '.join(choices)}; got {str(value)[:40]!r}.")
    return str(value)


def _side(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name, 2048)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidField(f"input.{name}", f"must be an integer from {MIN_SIDE} to {MAX_SIDE}.", limit=MAX_SIDE)
    return value


def _size(raw: Mapping[str, Any]) -> str:
    """Seedream's size for ``size``, ``aspect_ratio``, ``width`` and ``height``."""
    size = _choice(raw, "size", SIZES, "2K")
    aspect = _choice(raw, "aspect_ratio", ASPECT_RATIOS, "match_input_image")
    if size == "custom":
        return f"{_side(raw, 'width')}x{_side(raw, 'height')}"
    if aspect == "match_input_image":
        return size  # the tier: submit picks its preset closest to the first reference's aspect (1:1 without)
    width, height = TIERS[size][aspect]
    return f"{width}x{height}"


def _group_size(raw: Mapping[str, Any], prompt: str, references: int) -> int:
    """1 unless ``auto``; then the count the prompt asks for, within ``max_images`` and inputs + outputs <= 15."""
    mode = _choice(raw, "sequential_image_generation", ("disabled", "auto"), "disabled")
    cap = raw.get("max_images", 1)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TOTAL_IMAGES:
        raise InvalidField(Field.NUM_IMAGES, f"must be an integer from 1 to {MAX_TOTAL_IMAGES}.", limit=15)
    if mode == "disabled":
        return 1
    if references + cap > MAX_TOTAL_IMAGES:
        room = MAX_TOTAL_IMAGES - references
        raise InvalidField(
            Field.NUM_IMAGES,
            f"plus the {references} input images must be at most {MAX_TOTAL_IMAGES}: ask for at most {room}.",
            limit=room,
        )
    return image_count(prompt, cap)


def _images(value: Any, max_bytes: int) -> tuple[Source, ...]:
    """``image_input``: up to 10 URIs (http(s), this server's file URLs, data URIs; the data URIs decoded)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidField(Field.REFERENCES, "must be an array of image URIs.")
    if len(value) > MAX_INPUT_IMAGES:
        raise InvalidField(
            Field.REFERENCES,
            f"takes at most {MAX_INPUT_IMAGES} images, got {len(value)}.",
            limit=MAX_INPUT_IMAGES,
        )
    return tuple(_image(entry, number, max_bytes) for number, entry in enumerate(value, start=1))


def _image(entry: Any, number: int, max_bytes: int) -> Source:
    if not isinstance(entry, str):
        raise InvalidField(Field.REFERENCES, f"entry {number} must be a string (a URI).")
    if entry.lower().startswith("data:"):
        return decode_data_uri(entry, number, max_bytes)
    if entry.lower().startswith(("http://", "https://")):
        check_url_text(entry, NAMES[Field.REFERENCES])
        return entry
    raise InvalidField(
        Field.REFERENCES, f"entry {number} must be an http(s) URL or a data:image/...;base64 URI, got {entry[:40]!r}."
    )


def _callback(url: Any, events: Any) -> Callback:
    if url is None:
        return Callback()
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise InvalidField(Field.CALLBACK_URL, "must be an http:// or https:// URL.")
    check_url_text(url, NAMES[Field.CALLBACK_URL])
    if events is None:
        return Callback(url=url, events=("start", "progress", "completed"))  # Replicate's default: every event
    if not isinstance(events, list) or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in events):
        raise InvalidField(Field.CALLBACK_EVENTS, f"must be a list of {', '.join(WEBHOOK_EVENTS)}.")
    return Callback(url=url, events=tuple(dict.fromkeys(WEBHOOK_EVENTS[e] for e in events)) or ("completed",))


def _echo(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The input as the prediction echoes it: data URIs shortened (a stored task keeps no copy of their bytes)."""

    def short(value: Any) -> Any:
        if isinstance(value, str) and value.lower().startswith("data:"):
            return f"{value[: value.find(',') + 1]}... ({len(value):,} characters)"
        if isinstance(value, list):
            return [short(item) for item in value]
        return value

    return {name: short(value) for name, value in raw.items()}
