"""``create_app(settings)``: wires routers, the lifespan, and the one place errors become responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreamserve import __version__
from dreamserve.api import files, health, metrics, security, web
from dreamserve.dialects.mount import CALLBACK_FORMATS, mount, running
from dreamserve.dialects.wiro.errors import wiro_error
from dreamserve.errors import (
    DreamError,
    HTTPProtocolError,
    InvalidRequest,
    MethodNotAllowed,
    RouteNotFound,
    ServerError,
    new_error_id,
)
from dreamserve.metrics import Monitor
from dreamserve.services import Services
from dreamserve.settings import Settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, on_start: Callable[[Services], Coroutine[Any, Any, None]] | None = None
) -> FastAPI:
    """``on_start`` runs beside the server once its services are up (``serve`` announces readiness with it)."""
    settings = settings or Settings()
    monitor = Monitor()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings, callback_formats=CALLBACK_FORMATS)
        await services.start()
        app.state.services = services
        await monitor.tasks.begin(services.sessions)
        try:
            async with running(app, services):
                hook = asyncio.create_task(on_start(services), name="on_start") if on_start else None
                try:
                    yield
                finally:
                    if hook is not None:
                        hook.cancel()
        finally:
            await services.close()

    app = FastAPI(title="dreamserve", version=__version__, lifespan=lifespan)
    app.state.monitor = monitor
    # The server's file URLs, which every dialect hands out; then each dialect's routes.
    app.include_router(files.router)
    mount(app)
    for module in (health, metrics):
        app.include_router(module.router)
    web.install(app, playground=settings.playground)
    app.add_middleware(metrics.RequestCounter, stats=monitor.requests)
    security.install(app, settings)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DreamError)
    async def dream_error(_: Request, exc: DreamError) -> JSONResponse:
        return wiro_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: DreamError
        if exc.status_code == 404:
            error = RouteNotFound()
        elif exc.status_code == 405:
            error = MethodNotAllowed()
        else:
            error = HTTPProtocolError(str(exc.detail), exc.status_code)
        return wiro_error(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return wiro_error(InvalidRequest("Request parameters are invalid."))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log only; the client gets the id that finds it there.
        error_id = new_error_id()
        log.error("unhandled error [error id %s] on %s %r", error_id, request.method, request.url.path, exc_info=exc)
        error = ServerError(f"Internal server error (error id {error_id}). It was logged; retry with backoff.")
        return wiro_error(error)
