"""Where each dialect's routes are mounted: one line per dialect."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from dreamserve.dialects.ark.routes import router as ark
from dreamserve.dialects.fal.routes import router as fal
from dreamserve.dialects.fal.webhook import FalCallbacks
from dreamserve.dialects.openai.routes import router as openai
from dreamserve.dialects.replicate.routes import router as replicate
from dreamserve.dialects.replicate.webhook import ReplicateCallbacks
from dreamserve.services import Services
from dreamserve.webhooks import CallbackFormat

#: Every dialect's router but Wiro's (whose routes are ``api/``'s, mounted before these).
ROUTERS = (openai, ark, replicate, fal)
#: The dialects whose callbacks have a shape of their own (``webhooks.CallbackFormat``), by dialect name.
CALLBACK_FORMATS: dict[str, Callable[[Services], CallbackFormat]] = {
    "replicate": ReplicateCallbacks,
    "fal": FalCallbacks,
}


def mount(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)
