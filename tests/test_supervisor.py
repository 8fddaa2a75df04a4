"""The supervisor tier: the real API, queue, supervisor and pipe protocol in this process, driving a spawned model
process that runs the scripted engine (``tests/scripted_engine.py``: real PNGs after a set delay per step, no
torch). What a model process does to its supervisor, batching, a cancel at a step, a kill, a crash, costs a
fraction of a second here instead of a server start and a model load.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreamserve.status import TaskStatus
from dreamserve.worker import supervisor as supervisor_module
from dreamserve.worker.process import adopt, prestart
from tests.conftest import SCRIPTED, App, build_settings, open_app, png_bytes, until


def run(app: App, prompt: str = "a fox", **fields: Any) -> str:
    body = app.run({"prompt": prompt, "size": "96x64", **fields})
    assert body["result"] is True, body
    return str(body["taskid"])


def test_a_task_runs_through_the_real_pipe_and_its_pngs_are_served(scripted: Callable[..., App]) -> None:
    app = scripted()
    task = app.wait(run(app, maxImages=2, seed=5), timeout=30)
    assert task["status"] == TaskStatus.POSTPROCESS_END and task["pexit"] == "0"
    assert [output["name"] for output in task["outputs"]] == ["0.png", "1.png"]
    served = app.http.get(task["outputs"][1]["url"])
    image = Image.open(io.BytesIO(served.content))
    assert served.status_code == 200 and image.size == (96, 64) and image.getpixel((0, 0))[0] == 6  # seed 5 + 1


def test_the_model_process_spawned_before_the_app_is_the_one_its_worker_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` spawns the model process before it imports the API (``process.prestart``); the supervisor adopts
    that process, loaded or still loading, instead of spawning a second one."""
    monkeypatch.setenv("DREAMSERVE_SCRIPTED_STEP_SECONDS", "0.02")
    overrides: dict[str, Any] = {"model": {"engine": SCRIPTED, "steps": 2}, "min_pixels": 64 * 64}
    ((slug, spec),) = build_settings(tmp_path, **overrides).models.items()
    early = prestart(spec, slug, 0)
    app = open_app(tmp_path, **overrides)
    try:
        until(lambda: app.workers()[0]["state"] == "ready", "the early model process to be adopted")
        assert app.workers()[0]["pid"] == early.pid
        assert app.wait(run(app), timeout=30)["pexit"] == "0"
    finally:
        app.close()
    assert not early.process.is_alive(), "the adopted process is closed with its supervisor"
    # One spawned for other settings is not adopted: it is stopped, and the supervisor spawns its own.
    stale = prestart(spec.model_copy(update={"steps": 3}), slug, 0)
    assert adopt(spec, f"{slug}:0") is None and adopt(spec, f"{slug}:0") is None
    stale.process.join(10)
    assert stale.process.exitcode is not None


def test_same_shape_tasks_share_one_call_of_the_model_process(scripted: Callable[..., App]) -> None:
    # A long window, which the third Run closes (it fills the batch): they share it whatever the machine's load.
    app = scripted(batch_window_ms=5000, model={"max_batch": 3})
    ids = [run(app, seed=seed) for seed in (1, 2, 3)]
    tasks = [app.wait(taskid, timeout=30) for taskid in ids]
    assert all(task["pexit"] == "0" for task in tasks)
    together = {tuple(sorted([t["id"], *map(str, t["details"]["batched_with"])])) for t in tasks}
    assert together == {tuple(sorted(ids))}, [t["details"] for t in tasks]


def test_a_cancel_lands_at_the_next_step_and_the_model_process_stays(scripted: Callable[..., App]) -> None:
    app = scripted(steps=2000, step_seconds=0.01)  # 20 s unless cancelled
    pid = app.workers()[0]["pid"]
    taskid = run(app)
    app.wait_progress(taskid)
    assert app.post("/v1/Task/Cancel", json={"taskid": taskid}).json()["result"] is True
    task = app.wait(taskid, timeout=10)
    assert task["status"] == TaskStatus.CANCEL and task["pexit"] == "130"
    assert app.workers()[0]["pid"] == pid, "a cancel must not cost the model process"


def test_a_kill_ends_the_process_and_a_fresh_one_serves_the_next_task(scripted: Callable[..., App]) -> None:
    app = scripted(steps=2000, step_seconds=0.01)
    pid = app.workers()[0]["pid"]
    taskid = run(app)
    app.wait_progress(taskid)
    killed = app.post("/v1/Task/Kill", json={"taskid": taskid}).json()
    assert killed["result"] is True
    task = app.wait(taskid, timeout=10)
    assert task["status"] == TaskStatus.CANCEL and task["pexit"] == "137"
    until(lambda: app.workers()[0]["state"] == "ready" and app.workers()[0]["pid"] not in (None, pid), "a new child")


UPLOADS = [("inputImage", (f"{n}.png", png_bytes(64 + n, 64), "image/png")) for n in range(3)]


def echoed(app: App, taskid: str) -> list[str]:
    """The input URLs Detail echoes for a task."""
    (task,) = app.post("/v1/Task/Detail", json={"taskid": taskid}).json()["tasklist"]
    urls: list[str] = task["parameters"]["inputImage"]
    return urls


def test_a_task_killed_while_it_runs_echoes_the_input_urls_it_was_given(scripted: Callable[..., App]) -> None:
    """Whether it ran or not (test_wiro: Cancel and Kill of queued tasks), the URLs of its uploaded inputs stay its
    echo once the files went with its end."""
    app = scripted(steps=2000, step_seconds=0.01)
    killed = str(app.run({"prompt": "a fox", "size": "96x64"}, files=UPLOADS)["taskid"])
    app.wait_progress(killed)
    shown = echoed(app, killed)
    assert len(set(shown)) == 3 and [app.http.get(url).status_code for url in shown] == [200, 200, 200]
    (answer,) = app.post("/v1/Task/Kill", json={"taskid": killed}).json()["tasklist"]
    assert answer["status"] == TaskStatus.CANCEL and answer["parameters"]["inputImage"] == shown
    assert echoed(app, killed) == shown and [app.http.get(url).status_code for url in shown] == [404, 404, 404]


def test_a_failed_task_echoes_the_input_urls_it_was_given(scripted: Callable[..., App]) -> None:
    app = scripted()
    failed = str(app.run({"prompt": "fail, please", "size": "96x64"}, files=UPLOADS)["taskid"])
    assert app.wait(failed, timeout=30)["pexit"] == "1"
    urls = echoed(app, failed)
    assert [url.rsplit("/", 1)[1] for url in urls] == [f"inputImage-{n}.png" for n in range(3)]
    assert len(set(urls)) == 3 and [app.http.get(url).status_code for url in urls] == [404, 404, 404]


def test_a_crashed_model_process_fails_its_task_and_is_replaced(scripted: Callable[..., App]) -> None:
    app = scripted()
    pid = app.workers()[0]["pid"]
    crashed = app.wait(run(app, "crash, please"), timeout=30)
    assert crashed["status"] == TaskStatus.POSTPROCESS_END and crashed["pexit"] == "1", crashed
    assert "model process" in crashed["debugerror"], crashed["debugerror"]
    after = app.wait(run(app, "a fox, afterwards"), timeout=30)
    assert after["pexit"] == "0" and app.workers()[0]["pid"] != pid


def test_a_job_that_raises_fails_alone_with_an_error_id(scripted: Callable[..., App]) -> None:
    app = scripted()
    pid = app.workers()[0]["pid"]
    failed = app.wait(run(app, "fail, please"), timeout=30)
    assert failed["status"] == TaskStatus.POSTPROCESS_END and failed["pexit"] == "1"
    assert "RuntimeError" in failed["debugerror"] and "scripted" not in failed["debugerror"]  # the kind, not the text
    assert app.workers()[0]["pid"] == pid


def test_a_stubborn_task_is_killed_after_the_cancel_grace(scripted: Callable[..., App]) -> None:
    app = scripted(steps=2000, step_seconds=0.01, cancel_grace_seconds=0.5)
    pid = app.workers()[0]["pid"]
    taskid = run(app, "stubborn")
    app.wait_progress(taskid)
    app.post("/v1/Task/Cancel", json={"taskid": taskid})
    task = app.wait(taskid, timeout=10)
    assert task["status"] == TaskStatus.CANCEL, task
    until(lambda: app.workers()[0]["pid"] not in (None, pid) and app.workers()[0]["state"] == "ready", "a new child")


def test_a_worker_closed_while_it_prepares_a_batch_gives_the_tasks_back(
    scripted: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Services.close`` closes its workers one by one, and a worker's loop may be preparing a batch meanwhile: the
    tasks, which never reached the model process, are re-queued with their attempt given back (the fleet bench
    saw them failed, pexit 1, as ``_send`` asserted a model process it no longer had)."""
    app = scripted()
    supervisor = app.services.supervisors[0]
    real = supervisor_module.local_references

    async def closed_meanwhile(*args: Any) -> Any:
        found = await real(*args)
        await supervisor.close()  # as the server's shutdown would, while this task is being prepared
        return found

    monkeypatch.setattr(supervisor_module, "local_references", closed_meanwhile)
    taskid = run(app)
    until(lambda: "Re-queued" in app.detail(taskid)["debugerror"], "the task to be given back")
    task = app.detail(taskid)
    assert task["status"] == TaskStatus.QUEUE and task["pexit"] == ""
    assert task["debugerror"] == f"Re-queued: the server stopped before task {taskid} was sent to its model process.\n"
    assert "supervisor error" not in app.log()
