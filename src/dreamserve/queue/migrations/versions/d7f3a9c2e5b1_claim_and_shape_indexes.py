"""claim and shape indexes: claims, batches and queue positions read by index, not by ranking the queue

``ix_tasks_claim`` (status, model, inputs_ready, priority, project_id, id) replaces ``ix_tasks_queue``: the
highest queued priority, each project's oldest task at it and the counts behind a queue position are seeks and
ranges of it. ``ix_tasks_shape`` adds the batch shape (has_inputs, width, height) before the same tail, for the
same-shape claim and the batch window's count.

Revision ID: d7f3a9c2e5b1
Revises: 5e7a1c9d3f20
Create Date: 2026-12-07 10:00:00.000000
"""

from alembic import op

revision = "d7f3a9c2e5b1"
down_revision = "5e7a1c9d3f20"

CLAIM = ["status", "model", "inputs_ready", "priority", "project_id", "id"]
SHAPE = ["status", "model", "inputs_ready", "has_inputs", "width", "height", "priority", "project_id", "id"]


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_queue")
        batch_op.create_index("ix_tasks_claim", CLAIM, unique=False)
        batch_op.create_index("ix_tasks_shape", SHAPE, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_shape")
        batch_op.drop_index("ix_tasks_claim")
        batch_op.create_index("ix_tasks_queue", ["status", "model", "priority", "id"], unique=False)
