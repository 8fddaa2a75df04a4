"""The model process. Spawned (never forked: CUDA and fork do not mix), it loads the model once,
then runs one job at a time sent by its supervisor over a pipe and answers with plain dicts:

    parent -> child   {"op": "run", "job": GenerationJob}        {"op": "exit"}
    child -> parent   {"type": "ready", "load_seconds": s}       {"type": "fatal", "message": m}
                      {"type": "start"}  {"type": "step", "step": i, "total": n, "elapsed": s}
                      {"type": "done", "result": GenerationResult}
                      {"type": "canceled"}  {"type": "error", "message": m, "traceback": tb}

Cancel is the shared ``stop`` event, read by the diffusers step callback; kill is SIGKILL from
the supervisor, which frees every byte this process holds, GPU memory included.
"""

from __future__ import annotations

import traceback
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from typing import Any


def child_main(conn: Connection, stop: EventType, spec: dict[str, Any]) -> None:
    # Imported here: only the child process may import torch.
    from dreamserve.engine import Engine, Interrupted
    from dreamserve.jobs import GenerationJob, StepInfo
    from dreamserve.settings import ModelSpec

    try:
        engine = Engine.load(ModelSpec(**spec))
    except Exception as exc:
        conn.send({"type": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"type": "ready", "load_seconds": engine.load_seconds})

    def on_step(info: StepInfo) -> None:
        conn.send({"type": "step", "step": info.step, "total": info.total, "elapsed": info.elapsed})

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message.get("op") != "run":
            return
        stop.clear()
        conn.send({"type": "start"})
        try:
            result = engine.generate(GenerationJob.from_dict(message["job"]), on_step, stop.is_set)
        except Interrupted:
            conn.send({"type": "canceled"})
        except Exception as exc:
            conn.send({"type": "error", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        else:
            conn.send({"type": "done", "result": result.to_dict()})
