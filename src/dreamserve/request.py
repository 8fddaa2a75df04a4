"""What a client asks of the service, in no API's words: the one request every dialect decodes into.

Wiro's form, Ark's JSON, OpenAI's form or JSON (and Replicate's and fal's inputs) are each decoded by their own
dialect (``dialects/<api>/decode.py``) into a ``RunRequest``, which ``submit.submit`` checks against the
service's limits and stores as a task. A dialect checks only its own syntax (types, enumerations of its own
options); what every API shares (the prompt, reference images and their count, the size, the image count, seed,
priority, callback) is checked once here and in ``submit``, and a failed check is an ``errors.InvalidField``
naming a ``Field`` below, which each dialect renders under its own name for it (``maxImages``, ``n``,
``max_images``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from dreamserve.errors import InvalidField

MAX_REFERENCES = 14
MAX_TOTAL_IMAGES = 15
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**32 - 1
MAX_PRIORITY = 9
CALLBACK_EVENTS = ("start", "progress", "completed")


class Field(StrEnum):
    """The request's fields, as the core names them; dialects map each to their own wire name."""

    PROMPT = "prompt"
    REFERENCES = "references"
    NUM_IMAGES = "num_images"
    SIZE = "size"
    SEED = "seed"
    PRIORITY = "priority"
    CALLBACK_URL = "callback_url"
    CALLBACK_EVENTS = "callback_events"


@dataclass(frozen=True)
class Upload:
    """Bytes a client sent for a file field (multipart, or a decoded ``data:`` URI), not yet checked."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class StoredImage:
    """An image this server already holds and checked when it stored it (one of its own file URLs): its row's
    facts stand for it, and its bytes are copied blob to blob, never read into this process."""

    blob_key: str
    url: str
    size: int
    ext: str
    width: int
    height: int


#: A reference image as a client gives it: a URL (fetched by the worker, or this server's own file URL), or
#: bytes. ``submit`` turns own URLs into ``StoredImage``s.
Source = str | Upload | StoredImage


@dataclass(frozen=True)
class Callback:
    """Where to report the task (``webhooks.py``), and which events; ``refused`` is a value the client sent that
    is not a URL (Wiro's page sample sends placeholder text): nothing is called, and the task's log says why."""

    url: str = ""
    events: tuple[str, ...] = ("completed",)
    refused: str = ""
    refused_reason: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.events) - set(CALLBACK_EVENTS))
        if unknown:
            raise InvalidField(Field.CALLBACK_EVENTS, f"takes start, progress, completed; got {unknown[0]!r}.")


@dataclass(frozen=True)
class RunRequest:
    """One request for images: checked here for what needs no I/O, and by ``submit`` for the rest.

    ``size`` is Seedream's size grammar (``sizes.Size``): a tier (``1K``/``2K``/``4K``, at the aspect of the first
    reference), a tier at a given aspect ratio, or exact pixels. ``asked_size`` is the size as the client spelled
    it, echoed back by Task/Detail. ``output_size``: downscale the images to it after generating (OpenAI's small
    sizes). ``seed`` None: a random one.
    """

    prompt: str
    size: str = "2048x2048"
    references: tuple[Source, ...] = ()
    num_images: int = 1
    seed: int | None = None
    watermark: bool = False
    output_format: Literal["png", "jpeg"] = "png"
    output_size: tuple[int, int] | None = None
    callback: Callback = field(default_factory=Callback)
    priority: int = 0
    asked_size: str | None = None
    #: Lines for the task's own log (``debugoutput``): what was accepted but not applied, and why.
    notes: tuple[str, ...] = ()
    #: The dialect that decoded it (``dialects/<name>``), and the input as that dialect echoes it back (opaque
    #: to the core; JSON values only).
    dialect: str = "wiro"
    echo: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise InvalidField(Field.PROMPT, 'required. Describe the image, e.g. "a red fox in snow".')
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidField(Field.PROMPT, f"must be at most {MAX_PROMPT_CHARS} characters.", limit=MAX_PROMPT_CHARS)
        _within(Field.NUM_IMAGES, self.num_images, 1, MAX_TOTAL_IMAGES)
        _within(Field.PRIORITY, self.priority, 0, MAX_PRIORITY)
        if self.seed is not None:
            _within(Field.SEED, self.seed, 0, MAX_SEED)
        if len(self.references) > MAX_REFERENCES:
            raise InvalidField(
                Field.REFERENCES,
                f"takes at most {MAX_REFERENCES} reference images, got {len(self.references)}. Send fewer references.",
                limit=MAX_REFERENCES,
            )
        if len(self.references) + self.num_images > MAX_TOTAL_IMAGES:
            room = MAX_TOTAL_IMAGES - len(self.references)
            raise InvalidField(
                Field.NUM_IMAGES,
                f"plus the {len(self.references)} reference images must be at most {MAX_TOTAL_IMAGES}: ask for at "
                f"most {room} images, or send fewer references.",
                limit=room,
            )


def _within(name: Field, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidField(name, f"must be between {low} and {high}, got {value}.", limit=high)
