"""Background loops survive their failures, and ``/readyz`` says when one is failing or dead (in process: the
faults are injected into the real store of a real app)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from starlette.testclient import TestClient

from dreamserve.api.app import create_app
from dreamserve.services import Services
from dreamserve.settings import ModelSpec, Settings
from dreamserve.worker.supervisor import Supervisor
from tests.conftest import MODEL


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)}, loop_stale_seconds=1.0, lease_seconds=2.0)


def _until(client: TestClient, status: int, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == status:
            body: dict[str, Any] = response.json()
            return body
        time.sleep(0.1)
    raise AssertionError(f"/readyz did not answer {status} in {timeout} s: {response.text}")


def test_a_failing_loop_is_retried_reported_and_recovers(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path))
    with TestClient(app) as client:
        services: Services = app.state.services
        _until(client, 200)
        real = services.store.reap
        calls = 0

        async def broken(*args: Any) -> list[int]:
            nonlocal calls
            calls += 1
            raise sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")

        services.store.reap = broken  # type: ignore[method-assign]
        body = _until(client, 503)
        assert [(p["loop"], "QueuePool" in p["last_error"]) for p in body["loops"]] == [("reaper", True)], body
        assert calls >= 2, "the loop went on after its first failure"
        services.store.reap = real  # type: ignore[method-assign]
        assert _until(client, 200)["loops"] == []

        reaper = next(loop for loop in services._loops if loop.get_name() == "reaper")
        assert client.portal is not None
        client.portal.call(reaper.cancel)
        body = _until(client, 503)
        assert [(p["loop"], p["problem"]) for p in body["loops"]] == [("reaper", "stopped")], body


async def test_claim_loop_survives_database_errors(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    services = Services(settings, workers="none")
    await services.start()
    supervisor = Supervisor(MODEL, ModelSpec(), 0, settings, services.store, services.blobs, services.liveness)

    async def loaded() -> bool:  # the claim is what fails here, not the model process
        return True

    supervisor.ensure_ready = loaded  # type: ignore[method-assign]
    real = services.store.claim_next
    failures = 3

    async def flaky(*args: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")
        return await real(*args)

    services.store.claim_next = flaky  # type: ignore[method-assign]
    loop = asyncio.create_task(supervisor.run())
    try:
        async with asyncio.timeout(20):
            while failures or services.liveness.problems():
                assert not loop.done(), "the claim loop died"
                await asyncio.sleep(0.1)
        assert not loop.done()
    finally:
        await supervisor.close()
        await asyncio.wait_for(loop, 10)
        await services.close()
