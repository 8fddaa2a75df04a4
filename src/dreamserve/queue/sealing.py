"""Rows stored before the key scheme, upgraded at start-up: no clear secret stays at rest.

Task tokens and file access keys of rows older than derived capabilities (``keyring.py``) were stored in
clear. Sealing needs the server secret, which only the server has (not Alembic), so the server does it at
start, as it does for webhook secrets (``projects.seal_webhook_secrets``): each clear value is sealed into
its ``*_sealed`` column and the clear column emptied, in batches. The value itself is kept, so old tokens
and file URLs go on working. SQLite keeps the bytes of an overwritten value in free space until the file is
rewritten, so ``scrub_freed_pages`` runs VACUUM after such an upgrade.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dreamserve.queue.db import File, Task
from dreamserve.queue.keyring import ServerKey, digest

log = logging.getLogger(__name__)

#: Rows sealed per transaction: a large old database is upgraded without one long write lock.
BATCH = 500


async def seal_legacy_capabilities(sessions: async_sessionmaker[AsyncSession], keys: ServerKey) -> int:
    """Seal the clear tokens and access keys of rows stored before derived capabilities; returns how many."""
    sealed = await _seal(sessions, keys, Task, "token", "token_sealed", "token_digest", "task-token")
    sealed += await _seal(sessions, keys, File, "accesskey", "accesskey_sealed", "key_digest", "file-key")
    if sealed:
        log.info("sealed %d clear task tokens and file access keys of rows stored before derived keys", sealed)
    return sealed


async def _seal(
    sessions: async_sessionmaker[AsyncSession],
    keys: ServerKey,
    model: Any,
    clear: str,
    sealed: str,
    digested: str,
    label: str,
) -> int:
    done = 0
    while True:
        async with sessions.begin() as session:
            query = select(model.id, getattr(model, clear)).where(getattr(model, clear).is_not(None)).limit(BATCH)
            rows = (await session.execute(query)).all()
            for row_id, value in rows:
                # The digest was filled in by 0b54882584fa; written again so a row of any age is found by it.
                values = {sealed: keys.seal(f"{label}:{row_id}", value), clear: None, digested: digest(value)}
                await session.execute(update(model).where(model.id == row_id).values(**values))
        done += len(rows)
        if len(rows) < BATCH:
            return done


async def scrub_freed_pages(engine: AsyncEngine) -> None:
    """Rewrite a SQLite file (VACUUM, then empty the WAL) so no overwritten secret lingers in its free space.
    PostgreSQL keeps old row versions until its own VACUUM (autovacuum, or ``VACUUM FULL`` to rewrite)."""
    if engine.dialect.name != "sqlite":
        return
    try:
        async with engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.exec_driver_sql("VACUUM")
            await autocommit.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except OperationalError as error:  # another process holds the database: its next start tries again
        log.warning("could not VACUUM the database after sealing old secrets: %s", error)
