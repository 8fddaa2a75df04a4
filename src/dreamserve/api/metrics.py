"""``GET /metrics`` (Prometheus' text format, or OpenMetrics when the scraper asks for it) and the middleware that
counts HTTP requests for it."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreamserve.api.asgi import HTTPMiddleware
from dreamserve.api.deps import ServicesDep
from dreamserve.metrics import Monitor, RequestStats

router = APIRouter()


class RequestCounter(HTTPMiddleware):
    """Counts HTTP requests by route and status, and times them.

    Routes are labelled by their template (``/v1/File/{accesskey}/{name}``), never the raw path, and
    unknown paths share one label: label values must stay few.
    """

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        super().__init__(app)
        self.stats = stats

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.stats.record(scope["method"], route, status, time.perf_counter() - started)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, services: ServicesDep) -> Response:
    monitor: Monitor = request.app.state.monitor
    workers = [supervisor.status() for supervisor in services.supervisors]
    scrape = await monitor.scrape(services.sessions, services.settings.models, workers)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(scrape), media_type=content_type)
