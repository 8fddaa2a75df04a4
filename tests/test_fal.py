"""fal's queue and run APIs for Seedream 4 (``/fal/queue/``, ``/fal/run/``), driven by the real ``fal_client``.

``fal_client`` speaks only https and reads ``FAL_RUN_HOST`` and ``FAL_QUEUE_RUN_HOST`` when it is imported. The
module's server is the app with the scripted engine (no torch: requests of a second, to watch queued, running
and cancelled) behind uvicorn serving HTTPS with the session's certificate (trusted through ``SSL_CERT_FILE``,
which httpx reads), on a port chosen before ``fal_client`` is loaded, as a program that sets the variables first
sees it. The README's example runs as a program of its own against ``dreamserve serve`` serving HTTPS itself.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from dreamserve.api.app import create_app
from dreamserve.dialects.fal.decode import NAMED_SIZES, fal_size
from dreamserve.projects import Credentials, create_project
from dreamserve.settings import Settings
from dreamserve.signing import auth_headers, verify_webhook
from tests.conftest import LiveServer, Receiver, build_settings, certificates, png_bytes
from tests.test_https import HTTPS

SCRIPTED = "tests.scripted_engine:ScriptedEngine"
T2I = "fal-ai/bytedance/seedream/v4/text-to-image"
EDIT = "fal-ai/bytedance/seedream/v4/edit"
README = Path(__file__).resolve().parent.parent / "README.md"
#: Steps of a request (50 ms each with the scripted engine).
STEPS = 20


@dataclass
class FalServer:
    settings: Settings
    creds: Credentials
    other: Credentials
    host: str
    ca_file: Path
    fal: ModuleType
    opened: list[Any] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.creds.api_key}:{self.creds.api_secret}"

    def client(self, key: str | None = None) -> Any:
        client = self.fal.SyncClient(key=key or self.key)
        self.opened.append(client)
        return client

    def close_clients(self) -> None:
        """Close the connections of the clients a test made (``SyncClient`` keeps one httpx client, unclosed)."""
        while self.opened:
            client = self.opened.pop()
            if "_client" in client.__dict__:
                client._client.close()

    def http(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.Client(base_url=self.settings.base_url, verify=context, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FalServer]:
    certs = certificates(tmp_path_factory.getbasetemp() / "tls")
    # One image per pipeline call and STEPS steps of 50 ms: a request runs for about a second, long enough to be
    # seen queued behind another, in progress, and cancelled.
    model = {"engine": SCRIPTED, "steps": STEPS, "max_batch": 1}
    folder = tmp_path_factory.mktemp("fal")
    settings = build_settings(folder, model=model, ssl_certfile=certs.certfile, ssl_keyfile=certs.keyfile)
    creds = create_project(settings, "fal", signature=True)
    other = create_project(settings, "other", signature=True)
    host = f"127.0.0.1:{settings.port}"
    saved = {name: os.environ.get(name) for name in ("FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE")}
    os.environ.update({"FAL_RUN_HOST": f"{host}/fal/run", "FAL_QUEUE_RUN_HOST": f"{host}/fal/queue"})
    os.environ["SSL_CERT_FILE"] = str(certs.ca_file)
    fal = _load_fal_client()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=settings.port,
        ssl_certfile=str(certs.certfile),
        ssl_keyfile=str(certs.keyfile),
        log_level="warning",
    )
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not web.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.started, "the fal test server did not start"
    try:
        yield FalServer(settings, creds, other, host, certs.ca_file, fal)
    finally:
        web.should_exit = True
        thread.join(30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _close_clients(server: FalServer) -> Iterator[None]:
    yield
    server.close_clients()


def _load_fal_client() -> ModuleType:
    """``fal_client`` as a program that set the variables before importing it sees it (reloaded if some other
    test imported it first, since it reads them at import)."""
    import fal_client
    import fal_client.auth
    import fal_client.client

    for module in (fal_client.auth, fal_client.client, fal_client):
        importlib.reload(module)
    return fal_client


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _wait_status(handle: Any, kind: type, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = handle.status(with_logs=True)
        if isinstance(status, kind):
            return status
        time.sleep(0.02)
    raise AssertionError(f"{handle.request_id} never reached {kind.__name__}: {status}")


def _wait_step(handle: Any, timeout: float = 30) -> None:
    """Wait until the request has run a denoising step (its logs say so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = handle.status(with_logs=True)
        if any(log["message"].startswith("step ") for log in getattr(status, "logs", None) or ()):
            return
        time.sleep(0.02)
    raise AssertionError(f"{handle.request_id} ran no step: {status}")


# -- sizes (pure) ----------------------------------------------------------------------------------------------


def test_image_size_scales_fal_sizes_up_to_the_smallest_area_keeping_their_aspect() -> None:
    min_pixels = 1280 * 720
    expected = {
        "square_hd": "1024x1024",
        "square": "960x960",
        "portrait_4_3": "832x1120",
        "portrait_16_9": "720x1280",
        "landscape_4_3": "1120x832",
        "landscape_16_9": "1280x720",
    }
    for name, (width, height) in NAMED_SIZES.items():
        size, asked = fal_size(name, min_pixels)
        assert (size, asked) == (expected[name], name)
        out_w, out_h = (int(side) for side in size.split("x"))
        assert out_w * out_h >= min_pixels
        assert abs(out_w / out_h - width / height) < 0.02
    assert fal_size({"width": 3000, "height": 2000}, min_pixels) == ("3000x2000", "3000x2000")
    assert fal_size({"width": 100, "height": 50}, min_pixels)[0] == "1360x688"
    assert fal_size(None, min_pixels) == ("2048x2048", "2048x2048")
    assert fal_size("auto", min_pixels) == ("2K", "auto")
    assert fal_size("auto_2K", min_pixels) == ("2K", "auto_2K")
    assert fal_size("auto_4K", min_pixels) == ("4K", "auto_4K")


# -- the queue ---------------------------------------------------------------------------------------------------


def test_subscribe_reports_queue_progress_and_completion_with_logs(server: FalServer) -> None:
    fal = server.fal
    client = server.client()
    ahead = client.submit(T2I, {"prompt": "a fox ahead in the queue", "image_size": "square"})
    updates: list[Any] = []
    enqueued: list[str] = []
    result = client.subscribe(
        T2I,
        {"prompt": "a red fox in the snow", "image_size": "landscape_16_9", "seed": 42},
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
        interval=0.02,
    )
    kinds = [type(update) for update in updates]
    assert kinds[0] is fal.Queued and updates[0].position >= 0
    assert fal.InProgress in kinds and kinds[-1] is fal.Completed
    completed = updates[-1]
    assert completed.error is None and completed.metrics["inference_time"] > 0
    messages = [log["message"] for log in completed.logs]
    assert messages[0] == "queued" and f"step {STEPS}/{STEPS}" in messages and messages[-1] == "done"
    assert all(set(log) == {"message", "level", "source", "timestamp"} for log in completed.logs)
    progress = [u for u in updates if isinstance(u, fal.InProgress) and u.logs]
    assert progress and any(log["message"].startswith("step ") for log in progress[-1].logs)

    [image] = result["images"]
    assert set(image) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert (image["width"], image["height"], image["content_type"]) == (1280, 720, "image/png")
    assert result["seed"] == 42
    with server.http() as http:
        data = http.get(image["url"]).content
    assert len(data) == image["file_size"] and _picture(data).size == (1280, 720)
    assert enqueued and server.client().result(T2I, enqueued[0]) == result
    assert ahead.get(interval=0.02)["images"][0]["width"] == 960


def test_requests_queued_behind_others_report_their_positions(server: FalServer) -> None:
    fal = server.fal
    client = server.client()
    handles = [client.submit(T2I, {"prompt": f"fox number {n}"}) for n in range(3)]
    positions: list[int] = []
    deadline = time.monotonic() + 60
    while (status := handles[2].status()) and isinstance(status, fal.Queued) and time.monotonic() < deadline:
        positions.append(status.position)
        time.sleep(0.02)
    # Two requests ahead of it on one worker: it waits behind them (at 2 until the first is claimed) and moves up.
    assert positions and positions[0] >= 1 and positions[-1] == 0 and set(positions) <= {0, 1, 2}
    assert positions == sorted(positions, reverse=True)
    assert all(handle.get(interval=0.02)["images"] for handle in handles)


def test_status_stream_sends_each_change_until_completed(server: FalServer) -> None:
    client = server.client()
    handle = client.submit(T2I, {"prompt": "a streamed fox"})
    headers = {"Authorization": f"Key {server.key}"}
    with server.http() as http, http.stream("GET", f"{handle.status_url}/stream?logs=1", headers=headers) as got:
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in got.iter_lines() if line.startswith("data: ")]
    statuses = [event["status"] for event in events]
    assert statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses
    assert statuses.index("IN_PROGRESS") < statuses.index("COMPLETED")
    assert events[-1]["metrics"]["inference_time"] > 0 and events[-1]["logs"][-1]["message"] == "done"


def test_cancel_a_queued_and_a_running_request(server: FalServer) -> None:
    fal = server.fal
    client = server.client()
    running = client.submit(T2I, {"prompt": "a fox that will be stopped"})
    queued = client.submit(T2I, {"prompt": "a fox that never starts"})
    _wait_step(running)  # its model process has it: the stop reaches it at the next step
    running.cancel()
    queued.cancel()
    for handle in (queued, running):
        done = _wait_status(handle, fal.Completed)
        assert done.error == f"Request {handle.request_id} was cancelled."
        assert done.error_type == "request_cancelled"
        with pytest.raises(fal.FalClientHTTPError) as failed:
            client.result(T2I, handle.request_id)
        assert failed.value.status_code == 400 and "cancelled" in failed.value.message
        with pytest.raises(fal.FalClientHTTPError) as again:
            handle.cancel()
        assert again.value.status_code == 400 and "ALREADY_COMPLETED" in again.value.message


def test_the_async_client_submits_follows_and_fetches(server: FalServer) -> None:
    fal = server.fal

    async def scenario() -> tuple[list[Any], Any, Any]:
        client = fal.AsyncClient(key=server.key)
        try:
            handle = await client.submit(T2I, {"prompt": "an async fox", "image_size": "square_hd"})
            seen = [status async for status in handle.iter_events(with_logs=True, interval=0.02)]
            return seen, await handle.get(), await client.run(T2I, {"prompt": "a fox at once"})
        finally:
            await (await client._client).aclose()

    seen, queued, direct = asyncio.run(scenario())
    assert isinstance(seen[-1], fal.Completed) and seen[-1].logs[-1]["message"] == "done"
    assert queued["images"][0]["width"] == 1024 and len(direct["images"]) == 1


# -- the synchronous run -----------------------------------------------------------------------------------------


def test_run_with_sync_mode_answers_data_uris_of_each_generation(server: FalServer) -> None:
    result = server.client().run(
        T2I,
        {"prompt": "a fox", "num_images": 2, "sync_mode": True, "image_size": {"width": 1024, "height": 1024}},
    )
    assert len(result["images"]) == 2
    for image in result["images"]:
        match = re.match(r"^data:image/png;base64,(.+)$", image["url"])
        assert match is not None
        data = base64.b64decode(match.group(1))
        assert len(data) == image["file_size"] and _picture(data).size == (1024, 1024)


def test_edit_takes_data_uris_and_this_servers_own_file_urls(server: FalServer) -> None:
    fal = server.fal
    client = server.client()
    first = client.run(T2I, {"prompt": "a fox", "image_size": "square"})
    reference = fal.encode(png_bytes(320, 240), "image/png")
    result = client.run(
        EDIT,
        {
            "prompt": "a group of 3 images of the fox in spring, summer and autumn",
            "image_urls": [reference, first["images"][0]["url"]],
            "max_images": 4,
            "image_size": "auto_2K",
            "enhance_prompt_mode": "fast",
            "enable_safety_checker": True,
        },
    )
    assert len(result["images"]) == 3  # the prompt's group of 3, within max_images
    # auto_2K: the 2K preset closest to the first reference's 4:3.
    assert {(image["width"], image["height"]) for image in result["images"]} == {(2304, 1728)}
    handle = client.submit(EDIT, {"prompt": "the fox again", "image_urls": [reference], "enhance_prompt_mode": "fast"})
    logs = [log["message"] for log in _wait_status(handle, fal.Completed).logs]
    assert logs[0] == "enhance_prompt_mode is accepted but not applied: the prompt is used as written."


def test_run_cancels_the_task_of_a_client_that_hung_up(server: FalServer) -> None:
    fal = server.fal
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post(
            f"/fal/run/{T2I}",
            json={"prompt": "a fox nobody waits for"},
            headers={"Authorization": f"Key {server.key}"},
            timeout=0.5,
        )
    tasks = _tasks(server, server.creds)
    newest = max(tasks, key=lambda task: int(task["id"]))
    handle = server.client().get_handle(T2I, str(newest["id"]))
    assert _wait_status(handle, fal.Completed).error_type == "request_cancelled"


def _tasks(server: FalServer, creds: Credentials) -> list[dict[str, Any]]:
    """The project's tasks as Wiro's Task/List shows them: every dialect's tasks are listed there."""
    with server.http() as http:
        headers = auth_headers(creds.api_key, creds.api_secret)
        body = http.post("/v1/Task/List", json={"limit": 100}, headers=headers).json()
    assert body["result"] is True, body
    tasks: list[dict[str, Any]] = body["tasklist"]
    return tasks


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "arguments", "name"),
    [
        (T2I, {}, "prompt"),
        (T2I, {"prompt": "x", "image_size": "huge"}, "image_size"),
        (T2I, {"prompt": "x", "image_size": {"width": 5000, "height": 5000}}, "image_size"),
        (T2I, {"prompt": "x", "image_size": {"width": 4096, "height": 128}}, "image_size"),
        (T2I, {"prompt": "x", "num_images": 7}, "num_images"),
        (T2I, {"prompt": "x", "max_images": 0}, "max_images"),
        (T2I, {"prompt": "a group of 6 images", "num_images": 3, "max_images": 6}, "num_images"),
        (T2I, {"prompt": "x", "seed": -1}, "seed"),
        (T2I, {"prompt": "x", "sync_mode": "yes"}, "sync_mode"),
        (T2I, {"prompt": "x", "enable_safety_checker": "no"}, "enable_safety_checker"),
        (T2I, {"prompt": "x", "enhance_prompt_mode": "best"}, "enhance_prompt_mode"),
        (EDIT, {"prompt": "x"}, "image_urls"),
        (EDIT, {"prompt": "x", "image_urls": ["https://example.com/a.png"] * 11}, "image_urls"),
        (EDIT, {"prompt": "x", "image_urls": ["ftp://example.com/a.png"]}, "image_urls"),
        (EDIT, {"prompt": "x", "image_urls": ["data:image/png;base64,@@@@"]}, "image_urls"),
    ],
)
def test_invalid_input_is_fals_422_naming_the_field(
    server: FalServer, app: str, arguments: dict[str, Any], name: str
) -> None:
    fal = server.fal
    for call in (server.client().run, server.client().submit):
        with pytest.raises(fal.FalClientHTTPError) as refused:
            call(app, arguments)
        assert refused.value.status_code == 422
        [item] = refused.value.message  # fal's detail list, as the client hands it on
        assert item["loc"] == ["body", name] and item["type"] == "value_error"
        assert f"[{name}]" in item["msg"]


def test_unknown_app_and_request_are_404(server: FalServer) -> None:
    fal = server.fal
    client = server.client()
    with pytest.raises(fal.FalClientHTTPError) as unknown:
        client.run("fal-ai/flux/dev", {"prompt": "x"})
    assert unknown.value.status_code == 404 and "fal-ai/flux/dev" in unknown.value.message
    for request_id in ("999999999", "not-an-id", "1" * 40):
        with pytest.raises(fal.FalClientHTTPError) as missing:
            client.status(T2I, request_id)
        assert missing.value.status_code == 404


def test_bad_keys_are_401(server: FalServer) -> None:
    fal = server.fal
    for key in ("nope:nope", server.creds.api_key, f"{server.creds.api_key}:wrong"):
        with pytest.raises(fal.FalClientHTTPError) as refused:
            server.client(key).submit(T2I, {"prompt": "x"})
        assert refused.value.status_code == 401 and "Authorization: Key" in refused.value.message
    with server.http() as http:
        bearer = http.post(f"/fal/queue/{T2I}", json={"prompt": "x"}, headers={"Authorization": f"Bearer {server.key}"})
    assert bearer.status_code == 401 and bearer.json()["detail"].startswith("Send the API key")


def test_another_projects_request_cannot_be_read_or_cancelled(server: FalServer) -> None:
    fal = server.fal
    mine = server.client().submit(T2I, {"prompt": "my own fox"})
    theirs = server.client(f"{server.other.api_key}:{server.other.api_secret}")
    for call in (theirs.status, theirs.result, theirs.cancel):
        with pytest.raises(fal.FalClientHTTPError) as hidden:
            call(T2I, mine.request_id)
        assert hidden.value.status_code == 404 and mine.request_id in hidden.value.message
    assert mine.get(interval=0.02)["images"]  # never cancelled by the stranger
    # Tasks asked for through another API are not fal requests, even of the same project.
    with server.http() as http:
        headers = auth_headers(server.creds.api_key, server.creds.api_secret)
        run = http.post("/v1/Run/bytedance/seedream-v4", json={"prompt": "wiro's fox"}, headers=headers).json()
    with pytest.raises(fal.FalClientHTTPError) as other_api:
        server.client().status(T2I, str(run["taskid"]))
    assert other_api.value.status_code == 404
    assert mine.request_id in {str(task["id"]) for task in _tasks(server, server.creds)}


# -- the README --------------------------------------------------------------------------------------------------


def test_readme_fal_example_runs_unchanged(
    shared_server: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The README's example, in a program of its own with only the variables set, against ``dreamserve serve``
    serving HTTPS itself (the session's HTTPS server, shared with test_https)."""
    served = shared_server(**HTTPS)
    assert served.creds is not None
    section = README.read_text().split("## Use it like fal", 1)[1].split("\n## ", 1)[0]
    exports = re.findall(r"^export (\w+)=", section, re.MULTILINE)
    assert set(exports) == {"FAL_KEY", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST"}
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    host = served.url.removeprefix("https://")
    env = {
        **os.environ,
        "FAL_KEY": f"{served.creds.api_key}:{served.creds.api_secret}",
        "FAL_RUN_HOST": f"{host}/fal/run",
        "FAL_QUEUE_RUN_HOST": f"{host}/fal/queue",
        "SSL_CERT_FILE": str(certificates(tmp_path_factory.getbasetemp() / "tls").ca_file),
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] in ("Queued", "InProgress"), done.stdout
    assert "Completed" in lines
    urls = [line.split() for line in lines if line.startswith(f"{served.url}/v1/File/")]
    assert [(width, height) for _, width, height in urls] == [("1280", "720")] * 2, done.stdout
    assert all(served.http.get(url).status_code == 200 for url, _, _ in urls)
    assert lines[-1].isdigit()  # the seed


def _deliveries(receiver: Receiver, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(receiver.posts) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(receiver.posts) >= count, receiver.posts
    return receiver.posts


def test_fal_webhook_posts_fals_envelope_when_the_request_ends(server: FalServer, receiver: Receiver) -> None:
    client = server.client()
    done = client.submit(T2I, {"prompt": "a fox"}, webhook_url=receiver.url("/done"))
    bad = client.submit(
        EDIT, {"prompt": "a fox", "image_urls": [receiver.url("/missing.png")]}, webhook_url=receiver.url("/bad")
    )
    stopped = client.submit(T2I, {"prompt": "a fox never made"}, webhook_url=receiver.url("/stopped"))
    stopped.cancel()
    posts = {post["path"]: post for post in _deliveries(receiver, 3)}
    assert set(posts) == {"/done", "/bad", "/stopped"}
    for post in posts.values():  # signed as every callback of the server is
        headers = post["headers"]
        assert verify_webhook(
            server.creds.webhook_secret,
            headers["x-dreamserve-timestamp"],
            post["raw"],
            headers["x-dreamserve-signature"],
        )
        assert headers["x-fal-webhook-request-id"] == post["body"]["request_id"]
    ok = posts["/done"]["body"]
    assert ok["request_id"] == ok["gateway_request_id"] == done.request_id
    assert ok["status"] == "OK" and ok["payload"] == done.get(interval=0.02)
    failed = posts["/bad"]["body"]
    assert (failed["request_id"], failed["status"], failed["error"]) == (
        bad.request_id,
        "ERROR",
        "Invalid status code: 422",
    )
    assert failed["payload"]["detail"][0]["loc"] == ["body", "image_urls"]
    cancelled = posts["/stopped"]["body"]
    assert (cancelled["status"], cancelled["error"]) == ("ERROR", "Invalid status code: 400")
    assert "cancelled" in cancelled["payload"]["detail"]


def test_fal_webhook_must_be_an_http_url(server: FalServer) -> None:
    fal = server.fal
    with pytest.raises(fal.FalClientHTTPError) as refused:
        server.client().submit(T2I, {"prompt": "x"}, webhook_url="ftp://example.com/hook")
    assert refused.value.status_code == 422
    [item] = refused.value.message
    assert item["loc"] == ["body", "fal_webhook"] and "http" in item["msg"]


def test_rate_limits_and_quotas_hold_for_fal_routes(make_app: Any) -> None:
    """fal's answer to both is 429 with ``Retry-After`` (which ``fal_client`` retries, so httpx asks here)."""
    app = make_app(model={"workers": 0}, max_queued_tasks=1)
    headers = {"Authorization": f"Key {app.creds.api_key}:{app.creds.api_secret}"}
    first = app.http.post(f"/fal/queue/{T2I}", json={"prompt": "a queued fox"}, headers=headers)
    assert first.status_code == 200 and first.json()["queue_position"] == 0
    assert first.headers["x-fal-request-id"] == first.json()["request_id"]
    over = app.http.post(f"/fal/queue/{T2I}", json={"prompt": "one fox too many"}, headers=headers)
    assert over.status_code == 429 and over.headers["retry-after"] == "5"
    assert "unfinished" in over.json()["detail"]
    limited = make_app(model={"workers": 0}, rate_limit_per_minute=1, rate_limit_burst=1)
    headers = {"Authorization": f"Key {limited.creds.api_key}:{limited.creds.api_secret}"}
    assert limited.http.post(f"/fal/queue/{T2I}", json={"prompt": "a fox"}, headers=headers).status_code == 200
    again = limited.http.post(f"/fal/queue/{T2I}", json={"prompt": "a fox"}, headers=headers)
    assert again.status_code == 429 and int(again.headers["retry-after"]) >= 1
