"""Callback delivery (``callbackUrl``) from the outbox rows that each chosen event writes with it.

Each row stores the event (``start``, ``progress``, ``completed``: ``progress`` and ``start`` chosen with
``callbackEvents``) as a small record of facts: the task's id, status and last step (``facts.Progress``'s dump).
What is POSTed and how it is signed is the task's dialect's ``CallbackFormat`` (Wiro's: the final task object
on ``completed``, the record otherwise; ``x-dreamserve-timestamp`` and ``x-dreamserve-signature`` = HMAC-SHA256
with the project's webhook secret over ``timestamp + "." + body``, which ``signing.verify_webhook`` checks). Any
2xx acknowledges; anything else is retried with exponential backoff until ``webhook_attempts`` is spent. A row is
claimed before it is sent, so API replicas never deliver it twice; the rows are the delivery log.
``WebhookSender`` sends concurrently under a global bound and one per project and receiver host, with a circuit
breaker per project and receiver: one tenant's failing or slow receiver costs nobody else's callbacks to the same
host their turn. One task's deliveries go one at a time, in order.

Every dialect's ``CallbackFormat`` (Wiro's; Replicate's prediction, signed the Standard Webhooks way; fal's) gives
the body of a delivery and the headers that sign it. ``Services`` takes them by dialect name from the API side
(``dialects/mount.py``), so this module imports no dialect; each delivery is drawn by the format of its task's
``TaskJob.dialect``, and the default dialect's (``DEFAULT_FORMAT``) for a dialect without one. Rows, retries, bounds,
fairness and breakers are the same for every format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, Update, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from dreamserve.errors import InvalidRequest
from dreamserve.fetch import post_json
from dreamserve.logs import about
from dreamserve.queue.db import Project, Task, WebhookDelivery
from dreamserve.queue.keyring import ServerKey
from dreamserve.settings import Settings
from dreamserve.status import DeliveryState, Frame, TaskStatus

log = logging.getLogger(__name__)

#: The dialect whose callback format serves a task of a dialect without one (``TaskJob.dialect``'s default).
DEFAULT_FORMAT = "wiro"
#: The states a delivery is still to be sent in.
UNSENT = (DeliveryState.PENDING, DeliveryState.SENDING)
#: (project, receiver) pairs whose failures are remembered at once (the oldest is forgotten first).
MAX_BREAKERS = 10_000


class CallbackEvent(BaseModel):
    """What the outbox stores with a delivery (its ``payload`` column): the event, the task, its status as the
    event left it, and its last step as the API's dialect renders it. Wiro's ``start`` and ``progress`` callbacks
    POST it as it is (``model_dump``: every field, in this order). A refused callbackUrl's row, never sent,
    stores none of it."""

    model_config = ConfigDict(frozen=True)

    event: str = ""
    taskid: str = ""
    status: str = ""
    progress: Any = None


class CallbackFormat(Protocol):
    """How one dialect's callbacks look: what a delivery POSTs and the headers that sign it."""

    async def body(self, task_id: int, event: str, payload: CallbackEvent) -> Any:
        """The JSON value of a delivery of ``event`` (``start``, ``progress``, ``completed``); ``payload`` is the
        small record the outbox stored with it (``Outbox.event``: the step in it a ``facts.Progress`` dump, or what
        an earlier version stored)."""
        ...

    def headers(self, delivery_id: int, event: str, timestamp: str, body: bytes, secret: str) -> dict[str, str]:
        """Headers for ``body``, signed with the project's webhook ``secret``; ``timestamp`` is unix seconds."""
        ...


class _Flight(NamedTuple):
    """Whose a POST in flight is: the bounds count them by project and receiver host."""

    project_id: int | None
    host: str
    task_id: int


#: What a breaker judges: one project's callbacks to one receiver (host and port).
_Receiver = tuple[int | None, str]


@dataclass
class _Breaker:
    """Consecutive failures of one project's callbacks to one receiver, and until when they are left alone."""

    failures: int = 0
    open_until: float = 0.0
    #: Opened this many times in a row (the pause doubles each time).
    trips: int = 0


class WebhookSender:
    """Sends due callbacks concurrently: at most ``webhook_concurrency`` in flight from this process and
    ``webhook_per_host`` of one project to one receiver host, each under ``webhook_timeout_seconds``.

    ``send_due`` (the webhooks loop, every 0.5 s) never waits for a delivery: it claims what it may start and
    leaves each POST to a task of its own, so a slow receiver costs its own deliveries time and nobody else's.
    The slots are per project and host, so a tenant whose receiver hangs fills only its own; the global cap bounds
    what all tenants together hold, and the due rows are taken round-robin across projects, so one project's
    backlog cannot fill the list another's rows are picked from. A project's receiver (host and port) that failed
    ``webhook_breaker_failures`` attempts in a row is skipped for ``webhook_breaker_seconds`` (then one more
    failure skips it again, twice as long): its due rows are postponed, without spending an attempt; other
    projects' rows to the same receiver are not (a tenant's callback URL can make any host fail for it).
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        keys: ServerKey,
        formats: Mapping[str, CallbackFormat] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.keys = keys
        #: Callback formats by dialect name; ``DEFAULT_FORMAT``'s for a task of any other.
        self.formats: dict[str, CallbackFormat] = dict(formats or {})
        #: Delivery id -> whose it is, for the POSTs in flight.
        self._inflight: dict[int, _Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._breakers: dict[_Receiver, _Breaker] = {}

    def _per_host(self, project_id: int | None, host: str) -> int:
        return sum(1 for flight in self._inflight.values() if flight.host == host and flight.project_id == project_id)

    async def send_due(self) -> int:
        """Start every due delivery the bounds allow; returns how many were started."""
        settings = self.settings
        now = time.time()
        async with self.sessions() as session:
            due = (await session.execute(_due_query(now, 4 * settings.webhook_concurrency))).all()
        started = 0
        # One delivery per task at a time, in id order, so a task's start, progress and completed arrive in order.
        busy = {flight.task_id for flight in self._inflight.values()}
        for delivery_id, task_id, project_id, url, state, next_attempt in due:
            if delivery_id in self._inflight or task_id in busy:
                continue
            busy.add(task_id)  # started now or not, its later rows wait for this one
            parts = urlsplit(url)
            # Concurrency is bounded per host; the breaker judges one receiver (host and port); both per project.
            host, receiver = (parts.hostname or "").lower(), (project_id, parts.netloc.lower())
            breaker = self._breakers.get(receiver)
            if breaker is not None and breaker.open_until > now:
                # Left alone for now: its rows wait until the pause ends, so they do not crowd the due list.
                await _postpone(self.sessions, delivery_id, state, next_attempt, breaker.open_until)
                continue
            if (
                len(self._inflight) >= settings.webhook_concurrency
                or self._per_host(project_id, host) >= settings.webhook_per_host
            ):
                continue  # still due: the next round takes it
            delivery = await _claim(
                self.sessions, delivery_id, state, next_attempt, settings.webhook_timeout_seconds + 5
            )
            if delivery is None:
                continue
            self._inflight[delivery_id] = _Flight(project_id, host, task_id)
            task = asyncio.create_task(self._send(delivery, receiver), name=f"webhook {delivery_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _send(self, delivery: WebhookDelivery, receiver: _Receiver) -> None:
        try:
            ok = await _attempt(self.sessions, self.settings, self.keys, self.formats, delivery)
            self._judge(receiver, ok)
        except Exception:
            log.exception(
                "callback %s: delivery bookkeeping failed; it is retried when its claim runs out", delivery.id
            )
        finally:
            self._inflight.pop(delivery.id, None)

    def _judge(self, receiver: _Receiver, ok: bool) -> None:
        if ok:
            self._breakers.pop(receiver, None)
            return
        breaker = self._breakers.get(receiver)
        if breaker is None:
            if len(self._breakers) >= MAX_BREAKERS:  # bounded memory, whatever receivers tenants name
                self._breakers.pop(next(iter(self._breakers)))
            breaker = self._breakers[receiver] = _Breaker()
        breaker.failures += 1
        # Once it has tripped, one more failure (the first try after the pause) trips it again.
        if breaker.failures >= self.settings.webhook_breaker_failures or breaker.trips:
            base = self.settings.webhook_breaker_seconds
            pause = min(10 * base, base * 2**breaker.trips)
            breaker.open_until, breaker.failures = time.time() + pause, 0
            breaker.trips += 1
            log.warning("project %s: callbacks to %s keep failing; pausing them for %.0f s", *receiver, pause)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the outbox: rows written in the transaction of the event they report --------------------------------------

#: The events a receiver can choose with ``callbackEvents``, by the name it chooses them with.
HOOKS: dict[str, str] = {
    TaskStatus.START: "start",
    Frame.OUTPUT: "progress",
    TaskStatus.POSTPROCESS_END: "completed",
    TaskStatus.CANCEL: "completed",
}
#: Progress callbacks are throttled to one a second per task (steps can be much faster).
PROGRESS_WEBHOOK_SECONDS = 1.0


class Outbox:
    """Writes the deliveries of a task's events as outbox rows, inside the store's transaction of each event
    (``TaskStore`` calls it, passed in by ``Services``): a delivery exists exactly when its event does. Its
    payload holds facts (the task's last step as ``Progress``'s dump); the task's dialect renders them when the
    delivery is sent (``CallbackFormat.body``)."""

    async def event(self, session: AsyncSession, task: Task, event_type: str, now: float) -> None:
        """The delivery an event of ``task`` (as it stands after the event) owes its receiver, if any."""
        hook = HOOKS.get(event_type)
        if hook is None or not task.callback_url or hook not in (task.callback_events or ["completed"]):
            return
        if hook == "progress" and not await _progress_due(session, task.id, now):
            return
        step = None if task.progress is None else task.progress.dump()
        payload = CallbackEvent(event=hook, taskid=str(task.id), status=task.status, progress=step)
        delivery = WebhookDelivery(
            task_id=task.id,
            url=task.callback_url,
            event=hook,
            payload=payload.model_dump(mode="json"),
            next_attempt=now,
            created=now,
        )
        session.add(delivery)

    def refused_row(self, task_id: int, url: str, reason: str, now: float) -> WebhookDelivery:
        """A callbackUrl that is never called (not a URL, say): the failed delivery, with the reason, that the
        task's creation stores."""
        return WebhookDelivery(
            task_id=task_id, url=url, state=DeliveryState.FAILED, last_error=reason, next_attempt=now, created=now
        )


async def _progress_due(session: AsyncSession, task_id: int, now: float) -> bool:
    query = select(func.max(WebhookDelivery.created)).where(
        WebhookDelivery.task_id == task_id, WebhookDelivery.event == "progress"
    )
    last = (await session.execute(query)).scalar_one_or_none()
    return last is None or now - last >= PROGRESS_WEBHOOK_SECONDS


def _due_query(now: float, limit: int) -> Select[int, int, int | None, str, str, float]:
    """Due rows, round-robin across projects: each project's oldest first, then each one's second, and so on."""
    # A task's oldest unfinished row goes first: a later row waits while an earlier one awaits its retry.
    earlier = aliased(WebhookDelivery)
    oldest = (
        select(func.min(earlier.id))
        .where(earlier.task_id == WebhookDelivery.task_id, earlier.state.in_(UNSENT))
        .scalar_subquery()
    )
    turn = func.row_number().over(partition_by=Task.project_id, order_by=WebhookDelivery.id).label("turn")
    due = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.task_id,
            Task.project_id,
            WebhookDelivery.url,
            WebhookDelivery.state,
            WebhookDelivery.next_attempt,
            turn,
        )
        .outerjoin(Task, Task.id == WebhookDelivery.task_id)
        # A row left "sending" by a replica that died is due again once its claim ran out.
        .where(WebhookDelivery.state.in_(UNSENT))
        .where(WebhookDelivery.next_attempt <= now, WebhookDelivery.id == oldest)
        .subquery()
    )
    columns = (due.c.id, due.c.task_id, due.c.project_id, due.c.url, due.c.state, due.c.next_attempt)
    return select(*columns).order_by(due.c.turn, due.c.id).limit(limit)


def _as_seen(delivery_id: int, state: str, next_attempt: float) -> Update:
    """An update of a delivery row that changes nothing if another replica moved it since it was read."""
    return update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.state == state,
        WebhookDelivery.next_attempt == next_attempt,
    )


async def _postpone(
    sessions: async_sessionmaker[AsyncSession], delivery_id: int, state: str, next_attempt: float, until: float
) -> None:
    stmt = _as_seen(delivery_id, state, next_attempt).values(
        next_attempt=until, last_error="Receiver paused: its last attempts failed (circuit breaker)."
    )
    async with sessions.begin() as session:
        await session.execute(stmt)


async def _claim(
    sessions: async_sessionmaker[AsyncSession], delivery_id: int, state: str, next_attempt: float, hold: float
) -> WebhookDelivery | None:
    stmt = (
        _as_seen(delivery_id, state, next_attempt)
        .values(state=DeliveryState.SENDING, next_attempt=time.time() + hold)
        .returning(WebhookDelivery.id)
    )
    async with sessions.begin() as session:
        if (await session.execute(stmt)).scalar_one_or_none() is None:
            return None
        return await session.get(WebhookDelivery, delivery_id)


async def _body(
    sessions: async_sessionmaker[AsyncSession],
    keys: ServerKey,
    formats: Mapping[str, CallbackFormat],
    delivery: WebhookDelivery,
) -> tuple[bytes, str, CallbackFormat]:
    """The delivery's body, its project's webhook secret, and the format of its task's dialect."""
    async with sessions() as session:
        query = (
            select(Project.id, Project.webhook_secret_sealed, Task.job)
            .join(Task, Task.project_id == Project.id)
            .where(Task.id == delivery.task_id)
        )
        row = (await session.execute(query)).one_or_none()
    secret = keys.webhook_secret(row.id, row.webhook_secret_sealed) if row is not None else ""
    dialect = str((row.job or {}).get("dialect", DEFAULT_FORMAT)) if row is not None else DEFAULT_FORMAT
    shape = formats.get(dialect) or formats.get(DEFAULT_FORMAT)
    if shape is None:  # a process built without the API's formats (they are registered by dialects/mount.py)
        raise LookupError(f"no callback format for dialect {dialect!r} nor {DEFAULT_FORMAT!r}")
    payload = await shape.body(delivery.task_id, delivery.event, CallbackEvent.model_validate(delivery.payload))
    return json.dumps(payload).encode(), secret, shape


async def _attempt(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    keys: ServerKey,
    formats: Mapping[str, CallbackFormat],
    delivery: WebhookDelivery,
) -> bool:
    """One POST and its bookkeeping; True when the receiver acknowledged it."""
    status: int | None = None
    error = ""
    try:
        body, secret, shape = await _body(sessions, keys, formats, delivery)
        stamp = str(int(time.time()))
        headers = shape.headers(delivery.id, delivery.event, stamp, body, secret)
        status = await post_json(
            delivery.url,
            body,
            headers=headers,
            timeout=settings.webhook_timeout_seconds,
            allow_private=settings.fetch_allow_private,
            allow_hosts=settings.callback_allow_hosts,
        )
    except InvalidRequest as exc:
        error = exc.message
    except Exception as exc:  # a receiver that is down or slow is retried, never fatal
        log.warning("callback delivery %s for task %s failed", delivery.id, delivery.task_id, exc_info=exc)
        error = f"Delivery failed ({type(exc).__name__}); the server log has the details."
    attempts = delivery.attempts + 1
    ok = status is not None and 200 <= status < 300
    async with sessions.begin() as session:
        row = await session.get(WebhookDelivery, delivery.id)
        if row is None:
            return ok
        row.attempts, row.last_status, row.last_error = attempts, status, error
        if ok:
            row.state, row.delivered = DeliveryState.DELIVERED, time.time()
        elif attempts >= settings.webhook_attempts:
            row.state = DeliveryState.FAILED
            # %r: the URL is the client's text; quoted, it cannot forge log lines.
            log.warning("callback to %r failed after %d attempts", row.url, attempts, extra=about(row.task_id))
        else:
            row.state = DeliveryState.PENDING
            row.next_attempt = time.time() + settings.webhook_backoff_seconds * 2 ** (attempts - 1)
    return ok


async def delivery_log(sessions: async_sessionmaker[AsyncSession], task_id: int) -> list[dict[str, Any]]:
    query = select(WebhookDelivery).where(WebhookDelivery.task_id == task_id).order_by(WebhookDelivery.id)
    async with sessions() as session:
        rows = (await session.execute(query)).scalars()
        return [
            {
                "id": str(row.id),
                "event": row.event,
                "url": row.url,
                "state": row.state,
                "attempts": str(row.attempts),
                "laststatus": str(row.last_status or ""),
                "lasterror": row.last_error,
                "createtime": str(int(row.created)),
                "deliveredtime": str(int(row.delivered or 0)),
            }
            for row in rows
        ]
