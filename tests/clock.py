"""A clock a test moves by hand, for a supervisor's batch window (``Supervisor.clock``): its time stands still
while the supervisor claims, counts and runs, and a wait on it ends only when its event is set or the test has
moved the clock past the wait's end. So a window's rules are proven exactly, without waiting the window out."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Parked:
    """One ``wait`` in progress: its event, when it ends on this clock, and how to wake it on its own loop."""

    event: asyncio.Event
    until: float
    loop: asyncio.AbstractEventLoop
    moved: asyncio.Event
    #: The clock's time when the wait last looked at it (and went on waiting).
    seen: float | None = None


@dataclass
class ManualClock:
    seconds: float = 0.0
    _parked: list[_Parked] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return self.seconds

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        parked = _Parked(event, self.seconds + timeout, asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._parked.append(parked)
        try:
            while not event.is_set():
                parked.moved.clear()  # before the look: a move after it sets it again
                now = self.seconds
                if now >= parked.until:
                    return
                parked.seen = now
                waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(parked.moved.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        finally:
            with self._lock:
                self._parked.remove(parked)

    def waiting(self) -> bool:
        """A wait is in progress that has looked at the clock's present time and goes on (nor is its event set):
        the supervisor has seen all that was queued, and the window is still open (called from the test's
        thread)."""
        with self._lock:
            return any(parked.seen == self.seconds and not parked.event.is_set() for parked in self._parked)

    def advance(self, seconds: float) -> None:
        """Move the clock on, and let every wait look whether it has ended (called from the test's thread)."""
        with self._lock:
            self.seconds += seconds
            for parked in self._parked:
                parked.loop.call_soon_threadsafe(parked.moved.set)
