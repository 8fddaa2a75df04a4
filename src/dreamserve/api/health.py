"""``/healthz`` (the process answers, with worker states) and ``/readyz`` (every served model is loaded)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from dreamserve.api.deps import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, Any]:
    return {"status": "ok", "workers": [s.status() for s in services.supervisors]}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    waiting = [s.status() for s in services.supervisors if not s.state.is_loaded]
    ready = not waiting
    return JSONResponse({"ready": ready, "waiting": waiting}, status_code=200 if ready else 503)
