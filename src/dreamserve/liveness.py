"""Which background loops of this process are alive: each ticks after every completed iteration.

``/readyz`` reads ``problems()``: a loop whose asyncio task has ended (it should run until close) or that has
not ticked for its allowed silence is named there, so a load balancer stops sending work to a process whose
claim loop, heartbeat, reaper, callback sender or dispatcher is stuck. ``guarded_loop`` is the shape every
such loop takes: one iteration, a tick, and on any exception a log line and an exponential back-off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Back-off after a failed iteration: doubles from ``BACKOFF_FIRST`` up to ``BACKOFF_MAX`` seconds.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


@dataclass
class LoopState:
    name: str
    #: Longest silence between two ticks before the loop counts as stuck.
    max_silence: float
    last_tick: float
    task: asyncio.Task[Any] | None = None
    failures: int = 0
    last_error: str = ""


class Liveness:
    def __init__(self, stale_seconds: float) -> None:
        self.stale_seconds = stale_seconds
        self._loops: dict[str, LoopState] = {}

    def register(self, name: str, period: float = 0.0) -> LoopState:
        """The loop's state, made on first call (a second call, from inside the loop, returns the same one)."""
        state = self._loops.get(name)
        if state is None:
            state = self._loops[name] = LoopState(name, max(self.stale_seconds, 3 * period), time.monotonic())
        return state

    def start(self, name: str, period: float, body: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        """Run ``guarded_loop`` for ``body`` every ``period`` seconds, watched under ``name``."""
        state = self.register(name, period)
        state.task = asyncio.create_task(guarded_loop(state, period, body), name=name)
        return state.task

    def watch(self, name: str, task: asyncio.Task[Any]) -> None:
        self._loops[name].task = task

    def tick(self, name: str) -> None:
        state = self._loops.get(name)
        if state is not None:
            state.last_tick, state.failures = time.monotonic(), 0

    def forget(self, name: str) -> None:
        self._loops.pop(name, None)

    def problems(self) -> list[dict[str, str]]:
        now = time.monotonic()
        found = []
        for state in self._loops.values():
            if state.task is not None and state.task.done():
                why = "stopped"
            elif now - state.last_tick > state.max_silence:
                why = f"no completed iteration for {now - state.last_tick:.0f} s"
            else:
                continue
            found.append({"loop": state.name, "problem": why, "last_error": state.last_error})
        return found


async def guarded_loop(state: LoopState, period: float, body: Callable[[], Awaitable[Any]]) -> None:
    """Call ``body`` every ``period`` seconds until cancelled; an exception is logged and backed off, never fatal."""
    while True:
        try:
            await body()
        except Exception as exc:
            await backoff(state, exc)
            continue
        state.last_tick, state.failures = time.monotonic(), 0
        await asyncio.sleep(period)


async def backoff(state: LoopState, exc: BaseException) -> None:
    """Log a failed iteration of ``state``'s loop and sleep for its back-off."""
    state.failures += 1
    state.last_error = f"{type(exc).__name__}: {exc}"[:300]
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (state.failures - 1))
    log.error("%s failed (%d in a row); retrying in %.1f s", state.name, state.failures, delay, exc_info=exc)
    await asyncio.sleep(delay)
