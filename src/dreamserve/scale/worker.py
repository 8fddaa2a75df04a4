"""``dreamserve worker``: one GPU worker process consuming ``gpu.<model>`` queues from Celery.

The supervisor and its model child run on an asyncio loop in a background thread; Celery's
``threads`` pool with one slot runs task bodies (which wait on that loop) and keeps answering
remote control while a task runs, which the ``solo`` pool does not.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from dreamserve.dispatch import make_celery, queue_name
from dreamserve.services import Services
from dreamserve.settings import Settings


def turn_runner(loop: asyncio.AbstractEventLoop, services: Services) -> Callable[[int, str], bool]:
    """The Celery task body of this process: a turn of ``model``'s queue for its supervisor
    (``Supervisor.run_one``: the next task in claim order and its batch, not necessarily ``task_id``), run on
    the supervisors' loop and waited for in Celery's thread."""

    def run(task_id: int, model: str) -> bool:
        supervisors = [s for s in services.supervisors if s.slug == model]
        if not supervisors:
            raise RuntimeError(f"this worker does not serve {model}")
        ran: bool = asyncio.run_coroutine_threadsafe(supervisors[0].run_one(task_id), loop).result()
        return ran

    return run


def run_worker(settings: Settings, name: str | None = None) -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="dreamserve-supervisor", daemon=True).start()
    services = Services(settings, workers="dispatched")
    asyncio.run_coroutine_threadsafe(services.start(), loop).result()
    try:
        for supervisor in services.supervisors:
            # Load the model before taking work, so a message never waits on a cold start.
            asyncio.run_coroutine_threadsafe(supervisor.ensure_ready(), loop).result()
        queues = ",".join(sorted({queue_name(s.slug) for s in services.supervisors}))
        app = make_celery(settings, turn_runner(loop, services))
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                "--concurrency=1",
                f"--queues={queues}",
                f"--hostname={name or 'gpu'}-{socket.gethostname()}",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=INFO",
            ]
        )
    finally:
        asyncio.run_coroutine_threadsafe(services.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
