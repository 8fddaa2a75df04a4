"""A Run's rows on SQLite, written in one hop to the connection's thread.

Through the ORM session, creating a task is a dozen awaits, each a hop to aiosqlite's thread and back through a
busy event loop (the turn, the counting UPDATE, two flushes, the commit), with the process's write turn held
across all of them. Here the whole transaction is one function run in the connection's thread: it waits for its
``WriteGate`` turn there, takes the lock (``BEGIN IMMEDIATE``), writes with ``sqlite3`` statements, commits and
hands the turn to the next writer before the event loop hears of it.

The rows are those the session path writes (``tasks.Tasks.create``): each ORM instance is inserted as the ORM's
flush inserts it (the values set, else the column's Python default, else NULL where the ORM names the column as
NULL; every value through its column type's bind processor, so JSON columns hold the same text), the triggers on
``tasks`` fire as they do there, and quotas are counted and refused with the same statements and words
(``quotas.task_refusal``, ``quotas.storage_refusal``). PostgreSQL keeps the session path: ``Writes.of`` is None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import configure_mappers, make_transient_to_detached

from dreamserve.queue.db import BUSY_TIMEOUT_MS, File, Sessions, Task, TaskEvent, WebhookDelivery, WriteGate
from dreamserve.queue.keyring import ServerKey, digest, new_salt
from dreamserve.queue.quotas import Quota, StorageQuota, storage_refusal, task_refusal

T = TypeVar("T")

COUNT_TASK = (
    "UPDATE projects SET unfinished_tasks = unfinished_tasks + 1, unfinished_pixels = unfinished_pixels + ? "
    "WHERE projects.id = ? RETURNING unfinished_tasks, unfinished_pixels"
)
STORED = "SELECT count(files.id), coalesce(sum(CAST(files.size AS BIGINT)), 0) FROM files WHERE files.project_id = ?"


class Inserter:
    """Rows of one table inserted as the ORM's flush inserts a new instance (``persistence._collect_insert_commands``
    with Core's Python defaults); the instance is then detached with its id and every column loaded."""

    def __init__(self, model: type[Task] | type[File] | type[TaskEvent] | type[WebhookDelivery], dialect: Dialect):
        configure_mappers()
        table = model.__table__
        assert isinstance(table, Table)
        mapper = model.__mapper__
        self.table = table.name
        self.keys = [mapper.get_property_by_column(column).key for column in table.columns]
        #: Per column: its name, attribute, whether a None set is a value (JSON's 'null'), its Python default,
        #: whether the ORM names it as NULL when it has no value, and its bind processor.
        self.columns: list[tuple[str, str, bool, Any, bool, Callable[[Any], Any] | None]] = []
        for column, key in zip(table.columns, self.keys, strict=True):
            default = column.default
            if default is not None and not (default.is_scalar or default.is_callable):
                raise TypeError(f"{table.name}.{column.name}: only scalar and callable defaults are written here")
            evaluates_none = bool(column.type.should_evaluate_none)
            as_none = not (column.primary_key or column.server_default or default or evaluates_none)
            processor = column.type.dialect_impl(dialect).bind_processor(dialect)
            self.columns.append((column.name, key, evaluates_none, default, as_none, processor))
        self._sql: dict[tuple[str, ...], str] = {}

    def insert(self, connection: Any, instance: Any) -> int:
        """Insert ``instance`` on the ``sqlite3`` connection; returns its id, set on it with the defaults."""
        names: list[str] = []
        values: list[Any] = []
        state = instance.__dict__
        for name, key, evaluates_none, default, as_none, processor in self.columns:
            value = state.get(key)
            if value is None and not (evaluates_none and key in state):  # no value: the ORM's rules
                if default is not None:
                    value = default.arg(None) if default.is_callable else default.arg
                    setattr(instance, key, value)  # as the flush sets the defaults it used
                elif not as_none:
                    continue  # the primary key, or a server default
            names.append(name)
            values.append(processor(value) if processor is not None else value)
        sql = self._sql.get(tuple(names))
        if sql is None:
            marks = ", ".join("?" * len(names))
            sql = self._sql[tuple(names)] = f"INSERT INTO {self.table} ({', '.join(names)}) VALUES ({marks})"
        row_id = int(connection.execute(sql, values).lastrowid)
        instance.id = row_id
        return row_id

    def loaded(self, instance: Any) -> None:
        """Every column attribute present (None where the row has NULL) and the instance detached with its
        identity, as a closed session leaves the one it inserted."""
        for key in self.keys:
            instance.__dict__.setdefault(key, None)
        make_transient_to_detached(instance)


@dataclass(frozen=True)
class NewTask:
    """What one Run writes: the task (its ``project_id`` and ``work``, images x pixels, counted against ``quota``),
    its stored inputs (checked against ``storage``), a refused callback's failed delivery and the ``task_queue``
    event. Both paths write it: ``Writes.create`` on SQLite, ``tasks.Tasks`` through the session elsewhere."""

    task: Task
    inputs: Sequence[File]
    work: int
    quota: Quota | None
    storage: StorageQuota
    refused: WebhookDelivery | None
    event: TaskEvent


class Writes:
    """The direct writes of one SQLite database, in the turns of its sessions' ``WriteGate``."""

    def __init__(self, engine: AsyncEngine, gate: WriteGate, keys: ServerKey) -> None:
        self.engine, self.gate, self.keys = engine, gate, keys
        dialect = engine.dialect
        self.tasks = Inserter(Task, dialect)
        self.files = Inserter(File, dialect)
        self.events = Inserter(TaskEvent, dialect)
        self.deliveries = Inserter(WebhookDelivery, dialect)
        #: Runs waiting for the next batch, and the task writing batches while there are any.
        self._pending: list[tuple[NewTask, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, sessions: async_sessionmaker[AsyncSession], keys: ServerKey) -> Writes | None:
        """Direct writes for ``sessions`` when they are SQLite's gated ones; None otherwise (the session path)."""
        engine = sessions.kw.get("bind")
        gate = sessions.gate if isinstance(sessions, Sessions) else None
        if gate is None or not isinstance(engine, AsyncEngine):
            return None
        return cls(engine, gate, keys)

    async def create(self, new: NewTask) -> int:
        """Store ``new``; the event's id once it is committed. ``QuotaExceeded`` or ``StorageFull``: nothing stored.

        Runs that arrive while a batch is being written are written together in the next turn, one transaction
        with a savepoint each (group commit): each is checked, written or refused as it would be alone, in
        arrival order, and the turn, the hop and the commit are paid once per batch instead of once per Run."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((new, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches(), name="run-writes")
        try:
            event_id = await done
        except asyncio.CancelledError:
            # Not taken into a batch yet: it is never written. Once taken it is (the caller cancelled after the
            # fact, as a cancel that lands while a commit is on its way).
            self._pending = [(n, d) for n, d in self._pending if d is not done]
            raise
        self.tasks.loaded(new.task)
        for file in new.inputs:
            self.files.loaded(file)
        return event_id

    async def _write_batches(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write_batch(batch)
        except BaseException:  # cancelled (the loop is closing): the Runs still waiting are too
            pending, self._pending = self._pending, []
            for _, done in pending:
                done.cancel()
            raise
        finally:
            self._writer = None

    async def _write_batch(self, batch: list[tuple[NewTask, asyncio.Future[int]]]) -> None:
        try:
            outcomes = await self.transaction(lambda connection: [self._saved(connection, new) for new, _ in batch])
        except asyncio.CancelledError:
            for _, done in batch:
                done.cancel()
            raise
        except Exception as exc:  # the turn or the commit failed: no Run of the batch is stored
            outcomes = [exc] * len(batch)
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue  # its Run was cancelled meanwhile (its task is stored all the same)
            if isinstance(outcome, Exception):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

    def _saved(self, connection: Any, new: NewTask) -> int | Exception:
        """One Run of a batch inside its savepoint: its event's id, or why it was refused (and nothing kept)."""
        connection.execute("SAVEPOINT run")
        try:
            event_id = self._create(connection, new)
        except Exception as exc:
            connection.execute("ROLLBACK TO run")
            connection.execute("RELEASE run")
            return exc
        connection.execute("RELEASE run")
        return event_id

    async def transaction(self, write: Callable[[Any], T]) -> T:
        """``write(sqlite3 connection)`` in one transaction, run in the connection's thread in this process's
        turn; it commits, or rolls back and raises what ``write`` raised."""
        async with self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            ticket = self.gate.issue()
            try:
                # Marked while queued, as the session path does: a rollback of this connection is then sent.
                driver.dreamserve_turn = ticket
                return await driver._execute(_in_turn, self.gate, ticket, driver._conn, write)  # type: ignore[no-any-return]
            finally:
                driver.dreamserve_turn = None
                self.gate.finish(ticket)

    def _create(self, connection: Any, new: NewTask) -> int:
        """In the connection's thread, inside the transaction: the rows of ``tasks.Tasks.create``, in its order."""
        task = new.task
        counted = connection.execute(COUNT_TASK, (new.work, task.project_id)).fetchall()
        refusal: Exception | None = None
        if new.quota is not None and counted:
            refusal = task_refusal(new.quota, counted[0][0], int(counted[0][1]), new.work)
        if refusal is None and new.inputs and new.storage.active:
            files, stored = connection.execute(STORED, (task.project_id,)).fetchall()[0]
            size = sum(f.size for f in new.inputs)
            refusal = storage_refusal(new.storage, files, int(stored), size, len(new.inputs))
        if refusal is not None:
            raise refusal
        task_id = self.tasks.insert(connection, task)
        task.token_digest = digest(self.keys.token(task))
        connection.execute("UPDATE tasks SET token_digest = ? WHERE tasks.id = ?", (task.token_digest, task_id))
        self._add_inputs(connection, task_id, new.inputs)
        if new.refused is not None:
            new.refused.task_id = task_id
            self.deliveries.insert(connection, new.refused)
        new.event.task_id = task_id
        return self.events.insert(connection, new.event)

    def _add_inputs(self, connection: Any, task_id: int, inputs: Sequence[File]) -> None:
        """``files.add_files``: each row with a salt, then the digest of the access key its id and salt derive."""
        for file in inputs:
            file.task_id = task_id
            if file.key_salt is None:
                file.key_salt = new_salt()
            self.files.insert(connection, file)
        for file in inputs:
            file.key_digest = digest(self.keys.accesskey(file))
            connection.execute("UPDATE files SET key_digest = ? WHERE files.id = ?", (file.key_digest, file.id))


def _in_turn(gate: WriteGate, ticket: int, connection: Any, write: Callable[[Any], T]) -> T:
    """In the connection's thread: wait for the turn, take the lock, write, commit, and pass the turn on."""
    try:
        if not gate.wait(ticket, BUSY_TIMEOUT_MS / 1000):
            raise RuntimeError("the write turn ended before it came up")
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = write(connection)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
        return result
    finally:
        gate.release(ticket)
