"""The database engine (``queue/db.make_engine``) on SQLite on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from dreamserve.queue.db import make_engine, make_sessionmaker

POOL = 6


async def test_a_busy_api_keeps_its_connections_instead_of_opening_new_ones(tmp_path: Path) -> None:
    """SQLAlchemy's default pool (5, and 10 more closed on their return) opened a connection, and with aiosqlite a
    thread, for nearly every request past the fifth at once: about 5 a second in the soak (issue 11). Now a burst
    opens at most ``pool_size`` connections, the next burst opens none, and nothing past the pool is opened: the
    others wait their turn."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=POOL)
    sessions = make_sessionmaker(engine)
    opened = 0
    busy = 0
    most_busy = 0

    @event.listens_for(engine.sync_engine, "connect")
    def count(*_: Any) -> None:
        nonlocal opened
        opened += 1

    async def request() -> None:
        nonlocal busy, most_busy
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            busy += 1
            most_busy = max(most_busy, busy)
            await asyncio.sleep(0.02)  # a request's other awaits, holding its connection
            busy -= 1

    try:
        await asyncio.gather(*(request() for _ in range(4 * POOL)))
        assert (opened, most_busy) == (POOL, POOL)
        await asyncio.gather(*(request() for _ in range(4 * POOL)))
        assert opened == POOL, f"the second burst opened {opened - POOL} connections"
    finally:
        await engine.dispose()
