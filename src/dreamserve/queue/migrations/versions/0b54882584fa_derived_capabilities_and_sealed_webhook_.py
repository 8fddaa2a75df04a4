"""derived capabilities and sealed webhook secrets

Task tokens and file access keys are derived from the server secret from now on (``keyring.py``):
rows keep a salt and the sha256 of the capability. Existing rows keep their clear value (still
valid) and get its digest here, so lookups go by digest for every row. Webhook secrets get a sealed
column; the server seals existing ones at its next start (the migration has no server secret).

Revision ID: 0b54882584fa
Revises: c4e1f0a7d2b3
Create Date: 2026-12-01 22:26:36.228060
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0b54882584fa"
down_revision = "c4e1f0a7d2b3"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_salt", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("key_digest", sa.String(length=64), nullable=True))
        batch_op.alter_column("accesskey", existing_type=sa.VARCHAR(length=80), nullable=True)
        batch_op.create_index(batch_op.f("ix_files_key_digest"), ["key_digest"], unique=False)

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("webhook_secret_sealed", sa.String(length=160), nullable=False, server_default="")
        )

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_salt", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("token_digest", sa.String(length=64), nullable=True))
        batch_op.alter_column("token", existing_type=sa.VARCHAR(length=64), nullable=True)
        batch_op.create_index(batch_op.f("ix_tasks_token_digest"), ["token_digest"], unique=True)

    bind = op.get_bind()
    tasks = sa.table("tasks", sa.column("id", sa.Integer), sa.column("token", sa.String), sa.column("token_digest"))
    for row in bind.execute(sa.select(tasks.c.id, tasks.c.token).where(tasks.c.token.is_not(None))).all():
        bind.execute(tasks.update().where(tasks.c.id == row.id).values(token_digest=_digest(row.token)))
    files = sa.table("files", sa.column("id", sa.Integer), sa.column("accesskey", sa.String), sa.column("key_digest"))
    for row in bind.execute(sa.select(files.c.id, files.c.accesskey).where(files.c.accesskey.is_not(None))).all():
        bind.execute(files.update().where(files.c.id == row.id).values(key_digest=_digest(row.accesskey)))


def downgrade() -> None:
    # Rows made since the upgrade have no clear token or access key: they cannot be read back by an older server.
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_token_digest"))
        batch_op.drop_column("token_digest")
        batch_op.drop_column("token_salt")

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("webhook_secret_sealed")

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_key_digest"))
        batch_op.drop_column("key_digest")
        batch_op.drop_column("key_salt")
