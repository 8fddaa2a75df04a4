"""sealed legacy capabilities, blob_key index

Rows stored before capabilities were derived (0b54882584fa) kept their clear ``tasks.token`` and
``files.accesskey``. Sealing them needs the server secret, which a migration does not have: this adds
the columns, and the server seals the values into them and empties the clear ones at its next start
(``queue/sealing.py``), then rewrites a SQLite file so the old bytes are gone from its free pages.
``files.blob_key`` gets an index: the orphan sweep looks blobs up by key, a page at a time.

Revision ID: 5e7a1c9d3f20
Revises: 0b54882584fa
Create Date: 2026-12-07 07:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "5e7a1c9d3f20"
down_revision = "0b54882584fa"


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accesskey_sealed", sa.String(length=192), nullable=True))
        batch_op.create_index(batch_op.f("ix_files_blob_key"), ["blob_key"], unique=False)

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_sealed", sa.String(length=128), nullable=True))


def downgrade() -> None:
    # Sealed legacy values cannot be unsealed here (no server secret): an older server loses those rows' tokens.
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("token_sealed")

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_blob_key"))
        batch_op.drop_column("accesskey_sealed")
