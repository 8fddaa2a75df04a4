"""Wiro's routes as one router, for ``dialects/mount.py``: Run, Task/*, Tool/*, File/* and the task socket."""

from __future__ import annotations

from fastapi import APIRouter

from dreamserve.dialects.wiro import files, run, socket, tasks, tools

router = APIRouter()
for module in (run, tasks, tools, files, socket):
    router.include_router(module.router)
