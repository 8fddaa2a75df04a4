"""The web playground at ``/``: one static page (``static/``, no build step) that talks to the public API.

The page holds the key and secret in the browser (localStorage) and signs each request with
WebCrypto exactly as Wiro's clients do, so the server grants it nothing a script could not have.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    # Revalidate every time: an upgraded server must not be driven by a cached older page.
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
