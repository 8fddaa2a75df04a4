"""A per-process budget of bytes in flight: what the images being checked hold in memory, counted before they do.

Admission is all or nothing and never waits: a request that does not fit is refused (``RateLimited``, HTTP 429
with Retry-After) so the client backs off, rather than queueing memory behind the ones in flight. One claim is
always admitted when nothing else is in flight, so a budget smaller than one request never locks it out, and a
claim of nothing always is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dreamserve.errors import RateLimited

MIB = 1024 * 1024


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()  # claims are taken on the event loop and released from worker threads

    @contextmanager
    def claim(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes of the budget for the ``with`` block; ``RateLimited`` when they are not free."""
        with self._lock:
            if size and self.in_flight and self.in_flight + size > self.limit:
                raise RateLimited(
                    f"The server is busy checking other requests' images ({self.in_flight / MIB:,.0f} MiB of its "
                    f"{self.limit / MIB:,.0f} MiB in use; this one needs {size / MIB:,.0f} MiB). Retry in a few "
                    "seconds, or pass the images as this server's file URLs (File/Upload), which cost none.",
                    retry_after=2,
                )
            self.in_flight += size
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= size
