"""Where each dialect's routes are mounted: one line per dialect."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from dreamserve.dialects.ark.routes import router as ark
from dreamserve.dialects.fal.routes import router as fal
from dreamserve.dialects.fal.webhook import FalCallbacks
from dreamserve.dialects.openai.routes import router as openai
from dreamserve.dialects.replicate.routes import router as replicate
from dreamserve.dialects.replicate.webhook import ReplicateCallbacks
from dreamserve.dialects.wiro.routes import router as wiro
from dreamserve.dialects.wiro.socket import sockets
from dreamserve.dialects.wiro.webhook import WiroCallbacks
from dreamserve.services import Services
from dreamserve.webhooks import CallbackFormat

#: Every dialect's router, Wiro's first (its routes were the first served; none of the others overlaps them).
ROUTERS = (wiro, openai, ark, replicate, fal)
#: Each dialect's callbacks (``webhooks.CallbackFormat``), by dialect name; Wiro's for a task of any other.
CALLBACK_FORMATS: dict[str, Callable[[Services], CallbackFormat]] = {
    "wiro": WiroCallbacks,
    "replicate": ReplicateCallbacks,
    "fal": FalCallbacks,
}
#: What a dialect keeps while the app runs, opened once the services started and closed before they stop.
LIFESPANS: tuple[Callable[[FastAPI, Services], AbstractAsyncContextManager[None]], ...] = (sockets,)


def mount(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)


@contextlib.asynccontextmanager
async def running(app: FastAPI, services: Services) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for lifespan in LIFESPANS:
            await stack.enter_async_context(lifespan(app, services))
        yield
