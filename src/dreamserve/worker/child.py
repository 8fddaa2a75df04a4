"""The model process. Spawned (never forked: CUDA and fork do not mix), it loads the model once,
then runs one job at a time sent by its supervisor over a pipe and answers with plain dicts:

    parent -> child   {"op": "run", "job": GenerationJob}        {"op": "exit"}
                      {"op": "run_group", "jobs": [GenerationJob]}  {"op": "stop", "job": i} (during a group)
    child -> parent   {"type": "ready", "load_seconds": s}       {"type": "fatal", "message": m}
                      {"type": "start"}
                      {"type": "step", "job": i, "step": k, "total": n, "elapsed": s, "preview": uri (some steps)}
                      {"type": "job_canceled", "job": i} (a group member stopped; its images will be dropped)
                      {"type": "done", "result": GenerationResult}
                      {"type": "canceled"}  {"type": "error", "message": m, "traceback": tb}
                      {"type": "group_done", "results": [{"result": ...} | {"canceled": true} | {"message": m}]}

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

    def on_step(info: StepInfo, job: int = 0) -> None:
        message = {"type": "step", "job": job, "step": info.step, "total": info.total, "elapsed": info.elapsed}
        if info.preview is not None:
            message["preview"] = info.preview
        conn.send(message)

    stopped: set[int] = set()

    def group_should_stop(index: int) -> bool:
        # Per-job cancels arrive as messages while the group runs; the stop event still stops them all.
        while conn.poll():
            message = conn.recv()
            if message.get("op") == "stop" and int(message["job"]) not in stopped:
                stopped.add(int(message["job"]))
                conn.send({"type": "job_canceled", "job": int(message["job"])})
        return stop.is_set() or index in stopped

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        op = message.get("op")
        if op == "stop":
            continue  # a cancel that arrived after its job ended
        if op not in ("run", "run_group"):
            return
        stop.clear()
        stopped.clear()
        conn.send({"type": "start"})
        if op == "run_group":
            jobs = [GenerationJob.from_dict(job) for job in message["jobs"]]
            try:
                outcomes = engine.generate_group(jobs, lambda i, info: on_step(info, i), group_should_stop)
            except Exception as exc:
                conn.send(
                    {"type": "error", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                )
                continue
            conn.send({"type": "group_done", "results": [_outcome(o) for o in outcomes]})
            continue
        try:
            result = engine.generate(GenerationJob.from_dict(message["job"]), on_step, stop.is_set)
        except Interrupted:
            conn.send({"type": "canceled"})
        except Exception as exc:
            conn.send({"type": "error", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        else:
            conn.send({"type": "done", "result": result.to_dict()})


def _outcome(outcome: Any) -> dict[str, Any]:
    from dreamserve.engine import Interrupted

    if isinstance(outcome, Interrupted):
        return {"canceled": True}
    if isinstance(outcome, Exception):
        return {"message": f"{type(outcome).__name__}: {outcome}"}
    return {"result": outcome.to_dict()}
