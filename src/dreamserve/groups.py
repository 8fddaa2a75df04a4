"""How many images a group-generation prompt asks for (Ark's ``sequential_image_generation: "auto"``).

Seedream decides the group size from the prompt ("the prompt should state the count", api-spec.md §2.1).
An open-weight model does not, so the count is read here: the first number that counts images, in
English ("3 images", "two posters", "a set of four", "a 4-panel comic") or Chinese ("生成3张", "三张图",
"一组四幅"), capped by the request's limit; 1 when the prompt names none. Numbers that count other
things ("3 cats", "两个人") are not image counts.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["image_count"]

_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "a pair of": 2,
    "a couple of": 2,
    "pair of": 2,
    "couple of": 2,
}
#: Nouns that name one image of a group, singular or plural.
_NOUNS = (
    "image|picture|pic|photo|photograph|poster|illustration|panel|frame|variation|version|shot|scene|sticker|"
    "icon|logo|design|card|page|slide|view|pose|look|render|rendering|drawing|painting|portrait|sketch|"
    "wallpaper|cover|thumbnail|banner|flyer|artwork|graphic|storyboard|comic|emoji|avatar|mockup|layout|option|"
    "concept|angle|still|postcard|badge|label|character sheet"
)
_NUMBER = r"\b(\d{1,3}|" + "|".join(sorted((re.escape(w) for w in _WORDS), key=len, reverse=True)) + r")\b"
#: Up to three describing words between a number and its noun ("two square posters"); not words that start
#: another phrase ("3 cats in two images" asks for two).
_BETWEEN = r"(?:(?!(?:of|in|on|with|and|or|for|per|each|at|from|to|by|the|a|an)\b)[a-z'-]+\s+){0,3}?"
_ENGLISH = [
    # "3 images", "two square posters", "four consecutive storyboard panels", "3 different product shots"
    re.compile(_NUMBER + r"\s+" + _BETWEEN + r"(?:" + _NOUNS + r")(?:e?s)?\b", re.IGNORECASE),
    # "a 4-panel comic", "a 3-image series"
    re.compile(_NUMBER + r"-(?:" + _NOUNS + r")\b", re.IGNORECASE),
    # "a set of four", "a series of 5", "a group of three"
    re.compile(r"\b(?:set|series|group|sequence|collection|batch|pack|gallery)\s+of\s+" + _NUMBER, re.I),
]

_HAN_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "俩": 2, "三": 3, "四": 4}
_HAN_DIGITS.update({"五": 5, "六": 6, "七": 7, "八": 8, "九": 9})
_HAN_NUMBER = r"(?<!第)(\d{1,3}|[一二两俩三四五六七八九十]{1,3})"
#: Classifiers that count pictures by themselves; ``个``/``组`` only before a picture noun.
_CHINESE = [
    re.compile(_HAN_NUMBER + r"\s*[张幅帧款]"),
    re.compile(_HAN_NUMBER + r"\s*个\s*(?:图|图片|海报|画面|版本|场景|分镜|表情|头像|插画|设计)"),
    re.compile(r"一[组套系列]\s*" + _HAN_NUMBER + r"(?![张幅帧款个]|\d)"),
]


def image_count(prompt: str, cap: int) -> int:
    """The group size the prompt asks for, between 1 and ``cap``."""
    text = unicodedata.normalize("NFKC", prompt)  # full-width digits become ASCII ones
    found: list[tuple[int, int]] = []
    for pattern in _ENGLISH:
        found += [(match.start(), _english(match.group(1))) for match in pattern.finditer(text)]
    for pattern in _CHINESE:
        found += [(match.start(), _chinese(match.group(1))) for match in pattern.finditer(text)]
    counts = [count for _, count in sorted(found) if count > 0]
    return max(1, min(counts[0] if counts else 1, cap))


def _english(word: str) -> int:
    return int(word) if word.isdigit() else _WORDS.get(word.lower(), 0)


def _chinese(number: str) -> int:
    """Arabic digits, or Chinese numerals up to 99 (``三``, ``十``, ``十二``, ``二十``)."""
    if number.isdigit():
        return int(number)
    if "十" not in number:
        return _HAN_DIGITS.get(number, 0) if len(number) == 1 else 0
    tens, _, units = number.partition("十")
    if len(tens) > 1 or len(units) > 1:
        return 0
    return (_HAN_DIGITS.get(tens, 0) if tens else 1) * 10 + (_HAN_DIGITS.get(units, 0) if units else 0)
