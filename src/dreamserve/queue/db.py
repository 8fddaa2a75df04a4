"""The SQL schema and engine factory. The ``tasks`` table is the queue (see ``store.py``).

Times are unix seconds as floats (UTC by construction); the wire layer renders them as Wiro's
integer strings. Types are portable so the same schema runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    false,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from dreamserve.facts import FileMeta, Progress, Record, TaskDetails
from dreamserve.jobs import TaskJob
from dreamserve.status import DeliveryState, FileRole

R = TypeVar("R", bound=Record)
E = TypeVar("E", bound=StrEnum)


class RecordJSON(TypeDecorator[R], Generic[R]):
    """A JSON column that holds one ``facts`` record: stored as its dump, read back (rows of earlier versions
    included) as the record."""

    impl = JSON
    cache_ok = True

    def __init__(self, record: type[R]) -> None:
        super().__init__()
        self.record = record

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.record.read(value).dump()

    def process_result_value(self, value: Any, dialect: Dialect) -> R | None:
        return None if value is None else self.record.read(value)


class StrEnumColumn(TypeDecorator[E], Generic[E]):
    """A string column of one ``StrEnum``: the stored strings are the members' values, read back as members."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    #: sha256 of the API key: the key itself is never stored.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_prefix: Mapped[str] = mapped_column(String(12))
    #: The secret, sealed with a pad derived from the API key (see ``projects.py``).
    secret_sealed: Mapped[str | None] = mapped_column(String(256), nullable=True)
    signature_required: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Key that signs callback deliveries, sealed with the server secret (``keyring.ServerKey``): the server must
    #: sign with it, so it cannot be sealed with the API key as the API secret is.
    webhook_secret_sealed: Mapped[str] = mapped_column(String(160), default="")
    #: Legacy: the clear webhook secret of rows made before sealing; sealed and emptied at start-up.
    webhook_secret: Mapped[str] = mapped_column(String(64), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[float] = mapped_column(Float)
    #: Highest priority the project's requests get (higher asks are clamped); NULL = ``Settings.max_priority``.
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: When a worker last claimed one of its tasks: the claim serves the least recently served project first.
    last_claimed: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    #: The project's unfinished tasks and their work (images x width x height), kept by the transactions that
    #: create and end tasks (``quotas.py``): a Run's quota check reads them, never a sum over the backlog.
    unfinished_tasks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    unfinished_pixels: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # Claims, batches and queue positions are seeks and ranges of these (store.py), never a ranking of the queue.
        Index("ix_tasks_claim", "status", "model", "inputs_ready", "priority", "project_id", "id"),
        Index(
            "ix_tasks_shape",
            *("status", "model", "inputs_ready", "has_inputs", "width", "height", "priority", "project_id", "id"),
        ),
        Index("ix_tasks_project_status", "project_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    #: Wiro's ``socketaccesstoken`` (also the ``tasktoken`` of Task/Detail and of the socket) is derived from the
    #: server secret, the id and this salt (``keyring.ServerKey.token``); only its sha256 is stored, for lookups.
    token_salt: Mapped[str | None] = mapped_column(String(32), nullable=True)
    token_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)
    #: Legacy: the clear token of rows made before tokens were derived; sealed into ``token_sealed`` and emptied
    #: at start-up (``queue/sealing.py``), NULL for newer rows.
    token: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    #: A legacy row's token sealed with the server secret, so that it keeps working; NULL for newer rows.
    token_sealed: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: ``owner/model`` as served, lower case.
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(40))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: Legacy: the echo of the request stored by earlier versions (their uploads as ``dreamserve:input/N``
    #: markers), shown for those rows; newer rows store ``{}`` and Task/Detail renders their job instead.
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: What the worker needs: the dump of a ``jobs.TaskJob``, read back with ``read_job``.
    job: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The job's shape as columns, so that a claim of same-shape tasks and the quota sums are one SQL statement.
    width: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    height: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    num_images: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: Any reference images: such a task runs alone.
    has_inputs: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Every input is in the blob store (URL inputs fetched by ``preprocess.py``): only such a task can be claimed.
    inputs_ready: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    #: Lease of the preprocess loop fetching the task's URL inputs (another replica leaves it alone until then).
    inputs_lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    callback_url: Mapped[str] = mapped_column(Text, default="")
    #: Which events are POSTed to ``callback_url``: any of "start", "progress", "completed".
    callback_events: Mapped[list[Any]] = mapped_column(JSON, default=list)
    pexit: Mapped[str] = mapped_column(String(16), default="")
    debugoutput: Mapped[str] = mapped_column(Text, default="")
    debugerror: Mapped[str] = mapped_column(Text, default="")
    #: Stage timings, generation method, seeds (``facts.TaskDetails``): our additions to the task object.
    details: Mapped[TaskDetails] = mapped_column(RecordJSON(TaskDetails), default=TaskDetails)
    #: The latest step, for clients that poll Task/Detail instead of following the socket.
    progress: Mapped[Progress | None] = mapped_column(RecordJSON(Progress), nullable=True)

    createtime: Mapped[float] = mapped_column(Float)
    accepttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    preprocessstarttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    preprocessendtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    assigntime: Mapped[float | None] = mapped_column(Float, nullable=True)
    starttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    endtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    postprocessstarttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    postprocessendtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    canceltime: Mapped[float | None] = mapped_column(Float, nullable=True)

    #: Lease of the worker running the task; expired leases are reaped (``store.reap``).
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: "" none, "cancel" (stop at the next step), "kill" (terminate the model process).
    stop_requested: Mapped[str] = mapped_column(String(16), default="")
    #: When a dispatcher sent the task to a worker queue (Celery mode); NULL = still to send.
    dispatched_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    def read_job(self) -> TaskJob:
        """The stored job, validated (rows in the older shape included): ``pydantic.ValidationError`` if it is none."""
        return TaskJob.load(self.job)

    @validates("details")
    def _details(self, _key: str, value: Any) -> TaskDetails:
        return TaskDetails.read(value)

    @validates("progress")
    def _progress(self, _key: str, value: Any) -> Progress | None:
        return None if value is None else Progress.read(value)


class QueueCount(Base):
    """How many claimable tasks (queued, inputs stored) a project has of one model at one priority, per bucket of
    2**``QUEUE_BUCKET_BITS`` consecutive task ids: a queue position is then a sum over buckets and a count inside one,
    whatever the backlog (``reads.py``). Kept exact by triggers on ``tasks`` in every writer's transaction, on
    SQLite only (migration e1a2b3c4d5f6): PostgreSQL leaves it empty and counts positions on the claim index."""

    __tablename__ = "queue_counts"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``tasks.id >> QUEUE_BUCKET_BITS``.
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    queued: Mapped[int] = mapped_column(Integer)


#: ``queue_counts`` buckets hold 2**8 task ids: a position counts at most that many index entries, plus one row
#: per bucket of its level (sqrt(100,000) is about 316).
QUEUE_BUCKET_BITS = 8


class TaskEvent(Base):
    """The event log: every socket frame of a task, in order, so late clients can replay it."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    message: Mapped[Any] = mapped_column(JSON, nullable=True)
    created: Mapped[float] = mapped_column(Float)


class Folder(Base):
    __tablename__ = "folders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[float] = mapped_column(Float)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("accesskey", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    folder_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    role: Mapped[FileRole] = mapped_column(StrEnumColumn(FileRole, 16))
    #: Position among the task's inputs or outputs.
    position: Mapped[int] = mapped_column(Integer, default=0)
    name: Mapped[str] = mapped_column(String(255))
    contenttype: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    #: The unguessable capability in the file's URL (holding it is enough to read the file) is derived from the
    #: server secret, the id and this salt (``keyring.ServerKey.accesskey``); only its sha256 is stored.
    key_salt: Mapped[str | None] = mapped_column(String(32), nullable=True)
    key_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: Legacy: the clear access key of rows made before keys were derived; sealed into ``accesskey_sealed`` and
    #: emptied at start-up (``queue/sealing.py``), NULL for newer rows.
    accesskey: Mapped[str | None] = mapped_column(String(80), index=True, nullable=True)
    #: A legacy row's access key sealed with the server secret, so that its URL keeps working; NULL for newer rows.
    accesskey_sealed: Mapped[str | None] = mapped_column(String(192), nullable=True)
    #: Key in the blob store (a random folder, unrelated to the access key); indexed for the orphan sweep.
    blob_key: Mapped[str] = mapped_column(String(400), index=True)
    #: What is known of its image (``facts.FileMeta``: width, height, an output's seed, a fetched input's URL).
    meta: Mapped[FileMeta] = mapped_column(RecordJSON(FileMeta), default=FileMeta)
    created: Mapped[float] = mapped_column(Float)

    @validates("meta")
    def _meta(self, _key: str, value: Any) -> FileMeta:
        return FileMeta.read(value)

    @validates("role")
    def _role(self, _key: str, value: Any) -> FileRole:
        return FileRole(value)


class Nonce(Base):
    __tablename__ = "nonces"

    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen: Mapped[float] = mapped_column(Float, index=True)


class WebhookDelivery(Base):
    """Outbox of callback deliveries, written in the same transaction as the terminal status."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(Integer, index=True)
    url: Mapped[str] = mapped_column(Text)
    #: "start", "progress" or "completed".
    event: Mapped[str] = mapped_column(String(16), default="completed")
    #: What was true when the event happened (progress); completed deliveries send the final task object.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[DeliveryState] = mapped_column(StrEnumColumn(DeliveryState, 16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float)
    delivered: Mapped[float | None] = mapped_column(Float, nullable=True)

    @validates("state")
    def _state(self, _key: str, value: Any) -> DeliveryState:
        return DeliveryState(value)


#: How long a SQLite writer waits for the lock held by another process, or for its turn in its own (``WriteGate``).
BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, pool_size: int) -> AsyncEngine:
    """An engine whose pool keeps up to ``pool_size`` connections and opens no more (``max_overflow=0``).
    Only a server's connections can drop, so only they are pinged before use."""
    sqlite = url.startswith("sqlite")
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=not sqlite)
    if sqlite:
        # WAL lets the API read while a worker writes. Within a process, write transactions queue on the
        # sessions' gate (``Sessions``); busy_timeout is for the writers of other processes (a GPU worker, the CLI).
        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        # A rollback is a hop to the connection's thread, and a session makes two (its close, then the pool's
        # reset): reads run outside any transaction and a committed write has nothing left, so only a connection
        # with a transaction open is rolled back.
        dialect = engine.sync_engine.dialect
        rollback = dialect.do_rollback

        def _rollback_if_open(dbapi_conn: Any) -> None:
            driver: Any = getattr(dbapi_conn, "driver_connection", None)
            try:
                idle = not driver.in_transaction and getattr(driver, "dreamserve_turn", None) is None
            except (AttributeError, ValueError):  # no driver, or its connection closed: the driver's own rollback
                idle = False
            if not idle:
                rollback(dbapi_conn)

        dialect.do_rollback = _rollback_if_open  # type: ignore[method-assign,assignment]
    return engine


class Lane(enum.IntEnum):
    """Whose write transaction waits for its turn, first served first (``WriteGate``): a worker's claim (a queued
    task and an idle GPU wait for it), then the rest. (A lane for the workers' records of running work too made
    the fleet bench's dispatch faster but its Runs 30 % slower: the one writer's time only moved.)"""

    CLAIM = 0
    OTHER = 1


class WriteGate:
    """The turns of one process's write transactions on one SQLite database: in arrival order within a ``Lane``,
    and the lanes in order.

    A turn is taken on the event loop (``issue``, in arrival order) and waited for in the connection's own thread
    (``wait``), which then begins the transaction there: the writer next in line is already in its thread with
    its ``BEGIN IMMEDIATE`` due when the one before it ends (``finish``), so a hand-over costs no turn of a busy
    event loop (an ``asyncio.Lock`` held across the transaction's statements made the loop's reads its writers'
    bottleneck). SQLite's own busy handler polls instead, and with many writers some waited out busy_timeout.
    With one FIFO line a fleet's claims waited behind 10-20 Runs and the workers' records (100-500 ms a turn)."""

    def __init__(self) -> None:
        self._turns = threading.Condition()
        self._issued = 0
        #: The ticket whose turn it is (None: nobody's), and those waiting: (lane, ticket), a heap.
        self._granted: int | None = None
        self._waiting: list[tuple[int, int]] = []
        #: The task holding each turn: a write transaction opened inside another of the same task would wait for
        #: itself, so it is refused instead.
        self._holders: dict[int, asyncio.Task[Any] | None] = {}

    def issue(self, lane: Lane = Lane.OTHER) -> int:
        me = asyncio.current_task()
        if me is not None and me in self._holders.values():
            raise RuntimeError("a write transaction was opened inside another one of the same task")
        with self._turns:
            ticket = self._issued
            self._issued += 1
            if self._granted is None:
                self._granted = ticket
            else:
                heapq.heappush(self._waiting, (lane, ticket))
        self._holders[ticket] = me
        return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """In the connection's thread: block until ``ticket``'s turn. Past ``timeout`` (the busy_timeout: a turn
        held that long is a writer stuck, say waiting for a connection that the writers queued behind it hold)
        ``TimeoutError``; its ``finish`` then takes it out of the line."""
        with self._turns:
            if not self._turns.wait_for(lambda: self._granted == ticket, timeout):
                raise TimeoutError(f"no turn to write to the database in {timeout:.0f} s (a writer holds it)")
            return True

    def finish(self, ticket: int) -> None:
        self._holders.pop(ticket, None)
        self.release(ticket)

    def release(self, ticket: int) -> None:
        """The turn passes on (any thread: a writer that commits in the connection's thread hands it over there,
        ``queue/writes.py``); ``finish`` on the event loop afterwards is then a no-op but for the holder."""
        with self._turns:
            if self._granted == ticket:
                self._granted = heapq.heappop(self._waiting)[1] if self._waiting else None
            else:  # ended before its turn came up (it timed out): out of the line
                self._waiting = [entry for entry in self._waiting if entry[1] != ticket]
                heapq.heapify(self._waiting)
            self._turns.notify_all()


def _begin_in_turn(gate: WriteGate, ticket: int, connection: Any) -> None:
    """Run in the connection's thread: wait for the turn, then take SQLite's write lock up front."""
    if gate.wait(ticket, BUSY_TIMEOUT_MS / 1000):
        connection.execute("BEGIN IMMEDIATE")


class Sessions(async_sessionmaker[AsyncSession]):
    """The sessions of one database: ``sessions()`` for reads, ``sessions.begin()`` for a write transaction.

    SQLite has one writer at a time. Concurrent write transactions of one process raced for the file lock, each
    connection polling for it in SQLite's busy handler, and under load some waited past busy_timeout (``database
    is locked``, a 5xx), so on SQLite each write transaction takes a turn of the process's ``WriteGate`` in
    arrival order and takes the lock up front (``BEGIN IMMEDIATE``, which waits out other processes' writers
    for the busy_timeout)."""

    gate: WriteGate | None = None

    def begin(self, lane: Lane = Lane.OTHER) -> AbstractAsyncContextManager[AsyncSession]:  # type: ignore[override]
        """A write transaction, whose turn comes in ``lane``."""
        if self.gate is None:
            return super().begin()
        return self._gated(self.gate, lane)

    @contextlib.asynccontextmanager
    async def _gated(self, gate: WriteGate, lane: Lane) -> AsyncIterator[AsyncSession]:
        ticket: int | None = None
        driver: Any = None
        try:
            async with async_sessionmaker.begin(self) as session:
                raw = await (await session.connection()).get_raw_connection()
                driver = raw.driver_connection
                ticket = gate.issue(lane)
                # Marked while the BEGIN is queued: a rollback of this session (a cancel while it waits for its
                # turn) is then sent too, behind the BEGIN in the connection's queue, whether or not it has run.
                driver.dreamserve_turn = ticket
                await driver._execute(_begin_in_turn, gate, ticket, driver._conn)
                driver.dreamserve_turn = None
                yield session
        finally:
            if driver is not None:
                driver.dreamserve_turn = None
            if ticket is not None:
                gate.finish(ticket)


def begin_in(sessions: async_sessionmaker[AsyncSession], lane: Lane) -> AbstractAsyncContextManager[AsyncSession]:
    """A write transaction whose turn comes in ``lane`` (``WriteGate``; any other sessionmaker: a plain one)."""
    return sessions.begin(lane) if isinstance(sessions, Sessions) else sessions.begin()


def make_sessionmaker(engine: AsyncEngine) -> Sessions:
    sessions = Sessions(engine, expire_on_commit=False)
    if engine.dialect.name == "sqlite":
        sessions.gate = WriteGate()
    return sessions
