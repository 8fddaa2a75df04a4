"""Seedream's size grammar, where every dialect's size ends: Wiro's presets, ``1K``/``2K``/``4K``, or ``WxH``."""

from __future__ import annotations

import re

from dreamserve.errors import InvalidField
from dreamserve.request import Field

Size = tuple[int, int]
#: Seedream's presets by aspect ratio, the 1K, 2K and 4K sizes of each.
_PRESETS: dict[str, tuple[Size, Size, Size]] = {
    "1:1": ((1024, 1024), (2048, 2048), (4096, 4096)),
    "4:3": ((1152, 864), (2304, 1728), (4704, 3520)),
    "3:4": ((864, 1152), (1728, 2304), (3520, 4704)),
    "16:9": ((1280, 720), (2560, 1440), (5504, 3040)),
    "9:16": ((720, 1280), (1440, 2560), (3040, 5504)),
    "3:2": ((1248, 832), (2496, 1664), (4992, 3328)),
    "2:3": ((832, 1248), (1664, 2496), (3328, 4992)),
    "21:9": ((1512, 648), (3024, 1296), (6240, 2656)),
}
#: Each tier's presets by aspect ratio.
TIERS: dict[str, dict[str, Size]] = {
    tier: {ratio: sizes[n] for ratio, sizes in _PRESETS.items()} for n, tier in enumerate(("1K", "2K", "4K"))
}
#: Wiro's eight presets for bytedance/seedream-v4 (2K class), by aspect ratio.
PRESETS_2K = TIERS["2K"]

#: Seedream 4.0 bounds for explicit sizes: 1280x720 to 4096x4096 pixels, aspect ratio 1:16 to 16:1.
MIN_PIXELS = 1280 * 720
MAX_PIXELS = 4096 * 4096
MAX_ASPECT = 16.0
DEFAULT_SIZE = "2048x2048"

_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX×*]\s*(\d{1,6})\s*$")
_HINT = (
    "Use one of the presets (" + ", ".join(f"{w}x{h}" for w, h in PRESETS_2K.values()) + "), 1K, 2K, 4K, "
    f"or WxH with {MIN_PIXELS:,} to {MAX_PIXELS:,} pixels and an aspect ratio between 1:16 and 16:1"
)


def parse_size(
    value: str | None, reference: tuple[int, int] | None = None, min_pixels: int = MIN_PIXELS
) -> tuple[int, int]:
    """Return ``(width, height)`` for a ``size`` value.

    ``1K``/``2K``/``4K`` pick the tier's preset whose aspect ratio is closest to ``reference``
    (the first reference image), or 1:1 without one, as Seedream's "mode 1" lets the model choose.
    """
    text = (value or DEFAULT_SIZE).strip()
    tier = TIERS.get(text.upper())
    if tier is not None:
        if reference is None:
            return tier["1:1"]
        ratio = reference[0] / reference[1]
        return min(tier.values(), key=lambda wh: abs(wh[0] / wh[1] - ratio) / ratio)
    match = _WXH.match(text)
    if match is None:
        raise InvalidField(Field.SIZE, f"is not a size: {text[:40]!r}. {_HINT}.")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise InvalidField(Field.SIZE, f"must have a positive width and height, got {text}. {_HINT}.")
    aspect = max(width / height, height / width)
    if aspect > MAX_ASPECT:
        raise InvalidField(Field.SIZE, f"has aspect ratio {aspect:.1f}:1, beyond 16:1 ({width}x{height}). {_HINT}.")
    pixels = width * height
    if not min_pixels <= pixels <= MAX_PIXELS:
        hint = _HINT if min_pixels == MIN_PIXELS else _HINT.replace(f"{MIN_PIXELS:,}", f"{min_pixels:,}")
        raise InvalidField(Field.SIZE, f"{width}x{height} has {pixels:,} pixels. {hint}.")
    return width, height
