"""queue counts: claimable tasks per model, priority, project and bucket of ids, kept by triggers (SQLite)

A queue position counted on the claim index costs as many index entries as the tasks ahead of it in its project
(27 ms at 100,000 on the 2-core machine). ``queue_counts`` holds, per (model, priority, project, id >> 8), how many
claimable tasks (``task_queue`` with their inputs stored) there are; triggers on ``tasks`` keep it in the writer's
own transaction, whichever process or code path writes, so a position is a sum of a few hundred rows and a count of
at most 256 index entries. On PostgreSQL the table stays empty (positions keep the index count there).

Revision ID: e1a2b3c4d5f6
Revises: d7f3a9c2e5b1
Create Date: 2026-12-07 16:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "e1a2b3c4d5f6"
down_revision = "d7f3a9c2e5b1"

CLAIMABLE = "{row}.status = 'task_queue' AND {row}.inputs_ready"
KEY = "model = {row}.model AND priority = {row}.priority AND project_id = {row}.project_id AND bucket = {row}.id >> 8"
ADD = (
    "INSERT INTO queue_counts (model, priority, project_id, bucket, queued) "
    "VALUES ({row}.model, {row}.priority, {row}.project_id, {row}.id >> 8, 1) "
    "ON CONFLICT (model, priority, project_id, bucket) DO UPDATE SET queued = queued + 1;"
)
REMOVE = (
    f"UPDATE queue_counts SET queued = queued - 1 WHERE {KEY}; DELETE FROM queue_counts WHERE {KEY} AND queued = 0;"
)
#: The columns whose change can move a task into or out of the claimable set, or to another count.
MOVES = "status, inputs_ready, model, priority, project_id"
TRIGGERS = {
    "tr_queue_counts_insert": ("AFTER INSERT ON tasks", "NEW", ADD),
    "tr_queue_counts_enter": (f"AFTER UPDATE OF {MOVES} ON tasks", "NEW", ADD),
    "tr_queue_counts_leave": (f"AFTER UPDATE OF {MOVES} ON tasks", "OLD", REMOVE),
    "tr_queue_counts_delete": ("AFTER DELETE ON tasks", "OLD", REMOVE),
}


def upgrade() -> None:
    op.create_table(
        "queue_counts",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model", "priority", "project_id", "bucket"),
    )
    if op.get_bind().dialect.name != "sqlite":
        return
    for name, (when, row, body) in TRIGGERS.items():
        test = CLAIMABLE.format(row=row)
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW WHEN {test} BEGIN {body.format(row=row)} END")
    op.execute(
        "INSERT INTO queue_counts (model, priority, project_id, bucket, queued) "
        "SELECT model, priority, project_id, id >> 8, count(*) FROM tasks "
        f"WHERE {CLAIMABLE.format(row='tasks')} GROUP BY model, priority, project_id, id >> 8"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("queue_counts")
