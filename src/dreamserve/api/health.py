"""``/healthz`` (the process answers, with worker states) and ``/readyz`` (every served model is loaded and
every background loop is alive: a loop that died or stopped completing iterations fails it)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dreamserve.api.deps import ServicesDep
from dreamserve.api.security import ops_authorized

router = APIRouter()


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, Any]:
    return {
        "status": "ok",
        "workers": [asdict(s.status()) for s in services.supervisors],
        "loops": services.liveness.problems(),
    }


@router.get("/readyz")
async def readyz(request: Request, services: ServicesDep) -> JSONResponse:
    """Open to probes; which workers are waiting (hosts, pids) only with the ops token, when one is set."""
    waiting = [asdict(s.status()) for s in services.supervisors if not s.state.is_loaded]
    loops = services.liveness.problems()
    ready = not waiting and not loops
    body: dict[str, Any] = {"ready": ready}
    if ops_authorized(services.settings, request.headers):
        body["waiting"] = waiting
        body["loops"] = loops
    elif loops:
        body["loops"] = [{"loop": loop["loop"], "problem": loop["problem"]} for loop in loops]
    return JSONResponse(body, status_code=200 if ready else 503)
