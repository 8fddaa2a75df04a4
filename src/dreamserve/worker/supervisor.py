"""The supervisor: claims tasks for one model, prepares inputs, drives the model child, records events.

It never imports torch. States: NEW -> STARTING (child loading the model) -> READY <-> BUSY, and
DEFUNCT when the model cannot load; BUSY -> RESTARTING -> READY while a killed (or dead) child is
replaced. Cancel of a running task is the child's stop event, read at the next step. Kill of a task
that runs alone is SIGKILL to the child followed by a fresh child (which reloads the model); kill of
one member of a batch is that member's per-job stop, so the others go on.

URL inputs were fetched before the task could be claimed (``preprocess.py``): here they are blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dreamserve.blobs import BlobStore
from dreamserve.db import File, Task
from dreamserve.errors import new_error_id
from dreamserve.events import IMAGE_SAVED, RUNNING
from dreamserve.jobs import FailedImage, GeneratedImage, GenerationJob, GenerationResult
from dreamserve.liveness import Liveness, backoff
from dreamserve.logs import about, replay
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import WorkerState
from dreamserve.store import (
    PEXIT_CANCELED,
    PEXIT_INPUT_ERROR,
    PEXIT_KILLED,
    PEXIT_MODEL_ERROR,
    PEXIT_OK,
    TaskStore,
    new_blob_folder,
)
from dreamserve.worker.child import child_main

log = logging.getLogger(__name__)

#: A task claimed within this many seconds of the end of a task that ran alone skips the batch window
#: unless companions are already queued (one client submitting after each result; see ``_companions``).
LONE_SECONDS = 5.0


def worker_alive(worker_id: str) -> bool | None:
    """Whether the process behind a worker id lives: known only for workers of this host."""
    host, _, rest = worker_id.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChildProcess:
    """One spawned model process, and a thread turning its pipe into an asyncio queue."""

    def __init__(self, spec: ModelSpec, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, self._child_conn = context.Pipe()
        self.stop_event = context.Event()
        self.process = context.Process(
            target=child_main,
            args=(self._child_conn, self.stop_event, spec.model_dump(), log.getEffectiveLevel()),
            name=name,
            daemon=True,
        )
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def start(self) -> None:
        await asyncio.to_thread(self.process.start)
        self._child_conn.close()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop, self.conn), daemon=True).start()

    def _read(self, loop: asyncio.AbstractEventLoop, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(self.messages.put_nowait, {"type": "exit"})
                return
            if message.get("type") == "log":
                replay(message["record"])  # the child's logging, into this process's log
                continue
            loop.call_soon_threadsafe(self.messages.put_nowait, message)

    def send(self, message: dict[str, Any]) -> None:
        self.conn.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send({"op": "exit"})
        await asyncio.to_thread(self.process.join, timeout)
        self.kill()
        await asyncio.to_thread(self.process.join, timeout)
        self.conn.close()


class Supervisor:
    def __init__(
        self,
        slug: str,
        spec: ModelSpec,
        index: int,
        settings: Settings,
        store: TaskStore,
        blobs: BlobStore,
        liveness: Liveness | None = None,
    ) -> None:
        self.slug = slug
        self.spec = spec
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{slug}:{index}"
        self.liveness = liveness or Liveness(settings.loop_stale_seconds)
        #: This worker's entry in ``liveness``: ticked by the claim loop when idle, by the heartbeat while busy.
        self.loop_name = f"worker {self.worker_id}"
        self.state = WorkerState.NEW
        self.error = ""
        self.child: ChildProcess | None = None
        self.load_seconds = 0.0
        #: Why the model process is being replaced, while RESTARTING: "a kill", "a crash".
        self.restart_reason = ""
        self.running: dict[int, _Running] = {}
        #: The running group has been handed to the model process (per-job stops reach it from then on).
        self._sent = False
        #: How long the running group waited for companions (``details.timings.batch_wait``).
        self._batch_wait = 0.0
        #: When the last group ended, if it ran alone (``time.monotonic()``); None after a group with companions.
        self._lone_until: float | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False

    # -- control, called by the API process ------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, task_id: int, kind: str) -> bool:
        """Stop a running task: ``cancel`` at the next denoising step, ``kill`` at once.

        A kill takes the model process down only when the task runs alone; a member of a batch gets the
        per-job stop and ends now, and the other members (perhaps other projects' tasks) go on.
        """
        entry = self.running.get(task_id)
        if entry is None or self.child is None:
            return False
        if entry.settled:
            return True
        if not self._sent:
            # Still being prepared: ``_process`` ends it before anything reaches the model process.
            entry.stop = "kill" if kind == "kill" or entry.stop else "cancel"
            return True
        if kind == "kill" or entry.stop == "cancel":
            if self._shared(entry):
                log.info("kill requested: stopping this member of its batch", extra=about(task_id))
                await self._stop_member(entry, "kill")
            else:
                log.info("kill requested: killing model process %s", self.child.pid, extra=about(task_id))
                entry.stop = "kill"
                self.child.kill()
        elif not entry.stop:
            log.info("cancel requested: stopping at the next step", extra=about(task_id))
            entry.stop = "cancel"
            if self._shared(entry):
                self.child.send({"op": "stop", "job": entry.index})
            else:
                self.child.stop_event.set()
            asyncio.get_running_loop().call_later(self.settings.cancel_grace_seconds, self._escalate, task_id)
        return True

    def _shared(self, entry: _Running) -> bool:
        """Whether other unfinished tasks share the model process's work with this one."""
        return any(other is not entry and not other.settled for other in self.running.values())

    async def _stop_member(self, entry: _Running, kind: str) -> None:
        """End one member of a batch now; the child drops its images at its next step (``op: stop``)."""
        entry.stop = kind
        entry.settled = True
        assert self.child is not None
        with contextlib.suppress(OSError):
            self.child.send({"op": "stop", "job": entry.index})
        await self._record_stopped(entry)

    async def _record_stopped(self, entry: _Running) -> None:
        if entry.stop == "kill":
            await self._record(entry.task, "task_cancel", "killed", pexit=PEXIT_KILLED, debugerror="Killed.")
        else:
            await self._record(entry.task, "task_cancel", "cancelled", pexit=PEXIT_CANCELED, debugerror="Cancelled.")

    def _escalate(self, task_id: int) -> None:
        entry = self.running.get(task_id)
        if entry is None or entry.stop != "cancel" or entry.settled or self.child is None:
            return
        if self._shared(entry):
            log.warning("did not stop within the grace period; ending it, its batch goes on", extra=about(task_id))
            stopping = asyncio.get_running_loop().create_task(self._stop_member(entry, "cancel"))
            self._background.add(stopping)
            stopping.add_done_callback(self._background.discard)
        else:
            log.warning("did not stop within the grace period; killing the model process", extra=about(task_id))
            entry.stop = "kill"
            self.child.kill()

    def status(self) -> dict[str, Any]:
        restarting = self.state is WorkerState.RESTARTING
        return {
            "id": self.worker_id,
            "model": self.slug,
            # While a killed child is replaced, the state says so; the killed task has ended and is not listed.
            "state": f"restarting after {self.restart_reason}" if restarting else self.state.value,
            "pid": self.child.pid if self.child else None,
            "tasks": [] if restarting else sorted(self.running),
            "load_seconds": round(self.load_seconds, 3),
            "error": self.error,
        }

    # -- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Embedded mode: poll the tasks table for this model, woken early when a task arrives.

        Nothing ends the loop but ``close``: a failed claim (the database busy or away) is logged and retried
        with a growing pause, and ``/readyz`` reports the loop while it keeps failing.
        """
        state = self.liveness.register(self.loop_name, 1.0)
        while not self._closing:
            try:
                await self._claim_and_run()
            except Exception as exc:
                await backoff(state, exc)
                continue
            self.liveness.tick(self.loop_name)

    async def _claim_and_run(self) -> None:
        if not await self.ensure_ready():
            await asyncio.sleep(30)
            return
        task = await self.store.claim_next(self.worker_id, [self.slug], self.settings.lease_seconds)
        if task is None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            return
        await self._guarded([task, *await self._companions(task)])

    async def _companions(self, task: Task) -> list[Task]:
        """Other queued text-to-image tasks of the same shape, claimed in one statement to share this task's
        pipeline calls (of any project: ``claim_similar`` takes projects in turn).

        While the batch is below ``max_batch`` this waits up to the batch window for more of them to arrive,
        and stops waiting as soon as there is a task of another shape (or with references) it would hold up.
        """
        room = self.spec.max_batch - task.num_images
        if room <= 0 or task.has_inputs:
            return []
        window = self.spec.batch_window_ms if self.spec.batch_window_ms is not None else self.settings.batch_window_ms
        started = time.monotonic()
        deadline = started + window / 1000
        # A worker whose last task ran alone and ended moments ago serves clients one after another (each
        # submits when its last image is done): a window would only add itself to every image. Bursts (tasks
        # already waiting), a worker that just ran a batch and the first task after an idle spell still wait.
        serial = self._lone_until is not None and started - self._lone_until < LONE_SECONDS
        while not self._closing:
            self._wake.clear()  # before the count: a task queued after it wakes the wait below
            same, others = await self.store.waiting_for(self.slug, task.width, task.height)
            remaining = deadline - time.monotonic()
            if same >= room or others or remaining <= 0 or (serial and same == 0):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)
        self._batch_wait = time.monotonic() - started
        return await self.store.claim_similar(
            self.worker_id, self.slug, task.width, task.height, room, self.settings.lease_seconds
        )

    async def run_one(self, task_id: int) -> bool:
        """Dispatched mode: a queue message is a turn of this model's queue. It runs what the embedded claim
        would: the next task in claim order (priority, then projects in turn), with the same-shape tasks that
        batch with it. Every queued task has one message, so each is reached; a message whose turn finds the
        queue empty (its task cancelled, or run in an earlier batch) is dropped. ``task_id`` names the task the
        message was sent for, for the log."""
        if not await self.ensure_ready():
            raise RuntimeError(f"model {self.slug} is not loaded: {self.error}")
        task = await self.store.claim_next(self.worker_id, [self.slug], self.settings.lease_seconds)
        if task is None:
            log.debug("message for task %s: nothing left to claim", task_id, extra=about(task_id))
            return False
        await self._guarded([task, *await self._companions(task)])
        return True

    async def ensure_ready(self) -> bool:
        if self.child is not None and not self.child.process.is_alive():
            # The model process died between tasks (OOM killer, a signal): replace it before taking work.
            log.warning("model process %s exited with code %s while idle", self.child.pid, self.child.process.exitcode)
            await self._respawn("a crash")
            return self.child is not None
        return self.child is not None or await self._spawn()

    async def _guarded(self, group: list[Task]) -> None:
        self.state = WorkerState.BUSY
        try:
            await self._process(group)
            self._lone_until = time.monotonic() if len(group) == 1 else None
        except Exception:
            error_id = new_error_id()
            log.exception(
                "tasks %s: supervisor error [error id %s]", [t.id for t in group], error_id, extra=about(group[0].id)
            )
            message = f"Internal worker error (error id {error_id}); the server log has the details."
            for task in group:
                await self.store.fail(task.id, PEXIT_MODEL_ERROR, message, expect=RUNNING, worker_id=self.worker_id)
        finally:
            self.running = {}
            self._sent = False
            self._batch_wait = 0.0
            if self.state is WorkerState.BUSY:
                self.state = WorkerState.READY if self.child else WorkerState.STARTING

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self.child is not None:
            await self.child.close()
            self.child = None

    async def _spawn(self, state: WorkerState = WorkerState.STARTING) -> bool:
        self.state = state
        child = ChildProcess(self.spec, name=f"dreamserve-model-{self.slug}")
        await child.start()
        message = await child.messages.get()
        if message["type"] != "ready":
            self.error = message.get("message") or f"the model process exited (code {child.process.exitcode})"
            log.error("model %s could not be loaded: %s", self.slug, self.error)
            self.state = WorkerState.DEFUNCT
            await child.close()
            return False
        self.child, self.load_seconds, self.error = child, float(message["load_seconds"]), ""
        self.state = WorkerState.READY
        log.info("model %s ready in %.1f s (pid %s)", self.slug, self.load_seconds, child.pid)
        return True

    async def _respawn(self, reason: str) -> None:
        self.running = {}  # every task it ran has been settled or re-queued by now
        self.restart_reason = reason
        if self.child is not None:
            await self.child.close(timeout=1.0)
            self.child = None
        started = time.monotonic()
        if await self._spawn(WorkerState.RESTARTING):
            log.info("model %s restarted after %s in %.1f s", self.slug, reason, time.monotonic() - started)

    # -- one task, or a group of same-size tasks run together --------------------------------------

    async def _process(self, group: list[Task]) -> None:
        # Notes made at Run (a callbackUrl that is not a URL) open the task's output log.
        self.running = {task.id: _Running(task, log=list(task.job.get("notes", []))) for task in group}
        heartbeat = asyncio.create_task(self._heartbeat())
        scratches = [self.settings.data_dir / "scratch" / f"{task.id}-{task.attempts}" for task in group]
        try:
            for entry, scratch in zip(list(self.running.values()), scratches, strict=True):
                if not await self._prepare(entry, scratch):
                    entry.settled = True  # failed its inputs, or was cancelled, before the model ran
            for entry in self.running.values():
                if entry.stop and not entry.settled:
                    entry.settled = True  # stopped after its inputs were ready, before the model got it
                    await self._record_stopped(entry)
            live = [entry for entry in self.running.values() if not entry.settled]
            if not live:
                return
            if await self._send(live):
                await self._follow(live)
        finally:
            heartbeat.cancel()
            for scratch in scratches:
                await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)
            self.running = {}
            self._sent = False

    async def _send(self, live: list[_Running]) -> bool:
        """Hand the prepared tasks to the model process; False (and the tasks re-queued) if it had died."""
        for index, entry in enumerate(live):
            entry.index = index
        assert self.child is not None
        try:
            if len(live) == 1:
                self.child.send({"op": "run", "job": live[0].job_dict()})
            else:
                self.child.send({"op": "run_group", "jobs": [entry.job_dict() for entry in live]})
        except OSError:
            # The model process died before it was given the work: nothing ran, so the tasks run again.
            for entry in live:
                note = f"Re-queued: the model process had exited before task {entry.task.id} was sent to it.\n"
                await self._record(
                    entry.task, "task_queue", None, debugerror=note, dispatched_at=None, stop_requested=""
                )
            await self._respawn("a crash")
            return False
        self._sent = True
        # A stop that came while the last of them were being recorded: deliver it now.
        for entry in live:
            if entry.stop and not entry.settled:
                stop, entry.stop = entry.stop, ""
                await self.stop(entry.task.id, stop)
        return True

    async def _prepare(self, entry: _Running, scratch: Path) -> bool:
        """Inputs on local disk, the job built, ``task_assign`` recorded; False if the task ended instead."""
        task = entry.task
        references = await self._preprocess(task, scratch)
        if references is None:
            return False
        if entry.stop:
            await self._record_stopped(entry)
            return False
        entry.folder = new_blob_folder()
        entry.job = GenerationJob(
            task_id=task.id,
            prompt=task.job["prompt"],
            width=task.job["width"],
            height=task.job["height"],
            num_images=task.job["num_images"],
            seed=task.job["seed"],
            references=references,
            watermark=task.job["watermark"],
            output_dir=str(self.blobs.local_path(f"outputs/{entry.folder}") or scratch / "outputs"),
            output_size=task.job.get("output_size"),
            output_format=task.job.get("output_format", "png"),
            model=self.slug,
            embed_prompt=self.settings.png_embed_prompt,
        )
        return await self._record(task, "task_assign") is not None

    async def _record(self, task: Task, event_type: str, message: Any = None, **fields: Any) -> Task | None:
        """Record an event only while this worker still holds the task's lease."""
        return await self.store.record(task.id, event_type, message, worker_id=self.worker_id, **fields)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._beat()
            except Exception:
                # A missed beat is retried at the next one; the lease outlives several of them.
                log.exception("heartbeat of %s failed; retrying", sorted(self.running))
                continue
            self.liveness.tick(self.loop_name)

    async def _beat(self) -> None:
        """Renew the lease of every unsettled task and act on a stop asked for through the database."""
        for task_id, entry in list(self.running.items()):
            if entry.settled:
                continue
            requested = await self.store.heartbeat(task_id, self.worker_id, self.settings.lease_seconds)
            if requested is None and (entry.settled or entry.stop == "kill"):
                continue  # it ended while the heartbeat was on its way, or is being killed: not a lost lease
            if requested is None:
                log.warning("lease lost; abandoning the task", extra=about(task_id))
                entry.lost = True
                if self.child is not None:
                    self.child.kill()
            elif requested and requested != entry.stop:
                await self.stop(task_id, requested)

    async def _preprocess(self, task: Task, scratch: Path) -> list[str] | None:
        """Put every reference on local disk for the child, from the blob store (URL inputs are blobs by now)."""
        inputs: list[dict[str, Any]] = task.job.get("inputs", [])
        if not inputs:
            return []
        await self._record(task, "task_preprocess_start")
        paths = []
        for number, item in enumerate(inputs, start=1):
            key = item.get("blob_key")
            if key is None:
                # Only a task whose URL inputs were stored can be claimed; this is a row written some other way.
                message = f"Input {number} was not fetched before the task was claimed; send the task again."
                await self.store.fail(task.id, PEXIT_INPUT_ERROR, message, worker_id=self.worker_id)
                return None
            local = self.blobs.local_path(key)
            if local is None:
                local = scratch / f"reference-{number}{Path(key).suffix}"
                await asyncio.to_thread(self.blobs.download, key, local)
            paths.append(str(local))
        await self._record(task, "task_preprocess_end")
        return paths

    async def _follow(self, live: list[_Running]) -> None:
        assert self.child is not None
        while True:
            message = await self.child.messages.get()
            kind = message["type"]
            if kind == "start":
                for entry in live:
                    await self._record(entry.task, "task_start")
            elif kind == "step":
                entry = live[message.get("job", 0)]
                progress = _progress(message["step"], message["total"], message["elapsed"])
                entry.log.append(f"step {message['step']}/{message['total']}")
                preview = {"preview": message["preview"]} if message.get("preview") else None
                await self._record(entry.task, "task_output", progress, progress=progress, live_extra=preview)
            elif kind == "image":
                await self._saved(live[message.get("job", 0)], message)
            elif kind == "job_canceled":
                # A cancelled member of a group: the shared pipeline call goes on for the others, but this task's
                # images will be dropped, so it ends now rather than when the call ends.
                await self._settle(live[message["job"]], {"canceled": True})
            elif kind in ("done", "group_done"):
                results = [{"result": message["result"]}] if kind == "done" else message["results"]
                for entry, outcome in zip(live, results, strict=True):
                    await self._settle(entry, outcome)
                return
            elif kind in ("canceled", "error"):
                for entry in live:
                    await self._settle(entry, message)
                return
            elif kind == "exit":
                await self._child_exited(live)
                return

    async def _settle(self, entry: _Running, outcome: dict[str, Any]) -> None:
        """End one task from what the child reported for it (once: a cancelled group member ends early)."""
        if entry.settled:
            return
        entry.settled = True
        task = entry.task
        if "result" in outcome:
            await self._succeed(entry, GenerationResult.from_dict(outcome["result"]))
        elif outcome.get("type") == "canceled" or outcome.get("canceled"):
            await self._record(task, "task_cancel", "cancelled", pexit=PEXIT_CANCELED, debugerror="Cancelled.")
        else:
            # The traceback and the exception's text (paths, tensors, model internals) stay in this log; the
            # client gets the kind of error and an id that finds the log line.
            error_id = new_error_id()
            log.error(
                "task %s: model error [error id %s]: %s\n%s",
                task.id,
                error_id,
                outcome.get("message", ""),
                outcome.get("traceback", ""),
            )
            kind = str(outcome.get("kind") or "error")
            message = f"The model failed on this task ({kind}; error id {error_id}). Retry, or report the error id."
            await self.store.fail(
                task.id, PEXIT_MODEL_ERROR, message, output="\n".join(entry.log), worker_id=self.worker_id
            )

    async def _child_exited(self, live: list[_Running]) -> None:
        assert self.child is not None
        code = self.child.process.exitcode
        killed = any(entry.stop == "kill" and not entry.settled for entry in live)
        # Said before the tasks are settled, so that whoever sees the kill answered also sees the restart.
        self.state, self.restart_reason = WorkerState.RESTARTING, "a kill" if killed else "a crash"
        for entry in live:
            task = entry.task
            if entry.lost or entry.settled:
                continue  # ended already, or the reaper has given the task to another worker: record nothing
            entry.settled = True
            if entry.stop == "kill":
                log.info("killed as requested (model process exit code %s)", code, extra=about(task.id))
                await self._record(task, "task_cancel", "killed", pexit=PEXIT_KILLED, debugerror="Killed.")
            elif killed:
                # Another task of the group was killed, taking the model process with it: this one runs again.
                note = f"Re-queued: task {task.id} shared a model process with a task that was killed.\n"
                await self._record(task, "task_queue", None, debugerror=note, dispatched_at=None, stop_requested="")
            else:
                reason = f"The model process exited with code {code} (out of memory?)."
                output = "\n".join(entry.log)
                await self.store.fail(task.id, PEXIT_MODEL_ERROR, reason, output=output, worker_id=self.worker_id)
        await self._respawn(self.restart_reason)

    async def _saved(self, entry: _Running, message: dict[str, Any]) -> None:
        """One image of a running task is saved (or failed): its URL works from now on, and the
        ``IMAGE_SAVED`` event tells followers (Ark's stream) at once. The file is a ``partial`` row
        until the task succeeds, so Task/Detail lists only the outputs of a finished attempt."""
        if entry.settled:
            return
        if "failed" in message:
            failed = FailedImage(**message["failed"])
            # The raw text may name server paths: it stays in the log, the client gets an id to quote.
            error_id = new_error_id()
            log.warning(
                "image %d failed [error id %s]: %s", failed.index, error_id, failed.message, extra=about(entry.task.id)
            )
            text = f"Image {failed.index} could not be finished (error id {error_id})."
            error = {"code": "InternalServiceError", "message": text}
            await self._record(entry.task, IMAGE_SAVED, {"index": failed.index, "error": error})
            return
        file = await self._store_output(entry, GeneratedImage(**message["image"]), "partial")
        entry.partial[file.name] = file
        # No URL nor key, as in every event: the API renders them from the file row (the task's latest of that name).
        await self._record(entry.task, IMAGE_SAVED, {"index": file.position, "name": file.name}, outputs=[file])

    async def _store_output(self, entry: _Running, image: GeneratedImage, role: str) -> File:
        key = f"outputs/{entry.folder}/{image.name}"
        # Local store: the child wrote in place (put_file is a no-op). S3: upload before any row points at it.
        await asyncio.to_thread(self.blobs.put_file, key, Path(image.path))
        return File(
            project_id=entry.task.project_id,
            task_id=entry.task.id,
            role=role,
            position=image.index,
            name=image.name,
            contenttype="image/jpeg" if image.name.endswith(".jpeg") else "image/png",
            size=image.size_bytes,
            blob_key=key,
            meta={"seed": image.seed, "width": image.width, "height": image.height},
            created=time.time(),
        )

    async def _succeed(self, entry: _Running, result: GenerationResult) -> None:
        task, output = entry.task, "\n".join(entry.log)
        await self._record(task, "task_output_full", {"raw": output})
        await self._record(task, "task_end")
        await self._record(task, "task_postprocess_start")
        files = []
        for image in result.images:
            file = entry.partial.pop(image.name, None) or await self._store_output(entry, image, "output")
            file.role = "output"  # a partial row becomes an output in the same transaction as the task's end
            files.append(file)
        now = time.time()
        fresh = await self.store.get_by_id(task.id)
        timings = {"queue": (task.accepttime or now) - task.createtime, **result.timings}
        timings["batch_wait"] = self._batch_wait
        if "fetch_seconds" in task.job:
            timings["fetch"] = float(task.job["fetch_seconds"])
        if fresh is not None and fresh.preprocessstarttime and fresh.preprocessendtime:
            timings["preprocess"] = fresh.preprocessendtime - fresh.preprocessstarttime
        details = {
            "method": result.method,
            "seeds": [image.seed for image in result.images],
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
            # Only the project's own tasks: another tenant's task ids are none of its business.
            "batched_with": [
                other
                for other, peer in self.running.items()
                if other != task.id and peer.task.project_id == task.project_id
            ],
        }
        if result.failed:
            details["failed_images"] = [
                {"index": f.index, "seed": f.seed, "message": "could not be finished (the server log has why)"}
                for f in result.failed
            ]
        # The event keeps no URLs nor access keys: the API renders them from the file rows with its own public
        # URL and the derived keys (a worker host's base_url is not the one clients reach), as Task/Detail does.
        log.info("task %s succeeded on worker %s", task.id, self.worker_id, extra=about(task.id))
        await self._record(
            task,
            "task_postprocess_end",
            None,
            outputs=files,
            pexit=PEXIT_OK,
            debugoutput=output,
            details=details,
        )


@dataclass
class _Running:
    """A claimed task while this supervisor runs it."""

    task: Task
    #: Blob-store folder of its outputs.
    folder: str = ""
    job: GenerationJob | None = None
    log: list[str] = field(default_factory=list)
    #: "" / "cancel" / "kill": what was asked of this task.
    stop: str = ""
    lost: bool = False
    #: Its terminal state is recorded (before the model ran, or from what the model process reported).
    settled: bool = False
    #: Position in the group sent to the model process.
    index: int = 0
    #: Output rows recorded as each image was saved (``partial`` until the task succeeds), by file name.
    partial: dict[str, File] = field(default_factory=dict)

    def job_dict(self) -> dict[str, Any]:
        assert self.job is not None
        return self.job.to_dict()


def _progress(step: int, total: int, elapsed: float) -> dict[str, str]:
    """Wiro's progress object: every value a string."""
    speed = step / elapsed if elapsed > 0 else 0.0
    remaining = (total - step) / speed if speed > 0 else 0.0
    return {
        "type": "progressGenerate",
        "task": "Generate",
        "percentage": str(int(100 * step / max(total, 1))),
        "stepCurrent": str(step),
        "stepTotal": str(total),
        "speed": f"{speed:.2f}",
        "speedType": "it/s",
        "elapsedTime": f"{elapsed:.0f}s",
        "remainingTime": f"{remaining:.0f}s",
    }
