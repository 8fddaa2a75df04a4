"""Reading values off the wire, as every dialect needs: text that is valid Unicode and not nested too deep, URLs
without control characters, and integers and flags sent as JSON values or as form text."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from dreamserve.errors import InvalidField, InvalidRequest, NotFound
from dreamserve.request import Field, Upload

#: Largest id a row can have: SQLite and PostgreSQL integers are 64-bit.
MAX_ID = 2**63 - 1
#: Deepest nesting of a JSON body: the APIs' bodies are flat, with arrays of strings or small objects at most.
MAX_JSON_DEPTH = 16
_DATA_URI = re.compile(r"^data:image/([a-z0-9.+-]+);base64,", re.IGNORECASE)


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
        raise InvalidField(
            name,
            f"contains the control or space character {url[bad]!r} at position {bad}; send the URL percent-encoded.",
        )


def ascii_int(raw: str, name: str, *, low: int, high: int) -> int:
    """An integer written in ASCII digits (``str.isdigit`` is also true of "²" and "١"), within bounds."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(high)) or not low <= int(text) <= high:
        raise InvalidField(name, f"must be an integer from {low} to {high}, got {text[:20]!r}.", limit=high)
    return int(text)


def ascii_id(fields: Mapping[str, Sequence[Any]], *names: str) -> int | None:
    """An optional row id given under any of ``names``; "" and "0" mean none."""
    values = [value for name in names for value in fields.get(name, ())]
    raw = str(values[-1]).strip() if values else ""
    if raw in ("", "0"):
        return None
    return ascii_int(raw, names[0], low=1, high=MAX_ID)


def number(raw: str, name: str, *, low: int, high: int) -> int:
    """An integer sent as text, as Wiro's clients send numbers ("3", "3.0"); bounds name the range in the error
    (and refuse ``nan``, ``inf`` and ``1e999``, which are floats too)."""
    text = raw.strip()
    if not text.isascii():  # float() also reads "١٥" and other non-ASCII digits
        raise InvalidField(name, f"must be integer or float, got {text[:20]!r}.")
    try:
        value = float(text)
    except ValueError:
        raise InvalidField(name, f"must be integer or float, got {text[:20]!r}.") from None
    if not math.isfinite(value) or value != int(value) or not low <= value <= high:
        raise InvalidField(name, f"must be between {low} and {high}, got {text[:20]}.", limit=high)
    return int(value)


def flag(raw: str, name: str) -> bool:
    """A boolean sent as text: ``true``/``false``, ``1``/``0``, ``yes``/``no``; empty is false."""
    text = raw.strip().lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise InvalidField(name, f'must be "true" or "false", got {text[:20]!r}.')


def decode_data_uri(entry: str, number: int, max_bytes: int) -> Upload:
    """A ``data:image/<fmt>;base64,...`` URI as the upload it carries, refused before decoding when too large."""
    match = _DATA_URI.match(entry)
    if match is None:
        raise InvalidField(Field.REFERENCES, f"entry {number} is not a data:image/<format>;base64,<data> URI.")
    encoded = entry[match.end() :]
    if len(encoded) // 4 * 3 > max_bytes + 3:
        raise InvalidField(Field.REFERENCES, f"entry {number} is larger than {max_bytes:,} bytes.", limit=max_bytes)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(Field.REFERENCES, f"entry {number} is not valid base64.") from None
    return Upload(filename=f"image-{number}.{match.group(1).lower()}", data=data)


def served_model(model: str, models: Collection[str], aliases: Mapping[str, str], missing: str) -> str:
    """The served slug a dialect's model name stands for: a served slug as given, else the target of the dialect's
    own name for it (``aliases``; both case-insensitive). Anything else is the dialect's 404, ``missing`` with
    ``{model}`` and ``{known}`` (the names it takes) filled in."""
    slug = model.lower()
    if slug not in models:
        slug = {name.lower(): target.lower() for name, target in aliases.items()}.get(slug, "")
    if slug not in models:
        raise NotFound(missing.format(model=model[:100], known=", ".join(sorted({*aliases, *models}))))
    return slug
