"""Replicate's API (``dialects/replicate``), driven by the real ``replicate`` client.

In process (``make_app``), the client gets the TestClient's transport (``replicate.Client(transport=...)``), and a
worker runs the scripted engine (real PNGs after a delay per step, through the real supervisor and pipe); the app's
public URL is https, so the client wraps outputs in ``FileOutput`` as it does against Replicate. The README's
example runs against a real ``dreamserve serve`` (``shared_server``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from replicate.webhook import InvalidSignatureError

from dreamserve.dialects.replicate import routes
from dreamserve.dialects.replicate.schema import VERSION
from dreamserve.projects import create_project
from tests.conftest import App, LiveServer, Receiver, new_project, png_bytes

MODEL = "bytedance/seedream-4"
TQDM = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)", re.MULTILINE)


def until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.02)
    return value


class AppTransport(httpx.BaseTransport):
    """An ``httpx`` transport into the in-process app: Starlette's TestClient is built on another httpx (httpx2),
    whose transport the client cannot take. Bodies are buffered both ways."""

    def __init__(self, app: App) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.app.client.request(
            request.method, str(request.url), headers=request.headers.multi_items(), content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers.multi_items(), content=answer.content)


def client(app: App, token: str | None = None) -> replicate.Client:
    creds = app.creds
    assert creds is not None
    token = token if token is not None else f"{creds.api_key}:{creds.api_secret}"
    return replicate.Client(api_token=token, base_url=app.url, transport=AppTransport(app))


def picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_run_waits_and_every_output_reads_as_a_file(scripted_app: Callable[..., App]) -> None:
    app = scripted_app()
    api = client(app)
    output = api.run(MODEL, input={"prompt": "a lighthouse", "size": "1K", "aspect_ratio": "16:9"})
    assert isinstance(output, list) and len(output) == 1 and isinstance(output[0], FileOutput)
    assert picture(output[0].read()).size == (1280, 720)  # Seedream's 1K preset at 16:9
    # Auto mode: the group size comes from the prompt, within max_images.
    group = api.run(
        MODEL,
        input={
            "prompt": "3 images of a kite",
            "size": "custom",
            "width": 1024,
            "height": 1536,
            "sequential_image_generation": "auto",
            "max_images": 2,
        },
    )
    assert [picture(item.read()).size for item in group] == [(1024, 1536)] * 2
    # The held answer is the finished prediction (run() above did not need to poll it).
    held = api.models.predictions.create(model=MODEL, input={"prompt": "held", "size": "1K"}, wait=True)
    assert held.status == "succeeded" and len(held.output) == 1 and held.completed_at


def test_quotas_and_rate_limits_hold(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(workers=0, max_queued_tasks=2, rate_limit_per_minute=60, rate_limit_burst=5)
    api = client(app)
    for index in range(2):
        api.predictions.create(model=MODEL, input={"prompt": f"queued {index}"})
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(model=MODEL, input={"prompt": "one too many"})
    assert refused.value.status == 429 and "unfinished" in str(refused.value.detail)
    assert app.creds is not None
    bearer = {"Authorization": f"Bearer {app.creds.api_key}:{app.creds.api_secret}"}
    answers = [app.http.get("/v1/predictions", headers=bearer) for _ in range(10)]  # raw: the client would retry
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert limited.json()["title"] == "Too many requests" and int(limited.headers["retry-after"]) >= 1


def test_create_then_wait_grows_logs_a_line_per_step(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(steps=6)
    api = client(app)
    prediction = api.predictions.create(
        model=MODEL, input={"prompt": "a fox", "size": "1K", "aspect_ratio": "1:1", "enhance_prompt": True}
    )
    assert prediction.status == "starting" and prediction.model == MODEL and prediction.version == VERSION
    assert prediction.input == {"prompt": "a fox", "size": "1K", "aspect_ratio": "1:1", "enhance_prompt": True}
    assert prediction.urls["get"] == f"{app.url}/v1/predictions/{prediction.id}"
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.error is None
    assert [m.groups() for m in TQDM.finditer(prediction.logs or "")] == [
        (str(100 * step // 6), str(step), "6") for step in range(1, 7)
    ]
    assert "enhance_prompt is accepted but not applied" in (prediction.logs or "")
    progress = prediction.progress
    assert progress is not None and (progress.current, progress.total) == (6, 6)
    assert prediction.metrics is not None and prediction.metrics["predict_time"] > 0
    assert prediction.created_at and prediction.started_at and prediction.completed_at
    assert picture(app.http.get(prediction.output[0]).content).size == (1024, 1024)
    assert api.predictions.get(prediction.id).output == prediction.output


def test_a_wait_that_runs_out_answers_starting_and_run_polls_on(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(steps=40, step_seconds=0.05)  # about 2 s
    api = client(app)
    # models.predictions.create: predictions.create(model=...) drops ``wait`` (replicate 1.0.7).
    held = api.models.predictions.create(model=MODEL, input={"prompt": "slow", "size": "1K"}, wait=1)
    assert held.status == "starting" and held.output is None  # as Replicate: run() goes on polling
    assert api.predictions.get(held.id).status in ("starting", "processing")
    output = api.run(MODEL, input={"prompt": "slow too", "size": "1K"}, wait=1)
    assert picture(output[0].read()).size == (1024, 1024)
    with pytest.raises(ReplicateError) as refused:
        api.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=61)
    assert refused.value.status == 422 and "wait=N" in str(refused.value.detail)


def test_cancel_a_running_and_a_queued_prediction(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(steps=400, step_seconds=0.05)
    api = client(app)
    running = api.predictions.create(model=MODEL, input={"prompt": "long", "size": "1K"})
    # Another shape, so the worker does not take it into the first one's batch.
    queued = api.predictions.create(model=MODEL, input={"prompt": "behind it", "size": "1K", "aspect_ratio": "4:3"})
    until(lambda: api.predictions.get(running.id).status == "processing", "the first prediction to start")
    assert api.predictions.get(queued.id).status == "starting"
    queued.cancel()
    assert queued.status == "canceled" and queued.completed_at
    running.cancel()
    running.wait()  # returns on canceled, as against Replicate
    assert running.status == "canceled" and running.error is None
    assert api.predictions.get(running.id).status == "canceled"


def test_errors_are_problem_details_naming_the_field(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(workers=0)
    api = client(app)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"size": "8K"}, "input.size: must be one of 1K, 2K, 4K, custom"),
        ({"aspect_ratio": "5:4"}, "input.aspect_ratio: must be one of"),
        ({"size": "custom", "width": 512}, "input.width: must be an integer from 1024 to 4096"),
        ({"image_input": ["https://example.com/a.png"] * 11}, "input.image_input: takes at most 10 images"),
        ({"image_input": ["ftp://example.com/a.png"]}, "input.image_input: entry 1 must be an http(s) URL"),
        ({"image_input": ["data:image/png;base64,!!"]}, "input.image_input: entry 1 is not valid base64"),
        ({"max_images": 16}, "input.max_images: must be an integer from 1 to 15"),
        (
            {"image_input": ["https://example.com/a.png"] * 10, "sequential_image_generation": "auto", "max_images": 6},
            "input.max_images: plus the 10 input images must be at most 15",
        ),
        ({"prompt": 5}, "input.prompt: is required"),
        ({"prompt": " "}, "input.prompt: required"),
        ({"enhance_prompt": "yes"}, "input.enhance_prompt: must be true or false"),
    ]
    for change, detail in cases:
        with pytest.raises(ReplicateError) as refused:
            api.predictions.create(model=MODEL, input={"prompt": "a fox", **change})
        error = refused.value
        assert (error.status, error.title) == (422, "Input validation failed"), change
        assert str(error.detail).startswith(detail), (change, error.detail)
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(model=MODEL, input={"prompt": "a fox"}, webhook="not a url")
    assert refused.value.status == 422 and str(refused.value.detail).startswith("webhook: must be an http")
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(
            model=MODEL, input={"prompt": "a fox"}, webhook="https://example.com/hook", webhook_events_filter=["done"]
        )
    assert str(refused.value.detail).startswith("webhook_events_filter: must be a list of start, output, logs")
    # Unknown input keys are ignored, as cog does, and echoed back.
    assert api.predictions.create(model=MODEL, input={"prompt": "a fox", "guidance": 3}).input["guidance"] == 3


def test_bad_keys_and_another_projects_predictions(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(workers=0)
    api = client(app)
    mine = api.predictions.create(model=MODEL, input={"prompt": "mine"})
    assert app.creds is not None
    for token in ("", "nope", app.creds.api_key, f"{app.creds.api_key}:wrong"):  # a signature project needs both
        with pytest.raises(ReplicateError) as refused:
            client(app, token).predictions.get(mine.id)
        assert (refused.value.status, refused.value.title) == (401, "Unauthenticated"), token
    other = new_project(app.settings, "other")
    theirs = client(app, f"{other.api_key}:{other.api_secret}")
    for call in (lambda: theirs.predictions.get(mine.id), lambda: theirs.predictions.cancel(mine.id)):
        with pytest.raises(ReplicateError) as refused:
            call()
        assert refused.value.status == 404
    assert theirs.predictions.list().results == []
    assert api.predictions.get(mine.id).status == "starting"  # not cancelled by the other project
    with pytest.raises(ReplicateError) as refused:
        api.predictions.get("12abc")
    assert refused.value.status == 404
    with pytest.raises(ReplicateError) as refused:
        api.models.get("someone/else")
    assert refused.value.status == 404
    key_only = create_project(app.settings, "key only", signature=False)
    assert client(app, key_only.api_key).predictions.list().results == []


def test_list_pages_with_cursors(scripted_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> None:
    app = scripted_app(workers=0)
    monkeypatch.setattr(routes, "PAGE_SIZE", 2)
    api = client(app)
    made = [api.predictions.create(model=MODEL, input={"prompt": f"p{i}"}).id for i in range(5)]
    first = api.predictions.list()
    assert [p.id for p in first.results] == made[::-1][:2] and first.next is not None
    seen = [p.id for page in replicate.paginate(api.predictions.list) for p in page]
    assert seen == made[::-1]
    assert api.predictions.list(first.next).results[0].id == made[2]


def test_model_version_and_pinned_version_runs(scripted_app: Callable[..., App]) -> None:
    app = scripted_app()
    api = client(app)
    model = api.models.get(MODEL)
    assert model.owner == "bytedance" and model.name == "seedream-4" and model.latest_version is not None
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert schema["Input"]["properties"]["size"]["enum"] == ["1K", "2K", "4K", "custom"]
    assert schema["Input"]["properties"]["max_images"]["maximum"] == 15
    assert schema["Output"] == {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
    output = api.run(f"{MODEL}:{model.latest_version.id}", input={"prompt": "pinned", "size": "1K"})
    assert picture(output[0].read()).size == (1024, 1024)
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(version="0123abc", input={"prompt": "x"})
    assert refused.value.status == 404


def test_a_failed_prediction_raises_model_error(scripted_app: Callable[..., App]) -> None:
    app = scripted_app()
    with pytest.raises(ModelError) as failed:
        client(app).run(MODEL, input={"prompt": "please fail", "size": "1K"})
    assert failed.value.prediction.status == "failed" and failed.value.prediction.error


def test_files_and_file_inputs(scripted_app: Callable[..., App], tmp_path: Path) -> None:
    app = scripted_app()
    api = client(app)
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_bytes(160, 90))
    file = api.files.create(wide, metadata={"shot": 1})
    assert (file.name, file.content_type, file.size, file.metadata) == (
        "wide.png",
        "image/png",
        wide.stat().st_size,
        {"shot": 1},
    )
    assert api.files.get(file.id).checksums["sha256"] == file.checksums["sha256"]
    assert [f.id for f in api.files.list()] == [file.id]
    assert api.files.get(file.id).urls["get"] == f"{app.url}/v1/files/{file.id}/download"
    # The file's URL reads with the token, as FileOutput reads it (the client's own httpx, its Authorization).
    assert FileOutput(file.urls["get"], api).read() == wide.read_bytes()
    assert app.http.get(file.urls["get"]).status_code == 401
    # An open file in input: the client uploads it and sends its URL; the server uses the stored image (16:9).
    with wide.open("rb") as handle:
        output = api.run(MODEL, input={"prompt": "match it", "size": "1K", "image_input": [handle]})
    assert picture(output[0].read()).size == (1280, 720)
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(90, 160)).decode()
    portrait = api.run(MODEL, input={"prompt": "tall", "size": "1K", "image_input": [data_uri, file.urls["get"]]})
    assert picture(portrait[0].read()).size == (720, 1280)  # the first image's aspect
    assert api.files.delete(file.id) is True
    with pytest.raises(ReplicateError) as refused:
        api.files.get(file.id)
    assert refused.value.status == 404
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(model=MODEL, input={"prompt": "gone", "image_input": [file.urls["get"]]})
    assert refused.value.status == 422 and "names no file of this project" in str(refused.value.detail)
    with pytest.raises(ReplicateError) as refused:
        api.files.create(io.BytesIO(b"not an image"), filename="notes.txt")
    assert refused.value.status == 422


def test_another_projects_file_is_not_an_input(scripted_app: Callable[..., App], tmp_path: Path) -> None:
    app = scripted_app(workers=0)
    other = new_project(app.settings, "other")
    theirs = client(app, f"{other.api_key}:{other.api_secret}").files.create(io.BytesIO(png_bytes()), filename="a.png")
    api = client(app)
    with pytest.raises(ReplicateError) as refused:
        api.files.get(theirs.id)
    assert refused.value.status == 404
    with pytest.raises(ReplicateError) as refused:
        api.predictions.create(model=MODEL, input={"prompt": "steal", "image_input": [theirs.urls["get"]]})
    assert refused.value.status == 422


def test_webhooks_are_signed_the_standard_webhooks_way(scripted_app: Callable[..., App], receiver: Receiver) -> None:
    app = scripted_app()
    api = client(app)
    secret = api.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    prediction = api.predictions.create(
        model=MODEL,
        input={"prompt": "hooked", "size": "1K"},
        webhook=receiver.url("/hook"),
        webhook_events_filter=["start", "completed"],
    )
    # Each POST is the prediction as it stands when sent: the start one may already show it succeeded.
    until(lambda: len(receiver.posts) == 2 and receiver.posts[-1]["body"]["status"] == "succeeded", "two webhooks")
    # start, then completed, and nothing else (the filter leaves out the progress a step would send).
    assert [post["body"]["id"] for post in receiver.posts] == [prediction.id] * 2
    for post in receiver.posts:
        assert post["path"] == "/hook"
        replicate.webhooks.validate(headers=post["headers"], body=post["raw"].decode(), secret=secret, tolerance=300)
    final = receiver.posts[-1]["body"]
    assert final["status"] == "succeeded" and len(final["output"]) == 1 and final["logs"]
    assert len({post["headers"]["webhook-id"] for post in receiver.posts}) == len(receiver.posts)
    forged = receiver.posts[-1]["raw"].decode().replace("succeeded", "failed")
    with pytest.raises(InvalidSignatureError):
        replicate.webhooks.validate(headers=receiver.posts[-1]["headers"], body=forged, secret=secret)
    # Another project's secret does not validate this project's webhooks.
    other = new_project(app.settings, "other")
    their_secret = client(app, f"{other.api_key}:{other.api_secret}").webhooks.default.secret()
    assert their_secret.key != secret.key
    with pytest.raises(InvalidSignatureError):
        replicate.webhooks.validate(
            headers=receiver.posts[-1]["headers"], body=receiver.posts[-1]["raw"].decode(), secret=their_secret
        )


def test_the_readme_example_runs(tiny_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Replicate section, as written, against a real server (over http, so outputs are URLs)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Use it like Replicate", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert tiny_server.creds is not None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(png_bytes(160, 90))
    namespace: dict[str, Any] = {
        "URL": tiny_server.url,
        "KEY": tiny_server.creds.api_key,
        "SECRET": tiny_server.creds.api_secret,
    }
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        if "client" in namespace:
            namespace["client"]._client.close()  # the client keeps its connection pool open
    prediction = namespace["prediction"]
    assert prediction.status == "succeeded" and TQDM.search(prediction.logs)
    assert picture((tmp_path / "out-0.png").read_bytes()).size == (1280, 720)  # 1K at cat.png's 16:9


def test_the_stream_sends_logs_outputs_and_done(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(steps=3)
    api = client(app)
    events = list(
        api.stream(
            MODEL,
            input={
                "prompt": "2 images of a boat",
                "size": "1K",
                "sequential_image_generation": "auto",
                "max_images": 2,
            },
        )
    )
    kinds = [event.event.value for event in events]
    assert kinds.count("logs") == 1 + 3 and kinds.count("output") == 2 and kinds[-1] == "done", kinds
    outputs = [event.data for event in events if event.event.value == "output"]
    assert all(isinstance(item, FileOutput) for item in outputs)
    assert [picture(item.read()).size for item in outputs] == [(1024, 1024)] * 2
    # A finished prediction's stream replays it; a failed one ends with an error (raised by the client).
    prediction = api.predictions.create(model=MODEL, input={"prompt": "please fail", "size": "1K"})
    prediction.wait()
    with pytest.raises(RuntimeError, match="failed"):
        list(prediction.stream())


def test_a_prediction_is_a_task_like_any_other(scripted_app: Callable[..., App]) -> None:
    app = scripted_app()
    prediction = client(app).predictions.create(model=MODEL, input={"prompt": "seen by Wiro", "size": "1K"})
    prediction.wait()
    task = app.detail(prediction.id)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["outputs"][0]["url"] == prediction.output[0]
    listed = app.post("/v1/Task/List", json={"limit": 10}).json()["tasklist"]
    assert [item["id"] for item in listed] == [prediction.id]


def test_the_async_client_against_a_real_server(tiny_server: LiveServer) -> None:
    """``async_*`` calls go through the client's own ``httpx.AsyncClient``: over real HTTP, to a real server."""
    assert tiny_server.creds is not None
    api = replicate.Client(
        api_token=f"{tiny_server.creds.api_key}:{tiny_server.creds.api_secret}", base_url=tiny_server.url
    )

    async def scenario() -> tuple[Any, Any]:
        try:
            output = await api.async_run(MODEL, input={"prompt": "async", "size": "1K", "aspect_ratio": "4:3"})
            prediction = await api.models.predictions.async_create(model=MODEL, input={"prompt": "later", "size": "1K"})
            await prediction.async_wait()
            return output, prediction
        finally:
            await api._async_client.aclose()

    output, prediction = asyncio.run(scenario())
    assert isinstance(output[0], str) and output[0].startswith(tiny_server.url)  # plain http: URLs, not FileOutputs
    assert picture(httpx.get(output[0]).content).size == (1152, 864)  # the 1K preset at 4:3
    assert prediction.status == "succeeded" and TQDM.search(prediction.logs or "")
