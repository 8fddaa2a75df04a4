"""Wiro's Run form for ``bytedance/seedream-v4``, decoded into the core's ``RunRequest``.

Wiro's clients send JSON or multipart, numbers and booleans often as strings, and ``inputImage`` as repeated
fields, a JSON array, one string, or comma-separated URLs (api-spec.md §1.4, §1.12). This module reads that
syntax; the limits every API shares are checked by ``RunRequest`` and ``submit``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from dreamserve.dialects.wire import check_url_text, flag, number
from dreamserve.errors import InvalidField
from dreamserve.request import (
    MAX_PRIORITY,
    MAX_SEED,
    MAX_TOTAL_IMAGES,
    Callback,
    Field,
    RunRequest,
    Source,
    Upload,
)
from dreamserve.sizes import DEFAULT_SIZE

#: Wiro's names for the core's fields, in its messages and ``param``.
NAMES: dict[str, str] = {
    Field.REFERENCES: "inputImage",
    Field.NUM_IMAGES: "maxImages",
    Field.CALLBACK_URL: "callbackUrl",
    Field.CALLBACK_EVENTS: "callbackEvents",
}
#: The fields that carry reference images: uploads, URLs, this server's own file URLs.
REFERENCE_FIELDS = ("inputImage", "inputImageUrl")
#: A value that names a scheme (``ftp://...``) is a URL, checked as one; anything else in callbackUrl is not.
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Fields = Mapping[str, Sequence[Any]]


def decode(fields: Fields) -> RunRequest:
    """The request in ``fields`` (a name -> its values: str, list, bool, int or Upload)."""
    prompt = _text(fields, "prompt")
    references = _references(fields)
    # 0 means "the default" (the n8n node's own default is 0), as an empty value does.
    zero = _text(fields, "maxImages").strip() in ("0", "0.0")
    num_images = 1 if zero else _integer(fields, "maxImages", 1, low=1, high=MAX_TOTAL_IMAGES)
    size = _text(fields, "size").strip() or DEFAULT_SIZE
    seed = _text(fields, "seed")
    return RunRequest(
        prompt=prompt,
        size=size,
        asked_size=size,
        references=references,
        num_images=num_images,
        seed=_integer(fields, "seed", 0, low=0, high=MAX_SEED) if seed.strip() else None,
        watermark=flag(_text(fields, "watermark"), "watermark"),
        priority=_integer(fields, "priority", 0, low=0, high=MAX_PRIORITY),
        callback=_callback(fields),
    )


def _callback(fields: Fields) -> Callback:
    url = _text(fields, "callbackUrl").strip()
    events = tuple(e.strip() for e in _text(fields, "callbackEvents").split(",") if e.strip()) or ("completed",)
    if url and not _URL_LIKE.match(url):
        # Words (spaces allowed) are never called, but control characters would still reach logs and rows.
        check_url_text(url.replace(" ", ""), "callbackUrl")
        # Wiro's own curl sample carries "callbackUrl=Optional: Webhook URL ...": run the task, call nothing.
        reason = (
            f"callbackUrl {url[:80]!r} is not an http(s) URL, so no callback is sent for this task. "
            "Send an http:// or https:// URL, or leave callbackUrl out."
        )
        return Callback(events=events, refused=url, refused_reason=reason)
    if url and not url.lower().startswith(("http://", "https://")):
        raise InvalidField(Field.CALLBACK_URL, "must be an http:// or https:// URL.")
    check_url_text(url, "callbackUrl")
    return Callback(url=url, events=events)


def _values(fields: Fields, name: str) -> list[Any]:
    values: list[Any] = []
    for value in fields.get(name, ()):
        values.extend(value if isinstance(value, list) else [value])
    return values


def _text(fields: Fields, name: str) -> str:
    values = _values(fields, name)
    if not values:
        return ""
    value = values[-1]
    if isinstance(value, Upload):
        raise InvalidField(name, "must be text, not a file.")
    return "" if value is None else str(value)  # JSON null: as if left out


def _integer(fields: Fields, name: str, default: int, *, low: int, high: int) -> int:
    raw = _text(fields, name).strip()
    return number(raw, name, low=low, high=high) if raw else default


def _references(fields: Fields) -> tuple[Source, ...]:
    """Uploads as they are, and each URL of a (comma-separated) text value, in order."""
    references: list[Source] = []
    for value in _values(fields, "inputImage") + _values(fields, "inputImageUrl"):
        if isinstance(value, Upload):
            references.append(value)
            continue
        for url in str(value).split(","):
            url = url.strip()
            if not url:
                continue
            check_url_text(url, "inputImage")
            if not url.lower().startswith(("http://", "https://")):
                raise InvalidField(
                    Field.REFERENCES,
                    f"entry {len(references) + 1} must be an uploaded file or an http(s) URL, got {url[:60]!r}.",
                )
            references.append(url)
    return tuple(references)
