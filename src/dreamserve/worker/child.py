"""The model process. Spawned (never forked: CUDA and fork do not mix), it loads the model once,
then runs one job at a time sent by its supervisor over a pipe and answers with plain dicts:

    parent -> child   {"op": "run", "job": GenerationJob}        {"op": "exit"}
                      {"op": "run_group", "jobs": [GenerationJob]}  {"op": "stop", "job": i} (during a group)
    child -> parent   {"type": "ready", "load_seconds": s}       {"type": "fatal", "message": m}
                      {"type": "start"}
                      {"type": "step", "job": i, "step": k, "total": n, "elapsed": s, "preview": uri (some steps)}
                      {"type": "image", "job": i, "image": GeneratedImage} (each image as soon as it is saved)
                      {"type": "image", "job": i, "failed": FailedImage} (an image that could not be finished)
                      {"type": "job_canceled", "job": i} (a group member stopped; it gets no more images)
                      {"type": "done", "result": GenerationResult}
                      {"type": "canceled"}  {"type": "error", "kind": k, "message": m, "traceback": tb}
                      {"type": "group_done", "results": [{"result": ...} | {"canceled": true} | {"kind": k, ...}]}
                      {"type": "log", "record": {...}} (any time: its logging, replayed by the parent, ``logs.py``)

Errors carry the full text and traceback for the supervisor's log; only their kind reaches clients.

Cancel is the shared ``stop`` event, read by the diffusers step callback; kill is SIGKILL from
the supervisor, which frees every byte this process holds, GPU memory included.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from typing import Any

from dreamserve.jobs import FailedImage, GeneratedImage, GenerationJob, StepInfo
from dreamserve.logs import forward_from_child

log = logging.getLogger(__name__)


def child_main(conn: Connection, stop: EventType, spec: dict[str, Any], log_level: int = logging.INFO) -> None:
    send = forward_from_child(conn.send, log_level)
    # Imported here: only the child process may import torch.
    from dreamserve.engine import Engine
    from dreamserve.settings import ModelSpec

    try:
        engine = Engine.load(ModelSpec(**spec))
    except Exception as exc:
        send({"type": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return
    log.info("model loaded in %.1f s", engine.load_seconds)
    send({"type": "ready", "load_seconds": engine.load_seconds})
    runner = _Runner(engine, conn, send, stop)
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
        runner.stopped.clear()
        send({"type": "start"})
        if op == "run_group":
            runner.run_group(message["jobs"])
        else:
            runner.run(message["job"])


class _Runner:
    """Runs the jobs of one message and sends what happens: steps, then one outcome message."""

    def __init__(self, engine: Any, conn: Connection, send: Callable[[dict[str, Any]], None], stop: EventType) -> None:
        self.engine, self.conn, self.send, self.stop = engine, conn, send, stop
        #: Members of the running group that a per-job ``stop`` message has cancelled.
        self.stopped: set[int] = set()

    def on_step(self, info: StepInfo, job: int = 0) -> None:
        message = {"type": "step", "job": job, "step": info.step, "total": info.total, "elapsed": info.elapsed}
        if info.preview is not None:
            message["preview"] = info.preview
        self.send(message)

    def on_image(self, job: int, image: GeneratedImage | FailedImage) -> None:
        key = "image" if isinstance(image, GeneratedImage) else "failed"
        self.send({"type": "image", "job": job, key: asdict(image)})

    def group_should_stop(self, index: int) -> bool:
        # Per-job cancels arrive as messages while the group runs; the stop event still stops them all.
        while self.conn.poll():
            message = self.conn.recv()
            if message.get("op") == "stop" and int(message["job"]) not in self.stopped:
                self.stopped.add(int(message["job"]))
                self.send({"type": "job_canceled", "job": int(message["job"])})
        return self.stop.is_set() or index in self.stopped

    def run_group(self, jobs: list[dict[str, Any]]) -> None:
        parsed = [GenerationJob.from_dict(job) for job in jobs]
        try:
            outcomes = self.engine.generate_group(
                parsed, lambda i, info: self.on_step(info, i), self.group_should_stop, self.on_image
            )
        except Exception as exc:
            self._error(exc)
            return
        self.send({"type": "group_done", "results": [_outcome(o) for o in outcomes]})

    def run(self, job: dict[str, Any]) -> None:
        from dreamserve.engine import Interrupted

        try:
            result = self.engine.generate(
                GenerationJob.from_dict(job), self.on_step, self.stop.is_set, lambda image: self.on_image(0, image)
            )
        except Interrupted:
            self.send({"type": "canceled"})
        except Exception as exc:
            self._error(exc)
        else:
            self.send({"type": "done", "result": result.to_dict()})

    def _error(self, exc: Exception) -> None:
        self.send(_error(exc))


def _error(exc: Exception) -> dict[str, Any]:
    """What the supervisor logs (all of it) and tells the client (the kind only, with an error id)."""
    message = f"{type(exc).__name__}: {exc}"
    return {"type": "error", "kind": type(exc).__name__, "message": message, "traceback": traceback.format_exc()}


def _outcome(outcome: Any) -> dict[str, Any]:
    from dreamserve.engine import Interrupted

    if isinstance(outcome, Interrupted):
        return {"canceled": True}
    if isinstance(outcome, Exception):
        message = f"{type(outcome).__name__}: {outcome}"
        return {
            "kind": type(outcome).__name__,
            "message": message,
            "traceback": "".join(traceback.format_exception(outcome)),
        }
    return {"result": outcome.to_dict()}
