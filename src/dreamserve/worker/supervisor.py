"""The supervisor: claims tasks for one model, prepares inputs, drives the model child, records events.

It never imports torch. States: NEW -> STARTING (child loading the model) -> READY <-> BUSY, and
DEFUNCT when the model cannot load. Kill is SIGKILL to the child followed by a fresh child (which
reloads the model); cancel of a running task is the child's stop event, read at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dreamserve.blobs import BlobStore
from dreamserve.db import File, Task
from dreamserve.errors import InvalidRequest
from dreamserve.events import RUNNING
from dreamserve.fetch import fetch
from dreamserve.jobs import GenerationJob, GenerationResult
from dreamserve.params import check_image
from dreamserve.settings import ModelSpec, Settings
from dreamserve.store import (
    PEXIT_CANCELED,
    PEXIT_INPUT_ERROR,
    PEXIT_KILLED,
    PEXIT_MODEL_ERROR,
    PEXIT_OK,
    TaskStore,
    new_accesskey,
)
from dreamserve.wire import file_item
from dreamserve.worker.child import child_main

log = logging.getLogger("dreamserve.worker")


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEFUNCT = "defunct"


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
            target=child_main, args=(self._child_conn, self.stop_event, spec.model_dump()), name=name, daemon=True
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
        self, slug: str, spec: ModelSpec, index: int, settings: Settings, store: TaskStore, blobs: BlobStore
    ) -> None:
        self.slug = slug
        self.spec = spec
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{slug}:{index}"
        self.state = WorkerState.NEW
        self.error = ""
        self.child: ChildProcess | None = None
        self.load_seconds = 0.0
        self.current: int | None = None
        self._stop_kind = ""
        self._lost = False
        self._wake = asyncio.Event()
        self._closing = False

    # -- control, called by the API process ------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, task_id: int, kind: str) -> bool:
        """Stop the running task: ``cancel`` at the next denoising step, ``kill`` at once."""
        if self.current != task_id or self.child is None:
            return False
        if kind == "kill" or self._stop_kind == "cancel":
            self._stop_kind = "kill"
            self.child.kill()
        elif not self._stop_kind:
            self._stop_kind = "cancel"
            self.child.stop_event.set()
            asyncio.get_running_loop().call_later(self.settings.cancel_grace_seconds, self._escalate, task_id)
        return True

    def _escalate(self, task_id: int) -> None:
        if self.current == task_id and self._stop_kind == "cancel" and self.child is not None:
            log.warning("task %s did not stop within the grace period; killing the model process", task_id)
            self._stop_kind = "kill"
            self.child.kill()

    def status(self) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "model": self.slug,
            "state": self.state.value,
            "pid": self.child.pid if self.child else None,
            "task": self.current,
            "load_seconds": round(self.load_seconds, 3),
            "error": self.error,
        }

    # -- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Embedded mode: poll the tasks table for this model, woken early when a task arrives."""
        while not self._closing:
            if not await self.ensure_ready():
                await asyncio.sleep(30)
                continue
            task = await self.store.claim_next(self.worker_id, [self.slug], self.settings.lease_seconds)
            if task is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            await self._guarded(task)

    async def run_one(self, task_id: int) -> bool:
        """Dispatched mode: run the task a queue message names, if it is still queued (else drop the message)."""
        if not await self.ensure_ready():
            raise RuntimeError(f"model {self.slug} is not loaded: {self.error}")
        task = await self.store.claim(task_id, self.worker_id, self.settings.lease_seconds)
        if task is None:
            return False
        await self._guarded(task)
        return True

    async def ensure_ready(self) -> bool:
        return self.child is not None or await self._spawn()

    async def _guarded(self, task: Task) -> None:
        self.state = WorkerState.BUSY
        try:
            await self._process(task)
        except Exception:
            log.exception("task %s: supervisor error", task.id)
            await self.store.fail(
                task.id, PEXIT_MODEL_ERROR, "Internal worker error.", expect=RUNNING, worker_id=self.worker_id
            )
        finally:
            self.current = None
            self.state = WorkerState.READY if self.child else WorkerState.STARTING

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self.child is not None:
            await self.child.close()
            self.child = None

    async def _spawn(self) -> bool:
        self.state = WorkerState.STARTING
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

    async def _respawn(self) -> None:
        if self.child is not None:
            await self.child.close(timeout=1.0)
            self.child = None
        await self._spawn()

    # -- one task --------------------------------------------------------------------------------

    async def _process(self, task: Task) -> None:
        self.current, self._stop_kind, self._lost = task.id, "", False
        heartbeat = asyncio.create_task(self._heartbeat(task.id))
        scratch = self.settings.data_dir / "scratch" / f"{task.id}-{task.attempts}"
        try:
            references = await self._preprocess(task, scratch)
            if references is None:
                return
            if self._stop_kind:
                await self._record(task, "task_cancel", "cancelled", pexit=PEXIT_CANCELED, debugerror="Cancelled.")
                return
            accesskey = new_accesskey()
            job = GenerationJob(
                task_id=task.id,
                prompt=task.job["prompt"],
                width=task.job["width"],
                height=task.job["height"],
                num_images=task.job["num_images"],
                seed=task.job["seed"],
                references=references,
                watermark=task.job["watermark"],
                output_dir=str(self.blobs.local_path(f"outputs/{accesskey}") or scratch / "outputs"),
            )
            if await self._record(task, "task_assign") is None:
                return
            assert self.child is not None
            self.child.send({"op": "run", "job": job.to_dict()})
            await self._follow(task, accesskey)
        finally:
            heartbeat.cancel()
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)

    async def _record(self, task: Task, event_type: str, message: Any = None, **fields: Any) -> Task | None:
        """Record an event only while this worker still holds the task's lease."""
        return await self.store.record(task.id, event_type, message, worker_id=self.worker_id, **fields)

    async def _heartbeat(self, task_id: int) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            requested = await self.store.heartbeat(task_id, self.worker_id, self.settings.lease_seconds)
            if requested is None:
                log.warning("task %s: lease lost; abandoning it", task_id)
                self._lost = True
                if self.child is not None:
                    self.child.kill()
                return
            if requested and requested != self._stop_kind:
                await self.stop(task_id, requested)

    async def _preprocess(self, task: Task, scratch: Path) -> list[str] | None:
        """Put every reference on local disk for the child: uploads from the blob store, URLs fetched."""
        inputs: list[dict[str, Any]] = task.job.get("inputs", [])
        if not inputs:
            return []
        await self._record(task, "task_preprocess_start")
        paths = []
        try:
            for number, item in enumerate(inputs, start=1):
                key = item.get("blob_key")
                if key is not None:
                    local = self.blobs.local_path(key)
                    if local is None:
                        local = scratch / f"reference-{number}{Path(key).suffix}"
                        await asyncio.to_thread(self.blobs.download, key, local)
                    paths.append(str(local))
                else:
                    data = await fetch(
                        item["url"],
                        max_bytes=self.settings.max_upload_bytes,
                        timeout=self.settings.fetch_timeout_seconds,
                        allow_private=self.settings.fetch_allow_private,
                    )
                    ext, _, _ = check_image(
                        data,
                        f"{number} ({item['url'][:60]})",
                        self.settings.max_upload_bytes,
                        self.settings.max_input_pixels,
                    )
                    local = scratch / f"reference-{number}.{ext}"
                    await asyncio.to_thread(_write, local, data)
                    paths.append(str(local))
        except InvalidRequest as exc:
            await self.store.fail(task.id, PEXIT_INPUT_ERROR, exc.message, worker_id=self.worker_id)
            return None
        await self._record(task, "task_preprocess_end")
        return paths

    async def _follow(self, task: Task, accesskey: str) -> None:
        assert self.child is not None
        log_lines: list[str] = []
        while True:
            message = await self.child.messages.get()
            kind = message["type"]
            if kind == "start":
                await self._record(task, "task_start")
            elif kind == "step":
                progress = _progress(message["step"], message["total"], message["elapsed"])
                log_lines.append(f"step {message['step']}/{message['total']}")
                await self._record(task, "task_output", progress, progress=progress)
            elif kind == "done":
                result = GenerationResult.from_dict(message["result"])
                await self._succeed(task, accesskey, result, "\n".join(log_lines))
                return
            elif kind == "canceled":
                await self._record(task, "task_cancel", "cancelled", pexit=PEXIT_CANCELED, debugerror="Cancelled.")
                return
            elif kind == "error":
                await self.store.fail(
                    task.id,
                    PEXIT_MODEL_ERROR,
                    message["message"],
                    raw=message.get("traceback", ""),
                    output="\n".join(log_lines),
                    worker_id=self.worker_id,
                )
                return
            elif kind == "exit":
                await self._child_exited(task, "\n".join(log_lines))
                return

    async def _child_exited(self, task: Task, output: str) -> None:
        assert self.child is not None
        code = self.child.process.exitcode
        if self._lost:
            pass  # the reaper has given the task to another worker: record nothing
        elif self._stop_kind == "kill":
            await self._record(task, "task_cancel", "killed", pexit=PEXIT_KILLED, debugerror="Killed.")
        else:
            reason = f"The model process exited with code {code} (out of memory?)."
            await self.store.fail(task.id, PEXIT_MODEL_ERROR, reason, output=output, worker_id=self.worker_id)
        await self._respawn()

    async def _succeed(self, task: Task, accesskey: str, result: GenerationResult, output: str) -> None:
        await self._record(task, "task_output_full", {"raw": output})
        await self._record(task, "task_end")
        await self._record(task, "task_postprocess_start")
        for image in result.images:
            # Local store: the child wrote in place (put_file is a no-op). S3: upload before any row points at it.
            await asyncio.to_thread(self.blobs.put_file, f"outputs/{accesskey}/{image.name}", Path(image.path))
        now = time.time()
        files = [
            File(
                project_id=task.project_id,
                task_id=task.id,
                role="output",
                position=position,
                name=image.name,
                contenttype="image/png",
                size=image.size_bytes,
                accesskey=accesskey,
                blob_key=f"outputs/{accesskey}/{image.name}",
                meta={"seed": image.seed, "width": image.width, "height": image.height},
                created=now,
            )
            for position, image in enumerate(result.images)
        ]
        fresh = await self.store.get_by_id(task.id)
        timings = {"queue": (task.accepttime or now) - task.createtime, **result.timings}
        if fresh is not None and fresh.preprocessstarttime and fresh.preprocessendtime:
            timings["preprocess"] = fresh.preprocessendtime - fresh.preprocessstarttime
        details = {
            "method": result.method,
            "seeds": [image.seed for image in result.images],
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
            "worker": self.worker_id,
        }
        base_url = self.settings.base_url
        await self._record(
            task,
            "task_postprocess_end",
            lambda: [file_item(base_url, file) for file in files],
            outputs=files,
            pexit=PEXIT_OK,
            debugoutput=output,
            details=details,
        )


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


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
