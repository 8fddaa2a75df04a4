"""One Alembic tree for every database: after ``upgrade head`` the schema equals the models, with no diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from dreamserve.db import Base
from dreamserve.migrate import upgrade

URLS = ["sqlite"]
if os.environ.get("DREAMSERVE_TEST_POSTGRES"):
    URLS.append("postgresql")


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


@pytest.mark.parametrize("dialect", URLS)
async def test_upgrade_head_matches_the_models(dialect: str, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/db.sqlite" if dialect == "sqlite" else os.environ["DREAMSERVE_TEST_POSTGRES"]
    engine = create_async_engine(url)
    try:
        await upgrade(engine)
        await upgrade(engine)  # idempotent: a second replica starting finds nothing to do
        async with engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
    finally:
        await engine.dispose()
