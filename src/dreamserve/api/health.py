"""``/healthz`` (the process answers, with worker states) and ``/readyz`` (every served model is loaded and
every background loop is alive: a loop that died or stopped completing iterations fails it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from dreamserve.api.deps import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, Any]:
    return {
        "status": "ok",
        "workers": [s.status() for s in services.supervisors],
        "loops": services.liveness.problems(),
    }


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    waiting = [s.status() for s in services.supervisors if not s.state.is_loaded]
    loops = services.liveness.problems()
    ready = not waiting and not loops
    return JSONResponse({"ready": ready, "waiting": waiting, "loops": loops}, status_code=200 if ready else 503)
