"""``create_app(settings)``: wires routers, the lifespan, and the one place errors become responses."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreamserve import __version__
from dreamserve.api import files, health, metrics, openai, run, socket, tasks, tools, web
from dreamserve.errors import (
    DreamError,
    HTTPProtocolError,
    InvalidRequest,
    MethodNotAllowed,
    RateLimited,
    RouteNotFound,
    ServerError,
)
from dreamserve.metrics import Monitor
from dreamserve.services import Services
from dreamserve.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    monitor = Monitor()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        await services.start()
        app.state.services = services
        await monitor.tasks.begin(services.sessions)
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(title="dreamserve", version=__version__, lifespan=lifespan)
    app.state.monitor = monitor
    #: Open task sockets per client address (``api/socket.py``).
    app.state.socket_addresses = Counter()
    for module in (run, tasks, tools, files, openai, socket, health, metrics):
        app.include_router(module.router)
    if settings.playground:
        web.install(app)
    app.add_middleware(metrics.RequestCounter, stats=monitor.requests)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DreamError)
    async def dream_error(_: Request, exc: DreamError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        return JSONResponse(exc.to_wire(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: DreamError
        if exc.status_code == 404:
            error = RouteNotFound()
        elif exc.status_code == 405:
            error = MethodNotAllowed()
        else:
            error = HTTPProtocolError(str(exc.detail), exc.status_code)
        return JSONResponse(error.to_wire(), status_code=error.http_status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(InvalidRequest("Request parameters are invalid.").to_wire())

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        error = ServerError()
        return JSONResponse(error.to_wire(), status_code=error.http_status)
