"""Files: the parts of a Run upload (sniffed types, repeated ``inputImage`` fields) and where downloads go."""

from __future__ import annotations

import json
import mimetypes
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dreamserve.client.records import ImageInput, OutputRef
from dreamserve.errors import InvalidRequest


def is_url(image: ImageInput) -> bool:
    return isinstance(image, str) and image.startswith(("http://", "https://"))


def form_value(value: Any) -> str:
    """Multipart fields are strings: booleans as Wiro's "true"/"false", containers as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def sniff(data: bytes) -> tuple[str, str]:
    """(extension, content type) from magic bytes; servers check the content, not the name."""
    if data.startswith(b"\x89PNG"):
        return "png", "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg", "image/jpeg"
    if data.startswith(b"GIF8"):
        return "gif", "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return "bin", "application/octet-stream"


def file_part(image: ImageInput, number: int) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        ext, content_type = sniff(image)
        return f"image-{number}.{ext}", image, content_type
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"Cannot read input image {str(path)!r}: {exc.strerror or exc}.") from exc
    guessed = mimetypes.guess_type(path.name)[0]
    return path.name, data, guessed if guessed and guessed.startswith("image/") else sniff(data)[1]


def download_target(output: OutputRef, dest_dir: str | os.PathLike[str], filename: str | None) -> tuple[str, Path]:
    url = output if isinstance(output, str) else str(output.get("url") or "")
    if not url:
        raise InvalidRequest("This output has no url to download.")
    name = filename or (None if isinstance(output, str) else output.get("name")) or unquote(urlsplit(url).path)
    # Only the last component: a server-sent name must not write outside dest_dir.
    safe = Path(str(name).replace("\\", "/")).name.lstrip(".") or "output"
    folder = Path(dest_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return url, folder / safe
