"""The hot point reads on SQLite, run directly on a read-only connection of the calling thread.

Task/Detail and every status poll read a project by its key hash, a task by id or token, its files and its queue
position. Through the async session each of those is several hops to aiosqlite's thread, SQLAlchemy's statement
building and a closing rollback: most of a poll's cost. Here each is one ``sqlite3`` call on a ``mode=ro``
connection kept per thread (WAL lets it read beside the writer), with SQL built once from the tables, and rows
loaded as detached ORM instances, as a closed session leaves them: the callers cannot tell the paths apart.

A read that cannot answer quickly raises ``Fallback`` and the caller takes the async path, which runs off the
event loop: a statement past ``MAX_STEPS`` virtual-machine steps is interrupted (a queue position deep in a large
backlog), and a locked or missing database is never waited for. Every cursor is read to its end, so no read
transaction stays open (it would pin an old snapshot). PostgreSQL has no such path: ``Reads.of`` is None there.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import configure_mappers, make_transient_to_detached

from dreamserve.queue.base import Fallback
from dreamserve.queue.db import QUEUE_BUCKET_BITS, File, Project, Task, TaskEvent
from dreamserve.status import FileRole, TaskStatus

#: Virtual-machine steps a direct statement may take before it is interrupted (a few milliseconds): past that
#: the read goes the async way, off the event loop.
MAX_STEPS = 50_000
#: The triggers that keep ``queue_counts`` (migration e1a2b3c4d5f6): positions are read from it only when all are.
COUNT_TRIGGERS = ("tr_queue_counts_insert", "tr_queue_counts_enter", "tr_queue_counts_leave", "tr_queue_counts_delete")
#: How often (in steps) the budget is checked: a read is interrupted within this many steps past ``MAX_STEPS``.
PROGRESS_EVERY = 1_000


class Loader:
    """Rows of one table as the ORM would load them: each column through its type's result processor, the
    instance detached with its identity, so that it behaves as one a closed session left."""

    def __init__(self, model: type[Task] | type[File] | type[Project] | type[TaskEvent], dialect: Dialect) -> None:
        configure_mappers()  # instances are made without a query, which would have configured them
        table = model.__table__
        assert isinstance(table, Table)
        mapper = model.__mapper__
        self.model = model
        self.columns = ", ".join(f'{table.name}."{column.name}"' for column in table.columns)
        self.keys = [mapper.get_property_by_column(column).key for column in table.columns]
        processors: list[Callable[[Any], Any] | None] = []
        for column in table.columns:
            kind = column.type.dialect_impl(dialect)
            processors.append(kind.result_processor(dialect, None))
        self.processors = processors
        self.manager = mapper.class_manager

    def load(self, row: Sequence[Any]) -> Any:
        instance = self.manager.new_instance()
        values = instance.__dict__
        for key, processor, value in zip(self.keys, self.processors, row, strict=True):
            values[key] = processor(value) if processor is not None else value
        make_transient_to_detached(instance)
        return instance


def ahead_in_level(task: Task, rows: Sequence[tuple[int, float, int, int]]) -> int:
    """The tasks claimed before ``task`` at its priority, from each project's ``(id, last claim, claimable tasks,
    of them below the task's id)``: as ``order.turn_counts`` counts them, each project's tasks on earlier turns,
    and its task on the same turn when it goes first."""
    mine = [(last, below) for project_id, last, _, below in rows if project_id == task.project_id]
    served, turn = (mine[0][0], mine[0][1] + 1) if mine else (0.0, 1)
    ahead = 0
    for project_id, last, total, below in rows:
        ahead += min(total, turn - 1)
        # Its task on this turn goes first if it was served less recently, or as recently with a lower id (its
        # turn-th task is below this one when at least ``turn`` of its tasks are).
        first = last < served or (last == served and below >= turn)
        if project_id != task.project_id and total >= turn and first:
            ahead += 1
    return ahead


class Reads:
    """Direct reads of one SQLite database file; ``Fallback`` when the async path must answer instead."""

    def __init__(self, path: str, dialect: Dialect, max_steps: int = MAX_STEPS, every: int = PROGRESS_EVERY) -> None:
        self.uri = f"file:{quote(path)}?mode=ro"
        self.max_steps, self.every = max_steps, every
        self.local = threading.local()
        self.tasks = Loader(Task, dialect)
        self.files = Loader(File, dialect)
        self.projects = Loader(Project, dialect)
        self.events = Loader(TaskEvent, dialect)
        t, f, p, e = self.tasks.columns, self.files.columns, self.projects.columns, self.events.columns
        self.task_sql = f"SELECT {t} FROM tasks WHERE tasks.id = ?"
        self.own_task_sql = f"SELECT {t} FROM tasks WHERE tasks.id = ? AND tasks.project_id = ?"
        self.token_sql = f"SELECT {t} FROM tasks WHERE tasks.token_digest = ?"
        self.own_token_sql = f"SELECT {t} FROM tasks WHERE tasks.token_digest = ? AND tasks.project_id = ?"
        self.files_sql = f"SELECT {f} FROM files WHERE files.task_id = ? AND files.role IN (%s) ORDER BY files.position"
        self.events_sql = f"SELECT {e} FROM task_events WHERE task_id = ? AND id > ? ORDER BY id"
        self.project_sql = f"SELECT {p} FROM projects WHERE projects.api_key_hash = ? AND projects.revoked = 0"
        bits = QUEUE_BUCKET_BITS
        queued = f"status = '{TaskStatus.QUEUE.value}' AND model = :model AND inputs_ready = 1"
        #: Per project with claimable tasks of the model at the priority: its last claim, how many it has, and how
        #: many of them have an id below the task's (whole buckets below its bucket, then the claim index in it).
        self.level_sql = (
            "SELECT c.project_id, p.last_claimed, sum(c.queued), "
            "sum(CASE WHEN c.bucket < :bucket THEN c.queued ELSE 0 END), "
            f"(SELECT count(*) FROM tasks WHERE {queued} AND priority = :priority AND project_id = c.project_id "
            f"AND id >= :bucket << {bits} AND id < :task) "
            "FROM queue_counts c JOIN projects p ON p.id = c.project_id "
            "WHERE c.model = :model AND c.priority = :priority GROUP BY c.project_id"
        )
        counts = "SELECT coalesce(sum(queued), 0) FROM queue_counts WHERE model = :model"
        self.higher_sql = f"{counts} AND priority > :priority"
        self.all_sql = counts
        names = ", ".join("?" * len(COUNT_TRIGGERS))
        self.triggers_sql = f"SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({names})"

    @classmethod
    def of(cls, sessions: async_sessionmaker[AsyncSession]) -> Reads | None:
        """Direct reads for the database of ``sessions`` when it is a SQLite file; None otherwise."""
        engine = sessions.kw.get("bind")
        url = getattr(engine, "url", None)
        if engine is None or url is None or url.get_backend_name() != "sqlite":
            return None
        if url.database in (None, "", ":memory:"):
            return None
        return cls(url.database, engine.dialect)

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self.local, "connection", None)
        if connection is None:
            try:
                # timeout=0: a locked database is never waited for on the event loop (the async path waits).
                connection = sqlite3.connect(self.uri, uri=True, timeout=0, isolation_level=None)
            except sqlite3.Error as exc:
                raise Fallback(str(exc)) from exc
            # SQLite calls the handler every ``every`` steps of a prepared statement counted over all its
            # runs (the cached statement's counter is never reset): the budget is per read, counted down here.
            connection.set_progress_handler(self._spend, self.every)
            self.local.connection = connection
        return connection

    def _spend(self) -> int:
        self.local.budget -= 1
        return 1 if self.local.budget < 0 else 0  # non-zero interrupts the statement

    def rows(self, sql: str, args: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        """Every row of one statement (read to the end: no read transaction is left open)."""
        connection = self._connection()
        self.local.budget = self.max_steps // self.every
        try:
            return connection.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # interrupted, locked, no such table yet
            raise Fallback(str(exc)) from exc

    def _one(self, loader: Loader, sql: str, args: Sequence[Any]) -> Any:
        found = self.rows(sql, args)
        return loader.load(found[0]) if found else None

    def task(self, task_id: int, project_id: int | None = None) -> Task | None:
        if project_id is None:
            return self._one(self.tasks, self.task_sql, (task_id,))  # type: ignore[no-any-return]
        return self._one(self.tasks, self.own_task_sql, (task_id, project_id))  # type: ignore[no-any-return]

    def task_by_token(self, token_digest: str, project_id: int | None = None) -> Task | None:
        if project_id is None:
            return self._one(self.tasks, self.token_sql, (token_digest,))  # type: ignore[no-any-return]
        return self._one(self.tasks, self.own_token_sql, (token_digest, project_id))  # type: ignore[no-any-return]

    def project(self, key_hash: str) -> Project | None:
        """The unrevoked project of an API key's hash."""
        return self._one(self.projects, self.project_sql, (key_hash,))  # type: ignore[no-any-return]

    def task_files(self, task_id: int, roles: Iterable[FileRole]) -> list[File]:
        wanted = [str(role) for role in roles]
        sql = self.files_sql % ", ".join("?" * len(wanted))
        return [self.files.load(row) for row in self.rows(sql, (task_id, *wanted))]

    def task_events(self, task_id: int, after: int = 0) -> list[TaskEvent]:
        """A task's event log after ``after`` (Replicate's poll shows it as the prediction's logs)."""
        return [self.events.load(row) for row in self.rows(self.events_sql, (task_id, after))]

    def _check_counted(self) -> None:
        """``Fallback`` unless the triggers that keep ``queue_counts`` are all there (a migration that rebuilds
        ``tasks``, as Alembic's batch mode does on SQLite, drops them with the old table); asked until they are."""
        if getattr(self.local, "counted", False):
            return
        found = self.rows(self.triggers_sql, COUNT_TRIGGERS)[0][0]
        if found != len(COUNT_TRIGGERS):
            raise Fallback(f"{found} of the {len(COUNT_TRIGGERS)} queue_counts triggers")
        self.local.counted = True

    def _count(self, sql: str, values: dict[str, Any]) -> int:
        return int(self.rows(sql, values)[0][0])

    def queue_position(self, task: Task) -> int:
        """``order.Positions.queue_position`` from ``queue_counts``: the same figure, whatever the backlog."""
        self._check_counted()
        values: dict[str, Any] = {"model": task.model, "priority": task.priority}
        if task.status != TaskStatus.QUEUE or not task.inputs_ready:
            return self._count(self.all_sql, values)  # its URL inputs are being fetched: every claimable task
        ahead = self._count(self.higher_sql, values)
        values.update(task=task.id, bucket=task.id >> QUEUE_BUCKET_BITS)
        rows = [
            (int(p), float(last), int(total), int(below) + int(within))
            for p, last, total, below, within in self.rows(self.level_sql, values)
        ]
        return ahead + ahead_in_level(task, rows)
