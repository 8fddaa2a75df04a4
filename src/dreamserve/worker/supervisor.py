"""The supervisor: claims tasks for one model, prepares inputs, drives the model child, records events.

It never imports torch. Its parts: the model process (``process.py``), the messages on its pipe
(``protocol.py``), what it knows of each running task (``running.py``), the inputs (``inputs.py``) and
outputs (``outputs.py``) of a task. This module holds the worker's states and the control flow.

States: NEW -> STARTING (child loading the model) -> READY <-> BUSY, and DEFUNCT when the model cannot
load; READY or BUSY -> RESTARTING -> READY while a killed (or dead) child is replaced; every other move
is refused (``_become``). Cancel of a running task is the child's stop event, read at the next step. Kill
of a task that runs alone is SIGKILL to the child followed by a fresh child (which reloads the model);
kill of one member of a batch is that member's per-job stop, so the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from dreamserve.blobs import BlobStore
from dreamserve.errors import new_error_id
from dreamserve.facts import Progress, WorkerStatus
from dreamserve.jobs import GenerationJob, GenerationResult
from dreamserve.liveness import Liveness, backoff
from dreamserve.logs import about
from dreamserve.queue.db import File, Task
from dreamserve.queue.store import Beat, Success, TaskStore, new_blob_folder
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import RUNNING, FileRole, Pexit, StopKind, WorkerState
from dreamserve.worker.clock import MONOTONIC, Clock
from dreamserve.worker.inputs import local_references
from dreamserve.worker.outputs import output_file, success_details
from dreamserve.worker.process import ChildProcess, adopt, child_name, worker_key
from dreamserve.worker.protocol import (
    Canceled,
    Done,
    Error,
    Fatal,
    FromChild,
    Gone,
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
from dreamserve.worker.running import RunningTask

log = logging.getLogger(__name__)

#: A task claimed within this many seconds of the end of a task that ran alone waits for company only while
#: more keep arriving (one client submitting after each result; see ``_companions``).
LONE_SECONDS = 5.0

#: The worker's state moves; any other is a bug (``Supervisor._become`` raises).
_MOVES: dict[WorkerState, set[WorkerState]] = {
    WorkerState.NEW: {WorkerState.STARTING},
    WorkerState.STARTING: {WorkerState.READY, WorkerState.DEFUNCT},
    WorkerState.READY: {WorkerState.BUSY, WorkerState.RESTARTING},
    WorkerState.BUSY: {WorkerState.READY, WorkerState.STARTING, WorkerState.RESTARTING},
    WorkerState.RESTARTING: {WorkerState.READY, WorkerState.DEFUNCT},
    WorkerState.DEFUNCT: {WorkerState.STARTING},
}


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
        #: This worker among its model's on this host (``process.prestart``'s key).
        self.worker = worker_key(slug, index)
        self.liveness = liveness or Liveness(settings.loop_stale_seconds)
        #: This worker's entry in ``liveness``: ticked by the claim loop when idle, by the heartbeat while busy.
        self.loop_name = f"worker {self.worker_id}"
        self.state = WorkerState.NEW
        self.error = ""
        self.child: ChildProcess | None = None
        self.load_seconds = 0.0
        #: Why the model process is being replaced, while RESTARTING: "a kill", "a crash".
        self.restart_reason = ""
        self.running: dict[int, RunningTask] = {}
        #: How long the running group waited for companions (``details.timings.batch_wait``).
        self._batch_wait = 0.0
        #: When the last group ended, if it ran alone (``clock.now()``); None after a group with companions.
        self._lone_until: float | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        #: The batch window's time (``_companions``, ``_lone_until``); a test moves its own by hand.
        self.clock: Clock = MONOTONIC
        #: Where the claim loop waits for ``wake``: idle (its last claim found nothing) or forming a batch.
        self._waiting: str | None = None
        self._closing = False

    def _become(self, state: WorkerState) -> None:
        if state is not self.state and state not in _MOVES[self.state]:
            raise RuntimeError(f"worker {self.worker_id} cannot move from {self.state} to {state}")
        self.state = state

    # -- control, called by the API process ------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Waiting for a task (its last claim found none), and not woken yet."""
        return self._waiting == "idle" and not self._wake.is_set()

    @property
    def forming(self) -> bool:
        """Waiting for same-shape tasks to join the batch it holds (``_companions``)."""
        return self._waiting == "batch"

    async def stop(self, task_id: int, kind: StopKind) -> bool:
        """Stop a running task: ``cancel`` at the next denoising step, ``kill`` at once.

        A kill takes the model process down only when the task runs alone; a member of a batch gets the
        per-job stop and ends now, and the other members (perhaps other projects' tasks) go on.
        """
        entry = self.running.get(task_id)
        if entry is None or self.child is None:
            return False
        if entry.settled:
            return True
        if entry.preparing:
            # Still being prepared: ``_process`` ends it before anything reaches the model process.
            entry.stop = StopKind.KILL if kind is StopKind.KILL or entry.stop else StopKind.CANCEL
            return True
        if kind is StopKind.KILL or entry.stop is StopKind.CANCEL:
            if self._shared(entry):
                log.info("kill requested: stopping this member of its batch", extra=about(task_id))
                await self._stop_member(entry, StopKind.KILL)
            else:
                log.info("kill requested: killing model process %s", self.child.pid, extra=about(task_id))
                entry.stop = StopKind.KILL
                self.child.kill()
        elif entry.stop is None:
            log.info("cancel requested: stopping at the next step", extra=about(task_id))
            entry.stop = StopKind.CANCEL
            if self._shared(entry):
                self.child.send(Stop(entry.index))
            else:
                self.child.stop_event.set()
            asyncio.get_running_loop().call_later(self.settings.cancel_grace_seconds, self._escalate, task_id)
        return True

    def _shared(self, entry: RunningTask) -> bool:
        """Whether other unfinished tasks share the model process's work with this one."""
        return any(other is not entry and not other.settled for other in self.running.values())

    async def _stop_member(self, entry: RunningTask, kind: StopKind) -> None:
        """End one member of a batch now; the child drops its images at its next step (``Stop``)."""
        entry.stop = kind
        if not entry.settle():
            return
        assert self.child is not None
        with contextlib.suppress(OSError):
            self.child.send(Stop(entry.index))
        await self._record_stopped(entry)

    async def _record_stopped(self, entry: RunningTask) -> None:
        await self.store.cancel(entry.id, entry.stop or StopKind.CANCEL, self.worker_id)

    def _escalate(self, task_id: int) -> None:
        entry = self.running.get(task_id)
        if entry is None or entry.stop is not StopKind.CANCEL or entry.settled or self.child is None:
            return
        if self._shared(entry):
            log.warning("did not stop within the grace period; ending it, its batch goes on", extra=about(task_id))
            stopping = asyncio.get_running_loop().create_task(self._stop_member(entry, StopKind.CANCEL))
            self._background.add(stopping)
            stopping.add_done_callback(self._background.discard)
        else:
            log.warning("did not stop within the grace period; killing the model process", extra=about(task_id))
            entry.stop = StopKind.KILL
            self.child.kill()

    def status(self) -> WorkerStatus:
        restarting = self.state is WorkerState.RESTARTING
        return WorkerStatus(
            id=self.worker_id,
            model=self.slug,
            # While a killed child is replaced, the state says so; the killed task has ended and is not listed.
            state=f"restarting after {self.restart_reason}" if restarting else self.state.value,
            pid=self.child.pid if self.child else None,
            tasks=[] if restarting else sorted(self.running),
            load_seconds=round(self.load_seconds, 3),
            error=self.error,
        )

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
            await self._wait("idle", 1.0)
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
        started = self.clock.now()
        deadline = limit = started + window / 1000
        # A worker whose last task ran alone and ended moments ago serves clients one after another (each
        # submits when its last image is done): a whole window would only add itself to every image. So then it
        # waits for company only while tasks keep arriving, half a window after the last one: one client pays
        # half the window, and clients that start together after it (their Runs a few ms apart) still batch.
        # Bursts, a worker that just ran a batch and the first task after an idle spell wait the whole window.
        serial = self._lone_until is not None and started - self._lone_until < LONE_SECONDS
        seen = -1
        while not self._closing:
            self._wake.clear()  # before the count: a task queued after it wakes the wait below
            same, others = await self.store.waiting_for(self.slug, task.width, task.height, room)
            now = self.clock.now()
            if serial and same != seen:
                seen, deadline = same, min(limit, now + window / 2000)
            remaining = deadline - now
            if same >= room or others or remaining <= 0:
                break
            await self._wait("batch", remaining, self.clock)
        self._batch_wait = self.clock.now() - started
        return await self.store.claim_similar(
            self.worker_id, self.slug, task.width, task.height, room, self.settings.lease_seconds
        )

    async def _wait(self, why: str, timeout: float, clock: Clock = MONOTONIC) -> None:
        self._waiting = why
        try:
            await clock.wait(self._wake, timeout)
        finally:
            self._waiting = None

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
        self._become(WorkerState.BUSY)
        try:
            await self._process(group)
            self._lone_until = self.clock.now() if len(group) == 1 else None
        except Exception:
            error_id = new_error_id()
            log.exception(
                "tasks %s: supervisor error [error id %s]", [t.id for t in group], error_id, extra=about(group[0].id)
            )
            message = f"Internal worker error (error id {error_id}); the server log has the details."
            for task in group:
                await self.store.fail(task.id, Pexit.FAILED, message, expect=RUNNING, worker_id=self.worker_id)
        finally:
            self.running = {}
            self._batch_wait = 0.0
            if self.state is WorkerState.BUSY:
                self._become(WorkerState.READY if self.child else WorkerState.STARTING)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self.child is not None:
            await self.child.close()
            self.child = None

    async def _spawn(self, state: WorkerState = WorkerState.STARTING) -> bool:
        self._become(state)
        # The first spawn of ``serve``'s workers was made at its start (``prestart``); a restart is fresh.
        early = adopt(self.spec, self.worker) if state is WorkerState.STARTING else None
        child = early or ChildProcess(self.spec, name=child_name(self.slug))
        await child.start()
        message = await child.messages.get()
        if not isinstance(message, Ready):
            exited = f"the model process exited (code {child.process.exitcode})"
            self.error = message.message if isinstance(message, Fatal) else exited
            log.error("model %s could not be loaded: %s", self.slug, self.error)
            self._become(WorkerState.DEFUNCT)
            await child.close()
            return False
        self.child, self.load_seconds, self.error = child, message.load_seconds, ""
        self._become(WorkerState.READY)
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
        self.running = {}
        for task in group:
            job = task.read_job()
            # Notes made at Run (a callbackUrl that is not a URL) open the task's output log.
            self.running[task.id] = RunningTask(task, job, log=list(job.notes))
        heartbeat = asyncio.create_task(self._heartbeat())
        # One folder per claim: an attempt given back (``requeue(refund=True)``) repeats the attempt number.
        scratches = [self.settings.data_dir / "scratch" / f"{task.id}-{new_blob_folder()}" for task in group]
        try:
            live = await self._prepare_all(scratches)
            if live and await self._send(live):
                await self._follow(live)
        finally:
            heartbeat.cancel()
            for scratch in scratches:
                await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)
            self.running = {}

    async def _prepare_all(self, scratches: list[Path]) -> list[RunningTask]:
        """Prepare every claimed task in its scratch folder, and record ``task_assign`` of those ready (in one
        transaction); the ones still to run (not failed nor stopped)."""
        ready = []
        for entry, scratch in zip(list(self.running.values()), scratches, strict=True):
            if await self._prepare(entry, scratch):
                ready.append(entry)
            else:
                entry.settle()  # failed its inputs, or was cancelled, before the model ran
        held = await self.store.assign_all([entry.id for entry in ready], self.worker_id) if ready else []
        for entry, assigned in zip(ready, held, strict=True):
            if not assigned:
                entry.settle()  # not this worker's any more (ended, or re-queued): nothing to record
        for entry in self.running.values():
            if entry.stop and entry.settle():  # stopped after its inputs were ready, before the model got it
                await self._record_stopped(entry)
        return [entry for entry in self.running.values() if not entry.settled]

    async def _send(self, live: list[RunningTask]) -> bool:
        """Hand the prepared tasks to the model process; False (and the tasks re-queued) if it had died, or if
        the server closed this worker while they were prepared."""
        child = self.child
        if child is None:
            # ``close`` (the server stopping: ``Services.close`` closes its workers one by one) took the process
            # while this batch was prepared: nothing ran, so the tasks run again, here at the next start or on a
            # worker still open. Asserted before, which failed every task of the batch.
            await self._give_back(live, "the server stopped before task {id} was sent to its model process")
            return False
        jobs = tuple(entry.job for entry in live if entry.job is not None)
        # The stop event is cleared here, before the work is sent, never by the child when it begins: a cancel
        # that came between the send and the child's start would otherwise be wiped, and the task run to the end.
        child.stop_event.clear()
        try:
            child.send(Run(jobs[0]) if len(jobs) == 1 else RunGroup(jobs))
        except OSError:
            # The model process died before it was given the work: nothing ran, so the tasks run again.
            await self._give_back(live, "the model process had exited before task {id} was sent to it")
            await self._respawn("a crash")
            return False
        for index, entry in enumerate(live):
            entry.sent(index)
        # A stop that came while the last of them were being recorded: deliver it now.
        for entry in live:
            if entry.stop and not entry.settled:
                stop, entry.stop = entry.stop, None
                await self.stop(entry.id, stop)
        return True

    async def _give_back(self, live: list[RunningTask], why: str) -> None:
        """Re-queue prepared tasks that never reached the model process; the attempt is not theirs (refunded)."""
        for entry in live:
            if entry.settle():
                note = f"Re-queued: {why.format(id=entry.id)}.\n"
                await self.store.requeue(entry.id, note, self.worker_id, refund=True)

    async def _prepare(self, entry: RunningTask, scratch: Path) -> bool:
        """Inputs on local disk and the job built; False if the task ended instead."""
        references = await local_references(self.store, self.blobs, self.worker_id, entry, scratch)
        if references is None:
            return False
        if entry.stop:
            await self._record_stopped(entry)
            return False
        entry.folder = new_blob_folder()
        entry.job = GenerationJob.of(
            entry.id,
            entry.stored,
            references,
            str(self.blobs.local_path(f"outputs/{entry.folder}") or scratch / "outputs"),
            model=self.slug,
            embed_prompt=self.settings.png_embed_prompt,
        )
        return True

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
        """Renew the lease of every unsettled task (one statement) and act on a stop asked for through the
        database."""
        beating = [task_id for task_id, entry in self.running.items() if not entry.settled]
        if not beating:
            return
        beats = await self.store.heartbeat_all(beating, self.worker_id, self.settings.lease_seconds)
        for task_id, beat in beats.items():
            entry = self.running.get(task_id)
            if entry is not None and not entry.settled:
                await self._beaten(entry, beat)

    async def _beaten(self, entry: RunningTask, beat: Beat) -> None:
        if not beat.held and entry.stop is StopKind.KILL:
            return  # it is being killed: not a lost lease
        if not beat.held:
            log.warning("lease lost; abandoning the task", extra=about(entry.id))
            entry.lose()
            if self.child is not None:
                self.child.kill()
        elif beat.stop is not None and beat.stop != entry.stop:
            await self.stop(entry.id, beat.stop)

    async def _follow(self, live: list[RunningTask]) -> None:
        # The process this work was sent to: ``close`` may drop ``self.child`` while its last messages are read.
        child = self.child
        assert child is not None
        while not await self._on_message(live, await child.messages.get()):
            pass

    async def _on_message(self, live: list[RunningTask], message: FromChild) -> bool:
        """Record one message of the model process about the running work; True once the work has ended."""
        match message:
            case Started():
                for entry in live:  # not waited for, as the steps: written with them, in order
                    self.store.post_start(entry.id, self.worker_id)
            case Step(job=job, step=step, total=total, elapsed=elapsed, preview=preview):
                entry = live[job]
                entry.log.append(f"step {step}/{total}")
                step_done = Progress(step=step, total=total, elapsed=elapsed, preview=preview)
                # Not waited for: written with the fleet's other steps; the task's next transition follows it.
                self.store.post_progress(entry.id, self.worker_id, step_done)
            case ImageSaved(job=job) | ImageFailed(job=job) as saved:
                await self._saved(live[job], saved)
            case JobCanceled(job=job):
                # A cancelled member of a group: the shared pipeline call goes on for the others, but this task's
                # images will be dropped, so it ends now rather than when the call ends.
                await self._settle(live[job], Canceled())
            case GroupDone() | Done() | Canceled() | Error() as outcome:
                await self._ended(live, outcome.outcomes if isinstance(outcome, GroupDone) else (outcome,) * len(live))
                return True
            case Gone():
                await self._child_exited(live)
                return True
            case other:
                log.warning("unexpected message from the model process: %r", other)
        return False

    async def _ended(self, live: list[RunningTask], outcomes: Sequence[Outcome]) -> None:
        """The model process's outcome for each member: the successes recorded together, then the others."""
        pairs = list(zip(live, outcomes, strict=True))
        await self._succeed_all(
            [(entry, each.result) for entry, each in pairs if isinstance(each, Done) and entry.settle()]
        )
        for entry, each in pairs:
            if not isinstance(each, Done):
                await self._settle(entry, each)

    async def _settle(self, entry: RunningTask, outcome: Outcome) -> None:
        """End one task from what the child reported for it (once: a cancelled group member ends early)."""
        if not entry.settle():
            return
        match outcome:
            case Done(result=result):
                await self._succeed_all([(entry, result)])
            case Canceled():
                await self.store.cancel(entry.id, StopKind.CANCEL, self.worker_id)
            case Error(kind=kind, message=text, traceback=trace):
                # The traceback and the exception's text (paths, tensors, model internals) stay in this log; the
                # client gets the kind of error and an id that finds the log line.
                error_id = new_error_id()
                log.error("task %s: model error [error id %s]: %s\n%s", entry.id, error_id, text, trace)
                message = (
                    f"The model failed on this task ({kind or 'error'}; error id {error_id}). "
                    "Retry, or report the error id."
                )
                output = "\n".join(entry.log)
                await self.store.fail(entry.id, Pexit.FAILED, message, output=output, worker_id=self.worker_id)

    async def _child_exited(self, live: list[RunningTask]) -> None:
        assert self.child is not None
        code = self.child.process.exitcode
        killed = any(entry.stop is StopKind.KILL and not entry.settled for entry in live)
        # Said before the tasks are settled, so that whoever sees the kill answered also sees the restart.
        self._become(WorkerState.RESTARTING)
        self.restart_reason = "a kill" if killed else "a crash"
        for entry in live:
            if not entry.settle():
                continue  # ended already, or the reaper has given the task to another worker: record nothing
            if entry.stop is StopKind.KILL:
                log.info("killed as requested (model process exit code %s)", code, extra=about(entry.id))
                await self.store.cancel(entry.id, StopKind.KILL, self.worker_id)
            elif killed:
                # Another task of the group was killed, taking the model process with it: this one runs again.
                note = f"Re-queued: task {entry.id} shared a model process with a task that was killed.\n"
                await self.store.requeue(entry.id, note, self.worker_id, refund=True)
            else:
                reason = f"The model process exited with code {code} (out of memory?)."
                output = "\n".join(entry.log)
                await self.store.fail(entry.id, Pexit.FAILED, reason, output=output, worker_id=self.worker_id)
        await self._respawn(self.restart_reason)

    async def _saved(self, entry: RunningTask, saved: ImageSaved | ImageFailed) -> None:
        """One image of a running task is saved (or failed): its URL works from now on, and the event tells
        followers (Ark's stream) at once. The file is a ``partial`` row until the task succeeds, so Task/Detail
        lists only the outputs of a finished attempt."""
        if entry.settled:
            return
        if isinstance(saved, ImageFailed):
            failed = saved.failed
            # The raw text may name server paths: it stays in the log, the client gets an id to quote.
            error_id = new_error_id()
            log.warning(
                "image %d failed [error id %s]: %s", failed.index, error_id, failed.message, extra=about(entry.id)
            )
            text = f"Image {failed.index} could not be finished (error id {error_id})."
            await self.store.image_failed(entry.id, self.worker_id, failed.index, text)
            return
        file = await output_file(self.blobs, entry, saved.image, FileRole.PARTIAL)
        entry.partial[file.name] = file
        # Not waited for: written with the fleet's steps, before the task's next transition.
        written = self.store.post_image(entry.id, self.worker_id, file)
        written.add_done_callback(functools.partial(self._image_written, entry, file))

    def _image_written(self, entry: RunningTask, file: File, written: asyncio.Future[bool]) -> None:
        if written.cancelled() or written.result():
            return
        # The task is not this worker's any more (its lease was lost): no row points at these bytes.
        entry.partial.pop(file.name, None)
        deleting = asyncio.get_running_loop().create_task(asyncio.to_thread(self.blobs.delete, file.blob_key))
        self._background.add(deleting)
        deleting.add_done_callback(self._background.discard)

    async def _succeed_all(self, done: list[tuple[RunningTask, GenerationResult]]) -> None:
        """Record the success of the members that ended well (each one's end settled by the caller): their
        ``task_end`` together, then their images and details together."""
        if not done:
            return
        outputs = [(entry.id, "\n".join(entry.log)) for entry, _ in done]
        began = await self.store.begin_postprocess_all(outputs, self.worker_id)
        # Only those still this worker's: nothing is stored for the others.
        successes = [
            await self._success(entry, result, output)
            for (entry, result), (_, output), held in zip(done, outputs, began, strict=True)
            if held
        ]
        if successes:
            await self.store.succeed_all(successes, self.worker_id)

    async def _success(self, entry: RunningTask, result: GenerationResult, output: str) -> Success:
        """What the success of ``entry`` records: its output rows, ``output`` (its log, as ``task_end`` stored
        it) and its details."""
        task = entry.task
        files = []
        for image in result.images:
            file = entry.partial.pop(image.name, None) or await output_file(self.blobs, entry, image, FileRole.OUTPUT)
            file.role = FileRole.OUTPUT  # a partial row becomes an output in the same transaction as the task's end
            files.append(file)
        # Only the project's own tasks: another tenant's task ids are none of its business.
        batched_with = [
            other
            for other, peer in self.running.items()
            if other != task.id and peer.task.project_id == task.project_id
        ]
        fresh = await self.store.get_by_id(task.id)
        details = success_details(entry, result, fresh, self._batch_wait, batched_with)
        # The event keeps no URLs nor access keys: the API renders them from the file rows with its own public
        # URL and the derived keys (a worker host's base_url is not the one clients reach), as Task/Detail does.
        log.info("task %s succeeded on worker %s", task.id, self.worker_id, extra=about(task.id))
        return Success(task.id, files, output, details)
