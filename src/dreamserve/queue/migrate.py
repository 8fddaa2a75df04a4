"""Schema migrations: one Alembic tree for SQLite and PostgreSQL, applied at start-up.

The SQLite file is created 0600 before the first connection (its WAL and SHM files follow its mode).
``render_as_batch`` lets the same revisions alter tables on SQLite (which lacks most ALTERs). On
PostgreSQL an advisory lock makes concurrent replicas apply them one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x64726561  # "drea"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> bool:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    before = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(alembic_config(connection), "head")
    return MigrationContext.configure(connection).get_current_revision() != before


def _private_sqlite(engine: AsyncEngine) -> None:
    """The SQLite file, and its WAL and SHM (SQLite gives them the database's mode), readable by this user only."""
    name = engine.url.database
    if engine.dialect.name != "sqlite" or not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            os.chmod(companion, 0o600)


async def upgrade(engine: AsyncEngine) -> bool:
    """Apply the revisions the database lacks; True when there were any."""
    _private_sqlite(engine)
    async with engine.begin() as connection:
        return await connection.run_sync(_upgrade)
