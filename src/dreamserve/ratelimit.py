"""Per-project request rate limits: a token bucket per project, in each API process.

A project may make ``burst`` requests at once, then ``per_minute`` a minute; a request over that is
refused with ``RateLimited`` (HTTP 429, code 96) whose ``retry_after`` is the whole seconds until the
next token. The buckets live in the process: with N API replicas a project gets up to N times the
rate, so set ``rate_limit_per_minute`` per replica (or put a shared limiter in front).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from dreamserve.errors import RateLimited

#: Buckets untouched this long are full again and can be dropped (keeps memory bounded).
IDLE_SECONDS = 600.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.capacity = float(burst or per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def retry_after(self, key: int) -> float:
        """Seconds until ``key`` may make a request (0 = now); takes the token when it may."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def check(self, key: int) -> None:
        """Take a token for ``key`` or raise ``RateLimited``."""
        wait = self.retry_after(key)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RateLimited(
                f"Rate limit reached: this project may make {self.per_minute} requests a minute. "
                f"Retry after {seconds} s (the Retry-After header), and poll less often or follow the task socket.",
                retry_after=seconds,
            )

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < IDLE_SECONDS:
            return
        self._last_sweep = now
        for key in [k for k, b in self._buckets.items() if now - b.updated > IDLE_SECONDS]:
            del self._buckets[key]
