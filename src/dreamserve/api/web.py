"""The web playground at ``/``: one static page (``static/``, no build step) that talks to the public API.

The page holds the key and secret in the browser (localStorage) and signs each request with
WebCrypto exactly as Wiro's clients do, so the server grants it nothing a script could not have.
Its statuses, labels and request limits come from the server, inlined into the page (``page_config``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from dreamserve.request import MAX_REFERENCES, MAX_TOTAL_IMAGES
from dreamserve.settings import DEFAULT_MODEL
from dreamserve.status import FINAL, LABELS, LIFECYCLE, Frame, Pexit, TaskStatus

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = "<!-- dreamserve-config: replaced by the server with the vocabulary and limits app.js reads -->"
router = APIRouter()


def page_config() -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL,
        "maxReferences": MAX_REFERENCES,
        "maxImages": MAX_TOTAL_IMAGES,
        "status": {status.name: status.value for status in TaskStatus},
        "frame": {frame.name: frame.value for frame in Frame},
        "pexit": {code.name: code.value for code in Pexit},
        "terminal": sorted(FINAL),
        # A progress frame means running too.
        "running": [status.value for status in LIFECYCLE if status.holds_lease] + [Frame.OUTPUT.value],
        "statusText": {status.value: label for status, label in LABELS.items()},
    }


@cache
def _page() -> str:
    # "<" escaped: the JSON sits inside a <script> element.
    data = json.dumps(page_config()).replace("<", "\\u003c")
    block = f'<script id="dreamserve-config" type="application/json">{data}</script>'
    return (STATIC / "index.html").read_text().replace(PLACEHOLDER, block)


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    # Revalidate every time: an upgraded server must not be driven by a cached older page.
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    # Browsers ask for it on every page of the origin (file URLs included); a PNG under this name is fine for all.
    return FileResponse(STATIC / "favicon.png", media_type="image/png", headers={"Cache-Control": "max-age=86400"})


def install(app: FastAPI, playground: bool) -> None:
    if playground:
        app.include_router(router)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    else:
        app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False)
