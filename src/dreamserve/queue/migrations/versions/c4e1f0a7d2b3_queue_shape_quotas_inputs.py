"""queue: task shape columns, staged inputs, per-project priority cap and round-robin clock

Revision ID: c4e1f0a7d2b3
Revises: 9bc1bd1e81df
Create Date: 2026-12-01 22:40:00

The shape columns let a same-shape claim be one conditional UPDATE and the per-project quotas one
sum; unfinished rows are filled in from their ``job`` (finished ones keep the defaults: nothing
reads their shape). A queued task with URL inputs is left for the preprocess loop (``inputs_ready``
false), as a new one would be.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "c4e1f0a7d2b3"
down_revision = "9bc1bd1e81df"


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("last_claimed", sa.Float(), server_default="0", nullable=False))

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("width", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("height", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("num_images", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("has_inputs", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("inputs_ready", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.add_column(sa.Column("inputs_lease_until", sa.Float(), nullable=True))
        batch_op.create_index("ix_tasks_project_status", ["project_id", "status"], unique=False)

    tasks = sa.table(
        "tasks",
        sa.column("id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("job", sa.JSON()),
        sa.column("width", sa.Integer()),
        sa.column("height", sa.Integer()),
        sa.column("num_images", sa.Integer()),
        sa.column("has_inputs", sa.Boolean()),
        sa.column("inputs_ready", sa.Boolean()),
    )
    bind = op.get_bind()
    finished = ["task_postprocess_end", "task_cancel"]
    unfinished = sa.select(tasks.c.id, tasks.c.job).where(tasks.c.status.not_in(finished))
    for task_id, job in bind.execute(unfinished).all():
        job = json.loads(job) if isinstance(job, str) else job or {}
        inputs = job.get("inputs") or []
        bind.execute(
            sa.update(tasks)
            .where(tasks.c.id == task_id)
            .values(
                width=int(job.get("width", 0)),
                height=int(job.get("height", 0)),
                num_images=int(job.get("num_images", 1)),
                has_inputs=bool(inputs),
                inputs_ready=not any("url" in item for item in inputs),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_project_status")
        for column in ("inputs_lease_until", "inputs_ready", "has_inputs", "num_images", "height", "width"):
            batch_op.drop_column(column)
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("last_claimed")
        batch_op.drop_column("max_priority")
