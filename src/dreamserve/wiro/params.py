"""The parameters of ``POST /v1/Run/bytedance/seedream-v4``, parsed and checked before anything is stored.

Wiro's clients send them as JSON or multipart, numbers and booleans often as strings, and
``inputImage`` as repeated fields, a JSON array, one string, or comma-separated URLs
(api-spec.md §1.4, §1.12). Everything is checked here so that a bad request stores nothing.
"""

from __future__ import annotations

import io
import math
import re
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from dreamserve.errors import InvalidRequest
from dreamserve.wiro.sizes import MIN_PIXELS, parse_size

MAX_REFERENCES = 14
MAX_TOTAL_IMAGES = 15
MAX_PROMPT_CHARS = 10_000
#: Largest id a row can have: SQLite and PostgreSQL integers are 64-bit.
MAX_ID = 2**63 - 1
#: Deepest nesting of a JSON body: Wiro's bodies are flat, with arrays of strings at most.
MAX_JSON_DEPTH = 16
#: A value that names a scheme (``ftp://...``) is a URL, checked as one; anything else in callbackUrl is not.
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CALLBACK_EVENTS = {"start", "progress", "completed"}
#: EXIF tag 274: values 5 to 8 mean the stored image is displayed turned by 90 degrees.
_EXIF_ORIENTATION = 0x0112
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}


@dataclass
class Upload:
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


@dataclass
class Reference:
    """One ``inputImage`` entry: an uploaded file (checked image), a stored image, or a URL fetched by the worker."""

    url: str | None = None
    upload: Upload | None = None
    stored: StoredImage | None = None
    #: Set for uploads once checked: (format extension, width, height).
    ext: str = ""
    width: int = 0
    height: int = 0


@dataclass
class RunParams:
    prompt: str
    size: str
    width: int
    height: int
    max_images: int
    watermark: bool
    seed: int
    priority: int
    callback_url: str
    references: list[Reference] = field(default_factory=list)
    callback_events: list[str] = field(default_factory=lambda: ["completed"])
    #: A callbackUrl that is not a URL (the page's sample sends its placeholder text): never called, and why.
    refused_callback: str = ""
    refused_callback_reason: str = ""


def ascii_int(raw: str, name: str, *, low: int, high: int) -> int:
    """An integer written in ASCII digits (``str.isdigit`` is also true of "²" and "١"), within bounds."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(high)) or not low <= int(text) <= high:
        raise InvalidRequest(f"Request parameter [{name}] must be an integer from {low} to {high}, got {text[:20]!r}.")
    return int(text)


def ascii_id(fields: Mapping[str, Sequence[Any]], *names: str) -> int | None:
    """An optional row id given under any of ``names``; "" and "0" mean none."""
    values = [value for name in names for value in fields.get(name, ())]
    raw = str(values[-1]).strip() if values else ""
    if raw in ("", "0"):
        return None
    return ascii_int(raw, names[0], low=1, high=MAX_ID)


def check_text(value: Any, depth: int = 0) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` and text that is not valid Unicode (a lone surrogate such as
    ``"\\ud800"`` parses from JSON but cannot be stored or sent back as UTF-8)."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"Request parameters are invalid: nested deeper than {MAX_JSON_DEPTH} levels.")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                "Request parameters are invalid: text with a lone surrogate (e.g. \\ud800) is not valid Unicode. "
                "Send UTF-8 text."
            ) from None
    elif isinstance(value, list):
        for item in value:
            check_text(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, depth + 1)
            check_text(item, depth + 1)


def check_url_text(url: str, name: str) -> None:
    """Refuse control characters, spaces and other unprintable characters (U+2028 ...) in a URL: a client never
    means them, and they would reach logs and request lines raw."""
    bad = next((i for i, char in enumerate(url) if char.isspace() or not char.isprintable()), None)
    if bad is not None:
        raise InvalidRequest(
            f"Request parameter [{name}] contains the control or space character {url[bad]!r} at position "
            f"{bad}; send the URL percent-encoded."
        )


def parse_run(
    fields: Mapping[str, Sequence[Any]], *, max_upload_bytes: int, max_input_pixels: int, min_pixels: int = MIN_PIXELS
) -> RunParams:
    """Check every parameter; ``fields`` maps a name to its values (str, list, bool, int or Upload)."""
    prompt = _text(fields, "prompt")
    if not prompt.strip():
        raise InvalidRequest('Request parameter [prompt] required. Describe the image, e.g. "a red fox in snow".')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"Request parameter [prompt] must be at most {MAX_PROMPT_CHARS} characters.")

    references = _references(fields, max_upload_bytes, max_input_pixels)
    # 0 means "the default" (the n8n node's own default is 0), as an empty value does.
    zero = _text(fields, "maxImages").strip() in ("0", "0.0")
    max_images = 1 if zero else _integer(fields, "maxImages", default=1, low=1, high=MAX_TOTAL_IMAGES)
    if len(references) + max_images > MAX_TOTAL_IMAGES:
        room = MAX_TOTAL_IMAGES - len(references)
        raise InvalidRequest(
            f"Request parameter [maxImages] plus the {len(references)} reference images must be at most "
            f"{MAX_TOTAL_IMAGES}: ask for at most {room} images, or send fewer references."
        )

    size = _text(fields, "size").strip() or "2048x2048"
    first = next((r for r in references if r.upload is not None or r.stored is not None), None)
    width, height = parse_size(size, (first.width, first.height) if first else None, min_pixels)

    callback_url = _text(fields, "callbackUrl").strip()
    refused, refused_reason = "", ""
    if callback_url and not _URL_LIKE.match(callback_url):
        # Words (spaces allowed) are never called, but control characters would still reach logs and rows.
        check_url_text(callback_url.replace(" ", ""), "callbackUrl")
        # Wiro's own curl sample carries "callbackUrl=Optional: Webhook URL ...": run the task, call nothing.
        refused, callback_url = callback_url, ""
        refused_reason = (
            f"callbackUrl {refused[:80]!r} is not an http(s) URL, so no callback is sent for this task. "
            "Send an http:// or https:// URL, or leave callbackUrl out."
        )
    elif callback_url and not callback_url.lower().startswith(("http://", "https://")):
        raise InvalidRequest("Request parameter [callbackUrl] must be an http:// or https:// URL.")
    else:
        check_url_text(callback_url, "callbackUrl")

    events = [e.strip() for e in _text(fields, "callbackEvents").split(",") if e.strip()] or ["completed"]
    unknown = sorted(set(events) - CALLBACK_EVENTS)
    if unknown:
        raise InvalidRequest(
            f"Request parameter [callbackEvents] takes start, progress, completed; got {unknown[0]!r}."
        )

    seed_default = secrets.randbelow(2**31)
    return RunParams(
        prompt=prompt,
        size=size,
        width=width,
        height=height,
        max_images=max_images,
        watermark=_boolean(fields, "watermark"),
        seed=_integer(fields, "seed", default=seed_default, low=0, high=2**32 - 1),
        priority=_integer(fields, "priority", default=0, low=0, high=9),
        callback_url=callback_url,
        references=references,
        callback_events=events,
        refused_callback=refused,
        refused_callback_reason=refused_reason,
    )


def _values(fields: Mapping[str, Sequence[Any]], name: str) -> list[Any]:
    values: list[Any] = []
    for value in fields.get(name, ()):
        values.extend(value if isinstance(value, list) else [value])
    return values


def _text(fields: Mapping[str, Sequence[Any]], name: str) -> str:
    values = _values(fields, name)
    if not values:
        return ""
    value = values[-1]
    if isinstance(value, Upload):
        raise InvalidRequest(f"Request parameter [{name}] must be text, not a file.")
    return "" if value is None else str(value)  # JSON null: as if left out


def _integer(fields: Mapping[str, Sequence[Any]], name: str, *, default: int, low: int, high: int) -> int:
    raw = _text(fields, name).strip()
    if not raw:
        return default
    if not raw.isascii():  # float() also reads "١٥" and other non-ASCII digits
        raise InvalidRequest(f"Request parameter [{name}] must be integer or float, got {raw[:20]!r}.")
    try:
        number = float(raw)
    except ValueError:
        raise InvalidRequest(f"Request parameter [{name}] must be integer or float, got {raw[:20]!r}.") from None
    # "nan", "inf" and "1e999" are floats too: refused here, before int() would raise on them.
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise InvalidRequest(f"Request parameter [{name}] must be between {low} and {high}, got {raw[:20]}.")
    return int(number)


def _boolean(fields: Mapping[str, Sequence[Any]], name: str) -> bool:
    raw = _text(fields, name).strip().lower()
    if raw in ("", "false", "0", "no"):
        return False
    if raw in ("true", "1", "yes"):
        return True
    raise InvalidRequest(f'Request parameter [{name}] must be "true" or "false", got {raw[:20]!r}.')


def _references(fields: Mapping[str, Sequence[Any]], max_bytes: int, max_pixels: int) -> list[Reference]:
    references: list[Reference] = []
    for value in _values(fields, "inputImage") + _values(fields, "inputImageUrl"):
        if isinstance(value, Upload):
            references.append(_check_upload(value, len(references) + 1, max_bytes, max_pixels))
            continue
        if isinstance(value, StoredImage):
            references.append(Reference(stored=value, ext=value.ext, width=value.width, height=value.height))
            continue
        for url in str(value).split(","):
            url = url.strip()
            if not url:
                continue
            check_url_text(url, "inputImage")
            if not url.lower().startswith(("http://", "https://")):
                raise InvalidRequest(
                    f"Request parameter [inputImage] entry {len(references) + 1} must be an uploaded file or an "
                    f"http(s) URL, got {url[:60]!r}."
                )
            references.append(Reference(url=url))
    if len(references) > MAX_REFERENCES:
        raise InvalidRequest(
            f"Request parameter [inputImage] takes at most {MAX_REFERENCES} reference images, got {len(references)}. "
            "Send fewer references."
        )
    return references


def check_image(data: bytes, label: str, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Identify an image by its content (never its name); returns (extension, upright width, upright height).

    Only the header is read before the pixel count is checked, so a decompression bomb (a huge image that
    compresses small) is refused without decoding it; ``verify`` then walks the file, and a full decode
    within the pixel limit refuses truncated files. Width and height are as displayed: an EXIF
    orientation that rotates by 90 degrees swaps them.
    """
    if len(data) > max_bytes:
        raise InvalidRequest(f"Request files [inputImage] {label} is {len(data):,} bytes; the limit is {max_bytes:,}.")

    def too_many(pixels: str) -> InvalidRequest:
        return InvalidRequest(
            f"Request files [inputImage] {label} has {pixels} pixels; the limit is {max_pixels:,}. "
            "Send a smaller image."
        )

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
            width, height = image.size
            if width * height > max_pixels:
                raise too_many(f"{width}x{height}")
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
            image.verify()
        # verify() reads chunks, not pixels: a truncated file passes it and fails later in the model. Decoding it
        # (now that its pixel count is known to be within the limit; JPEG at 1/8 scale) refuses it here.
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as exc:  # Pillow refuses to open it at all (over twice its own limit)
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_many(f"{int(counted.group(1)):,}" if counted else "far too many") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        raise InvalidRequest(
            f"Request files [inputImage] {label} is not an image this service can read. "
            "Send PNG, JPEG, WebP, GIF, BMP or TIFF."
        ) from None
    if fmt not in IMAGE_FORMATS:
        raise InvalidRequest(f"Request files [inputImage] {label} is {fmt}; send PNG, JPEG, WebP, GIF, BMP or TIFF.")
    if min(width, height) < 14 or max(width, height) / min(width, height) > 16:
        raise InvalidRequest(
            f"Request files [inputImage] {label} is {width}x{height}; each side must be over 14 px and the "
            "aspect ratio within 1:16 to 16:1."
        )
    return IMAGE_FORMATS[fmt], width, height


def check_bytes(uploads: Sequence[Upload], max_pixels: int) -> int:
    """What checking ``uploads`` holds in memory at most: all their bytes, and the pixels of the largest (they
    are decoded one at a time; Pillow keeps up to 4 bytes a pixel), read from the headers alone."""
    largest = 0
    for upload in uploads:
        try:
            with Image.open(io.BytesIO(upload.data)) as image:
                largest = max(largest, min(image.width * image.height, max_pixels))
        except (
            Image.DecompressionBombError,
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            struct.error,
        ):
            pass  # check_image refuses it without decoding it
    return sum(len(upload.data) for upload in uploads) + 4 * largest


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation found in the file's header (never by decoding pixels, as ``getexif`` may for PNG)."""
    raw = image.info.get("exif")
    if isinstance(raw, bytes):
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(_EXIF_ORIENTATION)
    elif image.format == "TIFF":
        value = image.getexif().get(_EXIF_ORIENTATION)
    else:
        return None
    return value if isinstance(value, int) else None


def _check_upload(upload: Upload, number: int, max_bytes: int, max_pixels: int) -> Reference:
    label = f"{number} ({upload.filename!r})" if upload.filename else str(number)
    ext, width, height = check_image(upload.data, label, max_bytes, max_pixels)
    return Reference(upload=upload, ext=ext, width=width, height=height)
