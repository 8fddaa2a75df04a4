"""initial schema

Revision ID: 9bc1bd1e81df
Revises:
Create Date: 2026-11-25 00:38:32.112388
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "9bc1bd1e81df"
down_revision = None

QUEUE = ["status", "model", "priority", "id"]

#: The task's stage times, each set when the task reaches it.
TIMES = [
    "accepttime",
    "preprocessstarttime",
    "preprocessendtime",
    "assigntime",
    "starttime",
    "endtime",
    "postprocessstarttime",
    "postprocessendtime",
    "canceltime",
]


def _row(key: str | None, parent: str | None, *columns: sa.Column[Any], unique: tuple[str, ...] = ()) -> list[Any]:
    """A table's items: its ``id``, the ``key`` that ties it to a row of ``parent`` (enforced when there is one),
    its own columns, and its constraints in the order they were first generated."""
    items: list[Any] = [sa.Column("id", sa.Integer(), nullable=False)]
    items += [sa.Column(key, sa.Integer(), nullable=False)] if key else []
    items += [*columns]
    items += [sa.ForeignKeyConstraint([key], [f"{parent}.id"])] if key and parent else []
    items += [sa.PrimaryKeyConstraint("id")]
    return items + ([sa.UniqueConstraint(*unique)] if unique else [])


def _tables() -> list[tuple[str, list[Any], dict[str, list[str]]]]:
    """Each table in creation order: its columns and constraints, and its indexes by name."""
    nonces = [
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "nonce"),
    ]
    projects = _row(
        None,
        None,
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.Column("api_key_prefix", sa.String(length=12), nullable=False),
        sa.Column("secret_sealed", sa.String(length=256), nullable=True),
        sa.Column("signature_required", sa.Boolean(), nullable=False),
        sa.Column("webhook_secret", sa.String(length=64), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        unique=("api_key_hash",),
    )
    deliveries = _row(
        "task_id",
        None,
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", sa.Float(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("delivered", sa.Float(), nullable=True),
    )
    files = _row(
        "project_id",
        "projects",
        sa.Column("folder_id", sa.Integer(), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("contenttype", sa.String(length=100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("accesskey", sa.String(length=80), nullable=False),
        sa.Column("blob_key", sa.String(length=400), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        unique=("accesskey", "name"),
    )
    folders = _row(
        "project_id",
        "projects",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("created", sa.Float(), nullable=False),
    )
    tasks = _row(
        "project_id",
        "projects",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=40), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("job", sa.JSON(), nullable=False),
        sa.Column("callback_url", sa.Text(), nullable=False),
        sa.Column("callback_events", sa.JSON(), nullable=False),
        sa.Column("pexit", sa.String(length=16), nullable=False),
        sa.Column("debugoutput", sa.Text(), nullable=False),
        sa.Column("debugerror", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("createtime", sa.Float(), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in TIMES),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("stop_requested", sa.String(length=16), nullable=False),
        sa.Column("dispatched_at", sa.Float(), nullable=True),
        unique=("token",),
    )
    events = _row(
        "task_id",
        "tasks",
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("message", sa.JSON(), nullable=True),
        sa.Column("created", sa.Float(), nullable=False),
    )
    return [
        ("nonces", nonces, {"ix_nonces_seen": ["seen"]}),
        ("projects", projects, {}),
        ("webhook_deliveries", deliveries, {"ix_webhook_deliveries_task_id": ["task_id"]}),
        ("files", files, {f"ix_files_{key}": [key] for key in ("accesskey", "project_id", "task_id")}),
        ("folders", folders, {"ix_folders_project_id": ["project_id"]}),
        ("tasks", tasks, {"ix_tasks_project_id": ["project_id"], "ix_tasks_queue": QUEUE}),
        ("task_events", events, {"ix_task_events_task_id": ["task_id"]}),
    ]


def upgrade() -> None:
    for name, items, indexes in _tables():
        op.create_table(name, *items)
        for index, columns in indexes.items():
            op.create_index(index, name, columns, unique=False)


def downgrade() -> None:
    for name, _, indexes in reversed(_tables()):
        for index in reversed(indexes):
            op.drop_index(index, table_name=name)
        op.drop_table(name)
