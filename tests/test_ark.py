"""ByteDance's Ark images API at ``/api/v3``, driven by ByteDance's own SDK (``volcengine-ark-runtime``) and the
OpenAI SDK against the session's tiny server (``tiny_server``: the tiny pipeline, over its socket), and against a
real server where a client hangs up on a stream or holds one open; the BytePlus SDK runs too when it is installed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient
from volcenginesdkarkruntime import Ark
from volcenginesdkarkruntime._exceptions import (
    ArkAuthenticationError,
    ArkBadRequestError,
    ArkNotFoundError,
    ArkRateLimitError,
)
from volcenginesdkarkruntime.types.images.images import SequentialImageGenerationOptions

from dreamserve.api.app import create_app
from dreamserve.projects import create_project
from dreamserve.queue.db import File
from dreamserve.settings import ModelSpec, Settings
from tests.conftest import MODEL, SCRIPTED, TINY, LiveServer, Receiver, png_bytes, start_live

MODEL_ID = "seedream-4-0-250828"
#: ``TINY``'s: files are kept a day, as long as Ark's links last, so URLs carry when they expire.
RETENTION = TINY["retention_seconds"]


@pytest.fixture
def server(tiny_server: LiveServer) -> Iterator[LiveServer]:
    """The session's tiny server (no model process of this module's own to start), through a project of the
    test's own; the SDK clients the test made are closed when it ends."""
    try:
        yield tiny_server
    finally:
        while _CLIENTS:
            _CLIENTS.pop().close()


@pytest.fixture(scope="module")
def streaming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real socket for the clients that hang up on a stream (a socket closing), its model process the scripted
    engine (no model load): one image per call of 8 steps of 50 ms, saved (and streamed) one after another."""
    model = {**TINY["model"], "max_batch": 1, "engine": SCRIPTED, "steps": 8}
    env = {"DREAMSERVE_SCRIPTED_STEP_SECONDS": "0.05", "DREAMSERVE_SCRIPTED_PER_CALL": "1"}
    server = start_live(tmp_path_factory, model=model, retention_seconds=RETENTION, env=env)
    try:
        yield server
    finally:
        server.stop()


#: SDK clients made by a test, closed when it ends (an open connection is a ResourceWarning).
_CLIENTS: list[Any] = []


def _opened(client: Any) -> Any:
    _CLIENTS.append(client)
    return client


def _ark(server: Any, key: str | None = None) -> Ark:
    """Ark's SDK over its own sockets to the live server."""
    creds = server.creds
    api_key = key or f"{creds.api_key}:{creds.api_secret}"
    return _opened(Ark(base_url=f"{server.url}/api/v3", api_key=api_key, max_retries=0))


def _bearer(server: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"}


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _fetched(server: LiveServer, url: str) -> Image.Image:
    response = server.http.get(url)
    assert response.status_code == 200
    return _picture(response.content)


def test_url_and_b64_at_2k_and_wxh(server: Any) -> None:
    client = _ark(server)
    result = client.images.generate(model=MODEL_ID, prompt="a lighthouse at dusk", size="2K", watermark=False)
    assert result.model == MODEL_ID and len(result.data) == 1
    assert result.data[0].size == "2048x2048"
    jpeg = _fetched(server, result.data[0].url)
    assert jpeg.format == "JPEG" and jpeg.size == (2048, 2048), "Ark's default output is a JPEG"
    assert result.usage.generated_images == 1 and result.usage.output_tokens == 16384
    assert result.usage.total_tokens == 16384
    extra: dict[str, Any] = result.model_extra or {}
    task = server.detail(extra["task_id"])
    assert task["status"] == "task_postprocess_end" and task["parameters"]["watermark"] == "false"
    assert [o["name"] for o in task["outputs"]] == ["0.jpeg"] and task["outputs"][0]["url"] == result.data[0].url
    # The same capability URL as Wiro's file item, and the same expiry (Wiro's expiretime), in a key of ours.
    expires = (result.data[0].model_extra or {})["expires"]
    assert expires == int(task["outputs"][0]["expiretime"]) and 0 < expires - time.time() <= RETENTION

    # b64_json, free WxH, PNG, and a seed: the same seed gives the same pixels.
    first, second = (
        client.images.generate(
            model="doubao-seedream-4-0-250828",
            prompt="a red kite",
            size="1600x900",
            response_format="b64_json",
            output_format="png",
            seed=42,
        )
        for _ in range(2)
    )
    images = [_picture(base64.b64decode(r.data[0].b64_json)) for r in (first, second)]
    assert [(i.format, i.size) for i in images] == [("PNG", (1600, 900))] * 2
    assert images[0].tobytes() == images[1].tobytes() and first.data[0].size == "1600x900"
    assert (first.data[0].model_extra or {})["seed"] == 42
    assert "expires" not in (first.data[0].model_extra or {}), "b64_json items hold the image, not a link to it"
    assert first.usage.output_tokens == 1600 * 900 // 256


def test_group_from_the_prompt_capped_by_max_images(server: Any) -> None:
    client = _ark(server)
    result = client.images.generate(
        model=MODEL_ID,
        prompt="3 images of a fox: in spring, in summer, in autumn",
        size="1280x720",
        sequential_image_generation="auto",
        sequential_image_generation_options=SequentialImageGenerationOptions(max_images=4),
        response_format="b64_json",
    )
    assert len(result.data) == 3 and result.usage.generated_images == 3
    pictures = [_picture(base64.b64decode(item.b64_json)) for item in result.data]
    assert {(p.format, p.size) for p in pictures} == {("JPEG", (1280, 720))}
    assert len({p.tobytes() for p in pictures}) == 3, "each image of a group has its own seed"
    seeds = [(item.model_extra or {})["seed"] for item in result.data]
    assert len(set(seeds)) == 3
    # The cap wins over the prompt; "disabled" (the default) is one image whatever the prompt says.
    capped = client.images.generate(
        model=MODEL_ID,
        prompt="生成三张图：春、夏、秋",
        size="1280x720",
        sequential_image_generation="auto",
        sequential_image_generation_options=SequentialImageGenerationOptions(max_images=2),
    )
    assert len(capped.data) == 2
    single = client.images.generate(model=MODEL_ID, prompt="3 images of a fox", size="1280x720")
    assert len(single.data) == 1


def test_edits_from_a_data_uri_and_a_url(server: Any, receiver: Receiver) -> None:
    receiver.files["/blue.png"] = png_bytes(96, 64, (0, 0, 200))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(160, 90)).decode()
    client = _ark(server)
    result = client.images.generate(
        model=MODEL_ID,
        prompt="put the blue thing on the red thing",
        image=[data_uri, receiver.url("/blue.png")],
        size="1K",
    )
    # 1K follows the aspect of the first reference (16:9).
    assert result.data[0].size == "1280x720" and _fetched(server, result.data[0].url).size == (1280, 720)
    task = server.detail((result.model_extra or {})["task_id"])
    inputs = task["parameters"]["inputImage"]
    assert len(inputs) == 2 and inputs[1] == receiver.url("/blue.png") and "/v1/File/" in inputs[0]
    one = client.images.generate(model=MODEL_ID, prompt="the same, at night", image=data_uri, size="1K")
    assert one.data[0].size == "1280x720"


def test_stream_read_by_the_sdk_one_event_per_saved_image(server: Any) -> None:
    client = _ark(server)
    stream = client.images.generate(
        model=MODEL_ID,
        prompt="two posters for a jazz festival",
        size="1280x720",
        sequential_image_generation="auto",
        stream=True,
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_succeeded"] * 2 + ["image_generation.completed"]
    assert [event.image_index for event in events[:2]] == [0, 1]  # type: ignore[union-attr]
    for event in events[:2]:
        assert event.size == "1280x720" and _fetched(server, event.url).format == "JPEG"  # type: ignore[union-attr]
    # Streamed while the task runs, an image already says when its file goes: as Task/Detail says once it ended.
    streamed = server.detail(str((events[2].model_extra or {})["task_id"]))
    expiry = {o["url"]: int(o["expiretime"]) for o in streamed["outputs"]}
    assert [(e.model_extra or {})["expires"] for e in events[:2]] == [expiry[e.url] for e in events[:2]]  # type: ignore[union-attr]
    usage: Any = events[2].usage  # type: ignore[union-attr]
    usage = usage if isinstance(usage, dict) else usage.model_dump()  # the SDK leaves it a dict (no `error` field)
    assert usage["generated_images"] == 2 and usage["output_tokens"] == 2 * 1280 * 720 // 256

    # On the wire: named events, single-line JSON, [DONE], the task in a header; and each image was saved (and
    # its event published) once, while the task ran. (The engine saves a batch's images while the next batch
    # denoises, so with a tiny model the first save may end after the second image's steps: test_engine proves
    # the overlap itself.)
    body = {"model": MODEL_ID, "prompt": "two posters", "size": "1280x720", "sequential_image_generation": "auto"}
    body["response_format"] = "b64_json"
    url = f"{server.url}/api/v3/images/generations"
    with server.http.stream("POST", url, headers=_bearer(server), json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        task_id = int(response.headers["x-dreamserve-task-id"])
        text = "".join(response.iter_text())
    blocks = [block for block in text.split("\n\n") if block]
    assert blocks[-1] == "data: [DONE]"
    named = [dict(line.split(": ", 1) for line in block.split("\n")) for block in blocks[:-1]]
    assert [n["event"] for n in named] == [json.loads(n["data"])["type"] for n in named]
    payloads = [json.loads(n["data"]) for n in named]
    assert [p["image_index"] for p in payloads[:2]] == [0, 1] and "url" not in payloads[0]
    assert _picture(base64.b64decode(payloads[1]["b64_json"])).size == (1280, 720)
    assert payloads[2]["usage"]["generated_images"] == 2 and payloads[2]["task_id"] == str(task_id)
    with sqlite3.connect(server.settings.data_dir / "dreamserve.db") as db:
        log = [row[0] for row in db.execute("SELECT type FROM task_events WHERE task_id = ? ORDER BY id", (task_id,))]
    saved = [at for at, kind in enumerate(log) if kind == "task_output_image"]
    assert len(saved) == 2 and saved[-1] < log.index("task_end"), "each image announced once, before the end"
    assert log[-1] == "task_postprocess_end"


def test_stream_checks_answer_400_json_before_the_stream(server: Any) -> None:
    response = server.http.post(
        f"{server.url}/api/v3/images/generations",
        headers=_bearer(server),
        json={"model": MODEL_ID, "prompt": "x", "size": "800x800", "stream": True},
    )
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "InvalidParameter" and error["param"] == "size" and error["type"] == "BadRequest"
    assert "921,600" in error["message"], "the message says which sizes are allowed"


def test_a_client_that_hangs_up_on_a_stream_cancels_its_task(streaming: LiveServer) -> None:
    server = streaming
    body = {
        "model": MODEL_ID,
        "prompt": "15 images of a teapot",
        "size": "1280x720",
        "sequential_image_generation": "auto",
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/api/v3/images/generations", headers=_bearer(server), json=body, timeout=60
    ) as response:
        task_id = response.headers["x-dreamserve-task-id"]
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_succeeded"):
                break  # hang up after the first image
    deadline = time.monotonic() + 60
    task = server.detail(task_id)
    while task["status"] not in ("task_postprocess_end", "task_cancel") and time.monotonic() < deadline:
        time.sleep(0.1)
        task = server.detail(task_id)
    assert task["status"] == "task_cancel" and task["pexit"] == "130", "nobody is left to receive the images"


def test_input_output_delete_takes_the_images_a_cancelled_stream_sent(streaming: LiveServer) -> None:
    """Issue 30 item 2: the partial image a stream sent before its client hung up (the task is cancelled) is a file of
    the task like its inputs and outputs: InputOutputDelete takes its row and bytes, and its URL answers 404 at once."""
    server = streaming
    body = {"model": MODEL_ID, "prompt": "15 images of a kite", "size": "1280x720", "stream": True}
    body["sequential_image_generation"] = "auto"
    with httpx.stream(
        "POST", f"{server.url}/api/v3/images/generations", headers=_bearer(server), json=body, timeout=60
    ) as response:
        task_id = response.headers["x-dreamserve-task-id"]
        for line in response.iter_lines():
            if line.startswith("data:") and "partial_succeeded" in line:
                url = json.loads(line[5:])["url"]
                break
    deadline = time.monotonic() + 60
    while server.detail(task_id)["status"] != "task_cancel" and time.monotonic() < deadline:
        time.sleep(0.1)
    database = sqlite3.connect(server.settings.data_dir / "dreamserve.db")
    rows = database.execute("SELECT role, blob_key FROM files WHERE task_id = ?", (int(task_id),)).fetchall()
    partial = [key for role, key in rows if role == "partial"]
    assert partial and all((server.settings.blob_dir / key).is_file() for key in partial)
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["cache-control"] == "no-cache"
    answer = server.post("/v1/Task/InputOutputDelete", json={"taskid": task_id}).json()
    assert answer == {"result": True, "errors": []}
    assert httpx.get(url).status_code == 404
    assert database.execute("SELECT count(*) FROM files WHERE task_id = ?", (int(task_id),)).fetchone() == (0,)
    assert not any((server.settings.blob_dir / key).exists() for key in partial)
    database.close()


def test_openai_sdk_pointed_at_api_v3(server: Any) -> None:
    creds = server.creds
    key = f"{creds.api_key}:{creds.api_secret}"
    client = _opened(openai.OpenAI(base_url=f"{server.url}/api/v3", api_key=key, max_retries=0))
    result = client.images.generate(
        model=MODEL_ID,
        prompt="a red fox in snow",
        size="2K",  # type: ignore[arg-type]
        response_format="url",
        extra_body={"watermark": False},
    )
    assert result.data and result.data[0].url
    assert _fetched(server, result.data[0].url).size == (2048, 2048)
    task = server.detail((result.model_extra or {})["task_id"])
    assert task["parameters"]["watermark"] == "false"
    marked = client.images.generate(model=MODEL_ID, prompt="a red fox in snow", size="1280x720")
    task = server.detail((marked.model_extra or {})["task_id"])
    assert task["parameters"]["watermark"] == "true", "Ark's default is a watermark"


def test_key_only_project_and_optimize_prompt_reported(server: Any) -> None:
    other = create_project(server.settings, "key-only", signature=False)
    client = _ark(server, other.api_key)
    result = client.images.generate(
        model="bytedance/seedream-v4",
        prompt="a red kite",
        size="1280x720",
        extra_body={"optimize_prompt_options": {"mode": "fast"}},
    )
    assert result.data[0].url
    assert "not applied" in (result.model_extra or {})["warnings"][0]


def test_every_error_class_the_sdk_raises(make_live: Any) -> None:
    # No model worker: a task stays queued, so a stream stays open until its client hangs up.
    server = make_live(model={"workers": 0}, rate_limit_per_minute=60, rate_limit_burst=30, sync_max_per_project=1)
    client = _ark(server)
    with pytest.raises(ArkAuthenticationError) as denied:
        _ark(server, "nope").images.generate(model=MODEL_ID, prompt="x")
    assert denied.value.code == "AuthenticationError" and denied.value.status_code == 401
    with pytest.raises(ArkAuthenticationError) as keyonly:
        _ark(server, server.creds.api_key).images.generate(model=MODEL_ID, prompt="x")
    assert "secret" in keyonly.value.message

    with pytest.raises(ArkNotFoundError) as unknown:
        client.images.generate(model="seedream-9-9", prompt="x")
    assert unknown.value.status_code == 404 and MODEL_ID in unknown.value.message

    # A stream holds one of its project's synchronous slots (1 here) while it runs: past the cap a stream, or a
    # waiting request, is refused with 429 before it starts and before any task is stored. (A project of its own:
    # the slot and the rate limit are per project.)
    streams = create_project(server.settings, "streams", signature=False)
    bearer = {"Authorization": f"Bearer {streams.api_key}"}
    url = f"{server.url}/api/v3/images/generations"
    body = {"model": MODEL_ID, "prompt": "queued", "size": "1280x720", "stream": True}
    with httpx.stream("POST", url, headers=bearer, json=body, timeout=30) as held:
        assert held.status_code == 200
        for stream in (True, False):
            with pytest.raises(ArkRateLimitError) as busy:
                _ark(server, streams.api_key).images.generate(model=MODEL_ID, prompt="x", stream=stream)
            assert busy.value.response.headers["retry-after"].isdigit() and "1 synchronous" in busy.value.message
        assert len(server.post("/v1/Task/List", streams, json={}).json()["tasklist"]) == 1
    # Hung up: the stream's task is cancelled and its slot is free again.
    deadline = time.monotonic() + 30
    while server.detail(held.headers["x-dreamserve-task-id"], streams)["status"] != "task_cancel":
        assert time.monotonic() < deadline, "the task of a stream whose client hung up is cancelled"
        time.sleep(0.25)
    statuses = []
    for _ in range(10):  # the slot is released just after the cancel is written
        with httpx.stream("POST", url, headers=bearer, json=body, timeout=30) as again:
            statuses.append(again.status_code)
        if again.status_code == 200:
            break
        time.sleep(0.1)
    assert statuses[-1] == 200, statuses

    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": "x", "size": "800x800"}, "size"),
        ({"prompt": "x", "size": "5000x100"}, "size"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "image": "ftp://example.com/a.png"}, "image"),
        ({"prompt": "x", "image": "data:image/png;base64,@@@"}, "image"),
        ({"prompt": "x", "image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, "image"),
        ({"prompt": "x", "image": ["https://example.com/a.png"] * 15}, "image"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "output_format": "webp"}, "output_format"),
        ({"prompt": "x", "seed": -2}, "seed"),
        ({"prompt": "x", "sequential_image_generation": "always"}, "sequential_image_generation"),
    ]
    for fields, param in cases:
        with pytest.raises(ArkBadRequestError) as bad:
            client.images.generate(model=MODEL_ID, **fields)
        assert bad.value.code == "InvalidParameter" and bad.value.param == param, (fields, bad.value.body)
    with pytest.raises(ArkBadRequestError) as many:
        client.images.generate(
            model=MODEL_ID,
            prompt="x",
            sequential_image_generation="auto",
            sequential_image_generation_options=SequentialImageGenerationOptions(max_images=16),
        )
    assert many.value.param == "sequential_image_generation_options.max_images"

    with pytest.raises(ArkRateLimitError) as limited:
        for _ in range(40):  # refused requests spend tokens too, and cost nothing to run
            with contextlib.suppress(ArkBadRequestError):
                client.images.generate(model=MODEL_ID, prompt="x", size="800x800")
    assert limited.value.status_code == 429 and limited.value.response.headers["retry-after"].isdigit()
    assert limited.value.code == "RateLimitExceeded"


@pytest.fixture
def byteplus() -> Any:
    # Asked for before the server, so a missing SDK skips without starting one.
    return pytest.importorskip(
        "byteplussdkarkruntime",
        reason="byteplus-python-sdk-v2 is not installed (pip install byteplus-python-sdk-v2 sniffio; see README)",
    )


def test_byteplus_sdk(byteplus: Any, server: Any) -> None:
    creds = server.creds
    key = f"{creds.api_key}:{creds.api_secret}"
    client = _opened(byteplus.Ark(base_url=f"{server.url}/api/v3", api_key=key, max_retries=0))
    result = client.images.generate(model=MODEL_ID, prompt="a lighthouse", size="1280x720", response_format="b64_json")
    assert _picture(base64.b64decode(result.data[0].b64_json)).size == (1280, 720)
    events = list(client.images.generate(model=MODEL_ID, prompt="a lighthouse", size="1280x720", stream=True))
    assert [event.type for event in events] == ["image_generation.partial_succeeded", "image_generation.completed"]


def test_a_failed_image_keeps_its_place_and_the_next_ones_still_come(tmp_path: Any) -> None:
    """The wire side of a failed image, in process: the test plays the worker's records (the engine test shows the
    worker going on past an image it could not save), the route answers in Ark's shape, plain and streamed."""
    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)}, min_pixels=64 * 64)
    creds = create_project(settings, "wire", signature=False)
    headers = {"Authorization": f"Bearer {creds.api_key}"}
    body = {
        "model": MODEL_ID,
        "prompt": "3 images of a kite",
        "size": "1280x720",
        "sequential_image_generation": "auto",
    }

    async def worker(services: Any) -> None:
        task = None
        while task is None:
            task = await services.store.claim_next("test-worker", [MODEL], 30.0)
            await asyncio.sleep(0.02)
        files = []
        for index in (0, 1, 2):
            if index == 1:
                error = {"code": "InternalServiceError", "message": "Image 1 failed: OSError: disk full"}
                await services.store.image_failed(task.id, "test-worker", 1, error)
                continue
            file = File(
                project_id=task.project_id,
                task_id=task.id,
                role="partial",
                position=index,
                name=f"{index}.jpeg",
                contenttype="image/jpeg",
                size=1,
                blob_key=f"outputs/folder-{task.id}/{index}.jpeg",
                meta={"seed": 7 + index, "width": 1280, "height": 720},
                created=time.time(),
            )
            await services.store.image_saved(task.id, "test-worker", file)
            files.append(file)
        for file in files:
            file.role = "output"
        failed = [{"index": 1, "seed": 8, "message": "OSError: disk full"}]
        await services.store.succeed(task.id, "test-worker", files, "", {"failed_images": failed})

    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        assert client.portal is not None
        for stream in (False, True):
            played = client.portal.start_task_soon(worker, services)
            response = client.post("/api/v3/images/generations", headers=headers, json={**body, "stream": stream})
            played.result(timeout=30)
            if not stream:
                answer = response.json()
                assert [sorted(item) for item in answer["data"]] == [["seed", "size", "url"], ["error"]] + [
                    ["seed", "size", "url"]
                ]
                assert answer["data"][1]["error"]["code"] == "InternalServiceError"
                assert answer["usage"]["generated_images"] == 2
                continue
            events = [json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: {")]
            assert [(e["type"].split(".")[1], e.get("image_index")) for e in events] == [
                ("partial_succeeded", 0),
                ("partial_failed", 1),
                ("partial_succeeded", 2),
                ("completed", None),
            ]
            assert "disk full" in events[1]["error"]["message"] and events[3]["usage"]["generated_images"] == 2
