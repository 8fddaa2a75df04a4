"""What every part of the task store shares: its sessions, hub, keyring, blob store, outbox and storage caps.

The store's parts (``tasks``, ``transitions``, ``claims``, ``leases``, ``inputs``, ``order``, ``files``,
``eventlog``) are mixins of ``StoreBase``; ``store.TaskStore`` is all of them. The blob store and the outbox are
tiers above the queue, passed in, and named here by what the store needs of them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.queue.db import Task, WebhookDelivery
from dreamserve.queue.events import Hub
from dreamserve.queue.keyring import ServerKey
from dreamserve.queue.quotas import StorageQuota
from dreamserve.queue.writes import Writes

if TYPE_CHECKING:
    from dreamserve.queue.reads import Reads

#: The store's logger, named as before it was split in parts (log filters name it).
log = logging.getLogger("dreamserve.queue.store")


class Blobs(Protocol):
    """What the store needs of ``blobs.BlobStore`` (a tier above it, passed in): deleting a task's files."""

    def delete(self, key: str) -> None: ...


class Outbox(Protocol):
    """What the store needs of ``webhooks.Outbox`` (a tier above it, passed in): the callback rows an event owes,
    written in the event's transaction."""

    async def event(self, session: AsyncSession, task: Task, event_type: str, now: float) -> None: ...

    def refused_row(self, task_id: int, url: str, reason: str, now: float) -> WebhookDelivery: ...


class Fallback(Exception):
    """A direct read (``reads.Reads``) gave up (too slow, locked, no database yet): take the async path."""


class Unanswered(enum.Enum):
    """What ``direct`` returns when the async path must answer (a found nothing is ``None``, an answer)."""

    UNANSWERED = enum.auto()


UNANSWERED = Unanswered.UNANSWERED
R = TypeVar("R")
T = TypeVar("T")


def direct(reads: R | None, read: Callable[[R], T]) -> T | Literal[Unanswered.UNANSWERED]:
    """``read`` made on the direct reads; ``UNANSWERED`` when there are none (PostgreSQL) or it gave up
    (``Fallback``), and the caller takes its session."""
    if reads is None:
        return UNANSWERED
    try:
        return read(reads)
    except Fallback:
        return UNANSWERED


class StoreBase:
    """The state every part of the store reads; each part adds the methods of its concern."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        hub: Hub,
        keys: ServerKey,
        blobs: Blobs,
        outbox: Outbox,
        storage: StorageQuota | None = None,
        reads: Reads | None = None,
    ) -> None:
        self.sessions = sessions
        #: The hot point reads taken directly on SQLite (``reads.py``); None: every read is a session's.
        self.reads = reads
        #: A Run's rows written in one hop on SQLite (``writes.py``); None: the session path (PostgreSQL).
        self.writes = Writes.of(sessions, keys)
        self.hub = hub
        self.keys = keys
        #: Where the bytes of the task files live: inputs of failed and cancelled tasks are deleted at their end.
        self.blobs = blobs
        self.outbox = outbox
        #: What a project may store: Run's uploaded inputs are counted against it as the task is created.
        self.storage = storage or StorageQuota()

    async def _delete_blobs(self, keys: Sequence[str]) -> None:
        # Rows first, then bytes: a crash in between leaves unreferenced bytes, never a row without its file.
        for key in keys:
            try:
                await asyncio.to_thread(self.blobs.delete, key)
            except Exception:
                log.exception("could not delete blob %s", key)
