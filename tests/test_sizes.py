from __future__ import annotations

import pytest

from dreamserve.errors import InvalidRequest
from dreamserve.sizes import MAX_PIXELS, MIN_PIXELS, PRESETS_2K, parse_size


@pytest.mark.parametrize("size", [f"{w}x{h}" for w, h in PRESETS_2K.values()])
def test_wiro_presets(size: str) -> None:
    width, height = parse_size(size)
    assert f"{width}x{height}" == size


def test_tiers_follow_the_reference_aspect() -> None:
    assert parse_size("2K") == (2048, 2048)
    assert parse_size("1k") == (1024, 1024)
    assert parse_size("4K", reference=(1920, 1080)) == (5504, 3040)
    assert parse_size("2K", reference=(600, 800)) == (1728, 2304)


def test_default_and_spellings() -> None:
    assert parse_size(None) == (2048, 2048)
    assert parse_size(" 1600 X 600 ") == (1600, 600)  # Ark's own example of a valid odd size
    assert parse_size("1280×720") == (1280, 720)


@pytest.mark.parametrize("size", ["0x0", "800x800", "4097x4097", "4000x240", "abc", "12x", "-5x100", "1e3x1e3"])
def test_rejects(size: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_size(size)
    assert info.value.message.startswith("Request parameter [size]")


def test_bounds_are_inclusive() -> None:
    assert parse_size("1280x720")[0] * 720 == MIN_PIXELS
    assert parse_size("4096x4096")[0] * 4096 == MAX_PIXELS
    assert parse_size("4096x256") == (4096, 256)  # exactly 16:1 and 1,048,576 px
