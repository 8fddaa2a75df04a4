"""The Celery app, the dispatcher used by API replicas, and the task body run by GPU workers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from celery import Celery

from dreamserve.settings import Settings

TASK_NAME = "dreamserve.run"
#: Set by ``worker.run_worker`` in a GPU worker process: the event loop and the services it drives.
RUNTIME: dict[str, Any] = {}


def queue_name(model: str) -> str:
    return "gpu." + model.replace("/", ".")


def make_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise ValueError("dispatch='celery' needs redis_url (the broker), e.g. redis://127.0.0.1:6379/0")
    app = Celery("dreamserve", broker=settings.redis_url)
    app.conf.update(
        # Ack on start: a lost worker's task is recovered by our lease reaper, not redelivered by the broker.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Redis emulates priorities with one list per level; 0 is served first.
        broker_transport_options={"priority_steps": list(range(10)), "queue_order_strategy": "priority"},
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME)(run_task)
    return app


def celery_dispatcher(settings: Settings) -> Callable[[int, str, int], Awaitable[None]]:
    app = make_celery(settings)

    async def dispatch(task_id: int, model: str, priority: int) -> None:
        # Our priorities are 0-9 with 9 first; Redis serves 0 first.
        await asyncio.to_thread(
            app.send_task, TASK_NAME, args=[task_id, model], queue=queue_name(model), priority=9 - priority
        )

    return dispatch


def run_task(task_id: int, model: str) -> bool:
    """Celery task body, in a GPU worker: a turn of ``model``'s queue for its supervisor (``Supervisor.run_one``:
    the next task in claim order and its batch, not necessarily ``task_id``), waited for."""
    loop: asyncio.AbstractEventLoop = RUNTIME["loop"]
    supervisors = [s for s in RUNTIME["services"].supervisors if s.slug == model]
    if not supervisors:
        raise RuntimeError(f"this worker does not serve {model}")
    ran: bool = asyncio.run_coroutine_threadsafe(supervisors[0].run_one(task_id), loop).result()
    return ran
