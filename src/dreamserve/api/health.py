"""``/healthz`` (the process answers, with worker states) and ``/readyz`` (every served model is loaded)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from dreamserve.api.deps import ServicesDep
from dreamserve.worker.supervisor import WorkerState

router = APIRouter()


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, Any]:
    return {"status": "ok", "workers": [s.status() for s in services.supervisors]}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    loaded = {WorkerState.READY, WorkerState.BUSY}
    waiting = [s.status() for s in services.supervisors if s.state not in loaded]
    ready = not waiting
    return JSONResponse({"ready": ready, "waiting": waiting}, status_code=200 if ready else 503)
