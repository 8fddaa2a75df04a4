"""The model process. Spawned (never forked: CUDA and fork do not mix), it loads the model once, then runs
one job (or one group of jobs) at a time sent by its supervisor over a pipe. The messages are the frozen
dataclasses of ``protocol.py``, pickled by the pipe:

    parent -> child   Run(job)  RunGroup(jobs)  Stop(job=i) (a member of the running group)  Exit()
    child -> parent   Ready(load_seconds) | Fatal(message), once, after loading
                      Started() when a Run or RunGroup begins, then for its job(s):
                        Step(job=i, step, total, elapsed, preview) per denoising step (a preview on some)
                        ImageSaved(job=i, image) as soon as each image is saved, ImageFailed(job=i, failed)
                        JobCanceled(job=i) when a Stop took a group member out (it gets no more images)
                      and one outcome: Done(result) | Canceled() | Error(kind, message, traceback) for a Run,
                        GroupDone(outcomes) for a RunGroup (one Done | Canceled | Error per job), or Error
                        for the whole group
                      Log(record) at any time: its logging, replayed by the parent (``logs.py``)

Errors carry the full text and traceback for the supervisor's log; only their kind reaches clients.

Cancel is the shared ``stop`` event, read by the diffusers step callback; kill is SIGKILL from
the supervisor, which frees every byte this process holds, GPU memory included.
"""

from __future__ import annotations

import functools
import importlib
import logging
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

from dreamserve import malloc
from dreamserve.jobs import (
    FailedImage,
    GeneratedImage,
    GenerationJob,
    GenerationResult,
    Interrupted,
    ModelEngine,
    StepInfo,
    generate_alone,
)
from dreamserve.logs import forward_from_child
from dreamserve.settings import ModelSpec
from dreamserve.worker.protocol import (
    Canceled,
    Done,
    Error,
    Fatal,
    FromChild,
    GroupDone,
    ImageFailed,
    ImageSaved,
    JobCanceled,
    Outcome,
    Ready,
    Run,
    RunGroup,
    Started,
    Step,
    Stop,
)

log = logging.getLogger(__name__)


def load_engine(model: ModelSpec) -> ModelEngine:
    if model.engine:
        module, _, name = model.engine.partition(":")
        engine: ModelEngine = getattr(importlib.import_module(module), name).load(model)
        return engine
    # Imported here: only the child process may import torch.
    from dreamserve.engine import Engine
    from dreamserve.engine.loader import resolve_device

    if model.keep_freed_memory and resolve_device(model) == "cpu" and malloc.keep_freed_memory():
        log.info("model process on the CPU: freed memory is kept for reuse (keep_freed_memory)")
    return Engine.load(model)


def child_main(conn: Connection, stop: EventType, spec: ModelSpec, log_level: int = logging.INFO) -> None:
    send: Callable[[FromChild], None] = forward_from_child(conn.send, log_level)
    try:
        engine = load_engine(spec)
    except Exception as exc:
        send(Fatal(f"{type(exc).__name__}: {exc}"))
        return
    log.info("model loaded in %.1f s", engine.load_seconds)
    send(Ready(engine.load_seconds))
    runner = _Runner(engine, conn, send, stop)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        match message:
            case Stop():
                continue  # a cancel that arrived after its job ended
            case Run(job=job):
                runner.begin()
                runner.run(job)
            case RunGroup(jobs=jobs):
                runner.begin()
                runner.run_group(list(jobs))
            case _:
                return  # Exit, or a message this process does not know


class _Runner:
    """Runs the jobs of one message and sends what happens: steps, then one outcome message."""

    def __init__(
        self, engine: ModelEngine, conn: Connection, send: Callable[[FromChild], None], stop: EventType
    ) -> None:
        self.engine, self.conn, self.send, self.stop = engine, conn, send, stop
        #: Members of the running group that a per-job ``Stop`` message has cancelled.
        self.stopped: set[int] = set()

    def begin(self) -> None:
        # ``stop`` is the supervisor's to clear (before it sends the work): one set since then is this work's.
        self.stopped.clear()
        self.send(Started())

    def on_step(self, info: StepInfo, job: int = 0) -> None:
        self.send(Step(job, info.step, info.total, info.elapsed, info.preview))

    def on_image(self, job: int, image: GeneratedImage | FailedImage) -> None:
        self.send(ImageSaved(job, image) if isinstance(image, GeneratedImage) else ImageFailed(job, image))

    def group_should_stop(self, index: int) -> bool:
        # Per-job cancels arrive as messages while the group runs; the stop event still stops them all.
        while self.conn.poll():
            match self.conn.recv():
                case Stop(job=job) if job not in self.stopped:
                    self.stopped.add(job)
                    self.send(JobCanceled(job))
        return self.stop.is_set() or index in self.stopped

    def run_group(self, jobs: list[GenerationJob]) -> None:
        try:
            outcomes = self.engine.generate_group(
                jobs, lambda i, info: self.on_step(info, i), self.group_should_stop, self.on_image
            )
        except Exception as exc:
            self.send(_error(exc))
            return
        self.send(GroupDone(tuple(_outcome(o) for o in outcomes)))

    def run(self, job: GenerationJob) -> None:
        try:
            on_image = functools.partial(self.on_image, 0)
            result = generate_alone(self.engine.generate_group, job, self.on_step, self.stop.is_set, on_image)
        except Interrupted:
            self.send(Canceled())
        except Exception as exc:
            self.send(_error(exc))
        else:
            self.send(Done(result))


def _error(exc: BaseException) -> Error:
    """What the supervisor logs (all of it) and tells the client (the kind only, with an error id)."""
    text = "".join(traceback.format_exception(exc))
    return Error(kind=type(exc).__name__, message=f"{type(exc).__name__}: {exc}", traceback=text)


def _outcome(outcome: GenerationResult | Exception) -> Outcome:
    if isinstance(outcome, Interrupted):
        return Canceled()
    if isinstance(outcome, Exception):
        return _error(outcome)
    return Done(outcome)
