"""project unfinished counters: a project's unfinished tasks and their work, kept by the transactions that create
and end them, so that a Run's quota check reads two columns instead of summing the project's backlog

Revision ID: e2b6c8d4f1a7
Revises: e1a2b3c4d5f6
Create Date: 2026-12-07 16:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "e2b6c8d4f1a7"
down_revision = "e1a2b3c4d5f6"

UNFINISHED = "tasks.project_id = projects.id AND tasks.status NOT IN ('task_postprocess_end', 'task_cancel')"


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unfinished_tasks", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("unfinished_pixels", sa.BigInteger(), server_default="0", nullable=False))
    # The tasks already unfinished, counted once (the last sum over the backlog).
    op.execute(
        "UPDATE projects SET"
        f" unfinished_tasks = (SELECT count(*) FROM tasks WHERE {UNFINISHED}),"
        " unfinished_pixels = (SELECT coalesce(sum(CAST(tasks.num_images AS BIGINT) * tasks.width * tasks.height), 0)"
        f" FROM tasks WHERE {UNFINISHED})"
    )


def downgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("unfinished_pixels")
        batch_op.drop_column("unfinished_tasks")
