"""Checking an image a client sent (an upload, a data URI, a fetched URL) by its content, within bounded memory.

Every dialect's references, File/Upload and the preprocess stage's fetched URLs go through ``check_image``:
a decompression bomb is refused from its header, a truncated file by decoding it within the pixel limit.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from dreamserve.errors import InvalidField
from dreamserve.request import Field, Upload

REFERENCES = Field.REFERENCES
#: Pillow's format names, as the extension a checked image is stored with.
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}
#: EXIF tag 274: values 5 to 8 mean the stored image is displayed turned by 90 degrees.
_EXIF_ORIENTATION = 0x0112


def check_image(data: bytes, label: str, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Identify an image by its content (never its name); returns (extension, upright width, upright height).

    Only the header is read before the pixel count is checked, so a decompression bomb (a huge image that
    compresses small) is refused without decoding it; ``verify`` then walks the file, and a full decode
    within the pixel limit refuses truncated files. Width and height are as displayed: an EXIF
    orientation that rotates by 90 degrees swaps them.
    """
    if len(data) > max_bytes:
        raise InvalidField(
            REFERENCES, f"{label} is {len(data):,} bytes; the limit is {max_bytes:,}.", limit=max_bytes, files=True
        )
    fmt, width, height = _decode(data, label, max_pixels)
    if fmt not in IMAGE_FORMATS:
        raise InvalidField(REFERENCES, f"{label} is {fmt}; send PNG, JPEG, WebP, GIF, BMP or TIFF.", files=True)
    if min(width, height) < 14 or max(width, height) / min(width, height) > 16:
        raise InvalidField(
            REFERENCES,
            f"{label} is {width}x{height}; each side must be over 14 px and the aspect ratio within 1:16 to 16:1.",
            files=True,
        )
    return IMAGE_FORMATS[fmt], width, height


def _too_many(label: str, pixels: str, max_pixels: int) -> InvalidField:
    reason = f"{label} has {pixels} pixels; the limit is {max_pixels:,}. Send a smaller image."
    return InvalidField(REFERENCES, reason, limit=max_pixels, files=True)


def _decode(data: bytes, label: str, max_pixels: int) -> tuple[str, int, int]:
    """The format and upright size of an image, the pixel count checked from its header before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many(label, f"{width}x{height}", max_pixels)
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
        raise _too_many(label, f"{int(counted.group(1)):,}" if counted else "far too many", max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        raise InvalidField(
            REFERENCES,
            f"{label} is not an image this service can read. Send PNG, JPEG, WebP, GIF, BMP or TIFF.",
            files=True,
        ) from None
    return fmt, width, height


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
