"""Where each dialect's routes are mounted: one line per dialect."""

from __future__ import annotations

from fastapi import FastAPI

from dreamserve.dialects.ark.routes import router as ark
from dreamserve.dialects.fal.routes import router as fal
from dreamserve.dialects.openai.routes import router as openai

#: Every dialect's router but Wiro's (whose routes are ``api/``'s, mounted before these).
ROUTERS = (openai, ark, fal)


def mount(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)
