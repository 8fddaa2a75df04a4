"""Celery on Redis as the delivery of queued task ids to GPU workers: the app, and the dispatcher of API replicas.

Celery only delivers: task state, leases, cancel and retries stay in SQL. The GPU worker process
(``scale/worker.py``) registers the task body, bound to the services it runs; an API replica only sends
by name, so it registers none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from celery import Celery

from dreamserve.settings import Settings

TASK_NAME = "dreamserve.run"


def queue_name(model: str) -> str:
    return "gpu." + model.replace("/", ".")


def make_celery(settings: Settings, run: Callable[[int, str], bool] | None = None) -> Celery:
    """The Celery app; ``run(task_id, model)`` is the task body, in a GPU worker only."""
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
    if run is not None:
        app.task(name=TASK_NAME)(run)
    return app


def celery_dispatcher(settings: Settings) -> Callable[[int, str, int], Awaitable[None]]:
    app = make_celery(settings)

    async def dispatch(task_id: int, model: str, priority: int) -> None:
        # Our priorities are 0-9 with 9 first; Redis serves 0 first.
        await asyncio.to_thread(
            app.send_task, TASK_NAME, args=[task_id, model], queue=queue_name(model), priority=9 - priority
        )

    return dispatch
