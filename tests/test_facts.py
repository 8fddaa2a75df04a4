"""The worker's facts as they travel: a step published live with its preview and stored without it, and every
event's record through the in-process hub and a Redis stream (``DREAMSERVE_TEST_REDIS``, ``scripts/scaleout-env``),
read back as the same records."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from dreamserve.dialects.wiro.render import progress_object
from dreamserve.facts import ImageReport, LogText, Progress, TaskDetails
from dreamserve.jobs import TaskJob
from dreamserve.queue.db import Project, Task
from dreamserve.queue.events import Event, EventHub, Hub
from dreamserve.queue.migrate import upgrade
from dreamserve.queue.redis_events import RedisEventHub
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.status import Frame, TaskStatus

MODEL = "bytedance/seedream-v4"
WORKER = "test-host:1:model:0"

EVENTS = [
    Event(1, 0, Frame.OUTPUT, Progress(step=3, total=8, elapsed=0.75, preview="data:image/jpeg;base64,AA==")),
    Event(2, 0, Frame.OUTPUT_IMAGE, ImageReport(index=0, name="0.png")),
    Event(3, 0, Frame.OUTPUT_IMAGE, ImageReport(index=1, failure="Image 1 could not be finished (error id e).")),
    Event(4, 0, Frame.OUTPUT_FULL, LogText(raw="step 8/8")),
    Event(5, 0, TaskStatus.CANCEL, "cancelled"),
    Event(6, 0, TaskStatus.POSTPROCESS_END, []),
    Event(7, 0, TaskStatus.QUEUE, None),
]


def _hubs() -> list[str]:
    return ["local", "redis"] if os.environ.get("DREAMSERVE_TEST_REDIS") else ["local"]


@pytest.mark.parametrize("kind", _hubs())
async def test_every_event_record_comes_back_from_the_hub_as_it_went(kind: str) -> None:
    hub: Hub = EventHub() if kind == "local" else RedisEventHub(os.environ["DREAMSERVE_TEST_REDIS"])
    task_id = secrets.randbelow(2**40)  # a stream of its own on a shared Redis
    sent = [Event(event.id, task_id, event.type, event.message) for event in EVENTS]
    subscription = hub.subscribe(task_id)
    try:
        for event in sent:
            await hub.publish(event)
        received: list[Event] = []
        while len(received) < len(sent):
            batch = await subscription.next(5.0)
            assert batch, f"the hub gave {len(received)} of {len(sent)} events"
            received += batch
        assert received == sent
        assert [type(event.message) for event in received][:4] == [Progress, ImageReport, ImageReport, LogText]
    finally:
        await subscription.close()
        await hub.close()


async def test_a_step_is_published_with_its_preview_and_stored_without_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)})
    services = Services(settings, workers="none")
    await upgrade(services.engine)
    try:
        async with services.sessions.begin() as session:
            session.add(Project(id=1, name="p", api_key_hash="h", api_key_prefix="k", created=0.0))
        store = services.store
        job = TaskJob(prompt="p", width=64, height=64, num_images=1, seed=1)
        task = await store.create(project_id=1, model=MODEL, job=job, callback_url="", priority=0, inputs=[])
        assert await store.claim_next(WORKER, [MODEL], 30.0) is not None
        live = services.hub.subscribe(task.id)
        step = Progress(step=2, total=4, elapsed=0.5, preview="data:image/jpeg;base64,AA==")
        assert await store.progress(task.id, WORKER, step)
        (published,) = [event for event in await live.next(1.0) if event.type == Frame.OUTPUT]
        await live.close()
        assert published.message == step, "live followers get the preview"
        (logged,) = [event for event in await store.events(task.id) if event.type == Frame.OUTPUT]
        row = await store.get_by_id(task.id)
        assert isinstance(row, Task) and row.progress == logged.message == step.stored()
        assert step.stored().preview is None and isinstance(row.details, TaskDetails) and row.details.dump() == {}
        rendered = progress_object(step)
        assert rendered["preview"] == step.preview and "preview" not in progress_object(step.stored())
        assert json.dumps(progress_object(step.stored())) == json.dumps(
            {
                "type": "progressGenerate",
                "task": "Generate",
                "percentage": "50",
                "stepCurrent": "2",
                "stepTotal": "4",
                "speed": "4.00",
                "speedType": "it/s",
                "elapsedTime": "0s",
                "remainingTime": "0s",
            }
        )
    finally:
        await services.engine.dispose()
