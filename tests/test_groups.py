"""The group size read from a prompt (Ark's ``sequential_image_generation: "auto"``), English and Chinese."""

from __future__ import annotations

import pytest

from dreamserve.groups import image_count

CASES = [
    # English: digits, words, describing words between, sets, compounds
    ("3 images of a fox in the four seasons", 3),
    ("Generate 4 images: a red fox in spring, summer, autumn and winter", 4),
    ("two posters for a jazz festival", 2),
    ("Design three square posters for a coffee brand", 3),
    ("a set of four illustrations of a lighthouse", 4),
    ("a series of 5 storyboard frames", 5),
    ("four consecutive storyboard panels of a chase", 4),
    ("a 4-panel comic about a cat", 4),
    ("a pair of matching logos", 2),
    ("Create 6 sticker designs with a happy panda", 6),
    ("twelve icons for a weather app", 12),
    ("3 cats in two images", 2),
    ("a poster with 3 cats", 1),
    ("a photo of two people on a bench", 1),
    ("a red fox in snow", 1),
    ("ONE image, please", 1),
    ("Make 20 images of a teapot", 15),
    ("0 images", 1),
    # Chinese: Arabic and Chinese numerals, classifiers, sets
    ("生成3张图片，主题是四季", 3),
    ("三张图：春、夏、秋", 3),
    ("画两幅山水画", 2),
    ("一组四张连贯的分镜", 4),
    ("一组5个海报设计", 5),
    ("设计十二张表情包", 12),
    ("生成十五张", 15),
    ("两个人在海边散步", 1),
    ("第一张是猫", 1),
    ("一只猫在雪地里", 1),
    ("生成３张图", 3),  # full-width digit
    ("生成一组图", 1),
]


@pytest.mark.parametrize(("prompt", "expected"), CASES)
def test_image_count(prompt: str, expected: int) -> None:
    assert image_count(prompt, 15) == expected


def test_count_is_capped_by_the_limit() -> None:
    assert image_count("3 images of a fox", 2) == 2
    assert image_count("生成10张", 4) == 4
    assert image_count("a single image", 1) == 1
