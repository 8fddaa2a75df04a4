"""The time a supervisor's batch window is measured in.

Production waits on the monotonic clock; a test hands the supervisor a clock it moves by hand, so the window's
rules (the whole window, half a window for one client after another, an end at once) are proven without waiting
the window out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock (only differences mean anything)."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until ``event`` is set or ``timeout`` seconds of this clock have passed, whichever comes first."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=timeout)


MONOTONIC = MonotonicClock()
