"""The OpenAI-compatible images API, driven by the official ``openai`` package against a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
import typing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy
from openai.types.image_generate_params import ImageGenerateParamsBase
from PIL import Image

from dreamserve.api.app import create_app
from dreamserve.dialects.openai.decode import OPENAI_SIZES, generation_size
from dreamserve.projects import create_project
from dreamserve.settings import ModelSpec, Settings
from dreamserve.sizes import parse_size
from tests.conftest import MODEL, SCRIPTED_SLOW, LiveServer, png_bytes, until


def _client(server: Any) -> openai.OpenAI:
    """The SDK over the tier's own HTTP client: a socket for a server, the ASGI app for ``make_app``."""
    creds = server.creds
    key = f"{creds.api_key}:{creds.api_secret}"
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, http_client=server.http)


def _image(b64: str | None) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64 or "")))


def test_generate_url_and_b64(tiny_server: LiveServer) -> None:
    server = tiny_server
    client = _client(server)
    result = client.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk", n=2, size="1024x1024")
    assert len(result.data or []) == 2 and all(item.url for item in result.data or [])
    assert result.created > 0 and result.size == "1024x1024"
    image = Image.open(io.BytesIO(server.http.get(result.data[0].url or "").content))  # type: ignore[index]
    assert image.size == (1024, 1024)
    extra: dict[str, Any] = result.model_extra or {}
    # Beyond OpenAI: the task is an ordinary task of the project, listed, followed and detailed like any other.
    task = server.detail(extra["task_id"])
    assert task["status"] == "task_postprocess_end" and task["parameters"]["maxImages"] == "2"
    assert task["socketaccesstoken"] == extra["socketaccesstoken"]
    listed = server.post("/v1/Task/List", json={}).json()["tasklist"]
    assert [t["id"] for t in listed] == [extra["task_id"]]

    encoded = client.images.generate(prompt="same, inline", size="1536x1024", response_format="b64_json")
    assert _image(encoded.data[0].b64_json).size == (1536, 1024)  # type: ignore[index]
    jpeg = client.images.generate(prompt="as jpeg", size="2K", response_format="b64_json", output_format="jpeg")
    picture = _image(jpeg.data[0].b64_json)  # type: ignore[index]
    assert picture.format == "JPEG" and picture.size == (2048, 2048) and jpeg.output_format == "jpeg"

    # OpenAI's small sizes, under Seedream's floor: generated at 960x960 and downscaled. And its widest.
    for size in ("256x256", "512x512", "1792x1024"):
        result = client.images.generate(prompt=f"at {size}", size=size, response_format="b64_json")  # type: ignore[arg-type]
        width, height = (int(side) for side in size.split("x"))
        assert _image(result.data[0].b64_json).size == (width, height) and result.size == size  # type: ignore[index]
        task = server.detail((result.model_extra or {})["task_id"])
        assert task["parameters"]["size"] == size
        assert ("downscaled to" in task["details"]["method"]) == (width * height < 1280 * 720), task["details"]


def test_every_size_the_openai_package_lists_is_accepted() -> None:
    """Below Seedream's 1280x720 floor (256x256, 512x512), images are generated at the smallest size of the same
    aspect with at least ``min_pixels``, then downscaled; the others are generated as asked."""
    size_type = typing.get_type_hints(ImageGenerateParamsBase)["size"]
    listed = {arg for part in typing.get_args(size_type) for arg in typing.get_args(part)}
    assert {"256x256", "512x512", "1792x1024", "auto"} <= listed and listed == set(OPENAI_SIZES)
    floor = 1280 * 720
    for size in listed:
        generated, output = generation_size(size, floor)
        if size == "auto":
            assert (generated, output) == ("1K", None)
            continue
        width, height = parse_size(generated, min_pixels=floor)
        requested = tuple(int(side) for side in size.split("x"))
        if requested[0] * requested[1] >= floor:
            assert ((width, height), output) == (requested, None)
        else:
            assert output == requested and width * height >= floor and width * requested[1] == height * requested[0]
    assert generation_size("256x256", floor) == ("960x960", (256, 256))
    assert generation_size("256x256", 64 * 64) == ("256x256", None)  # a server that generates that small
    assert generation_size("10x10", floor) == ("10x10", None)  # refused by Seedream's check, in its words


def test_edit_with_several_images_url_and_b64(tiny_server: LiveServer) -> None:
    server = tiny_server
    client = _client(server)
    images = [("a.png", png_bytes(80, 80), "image/png"), ("b.png", png_bytes(96, 64, (0, 0, 200)), "image/png")]
    result = client.images.edit(image=images, prompt="put the blue thing on the red thing", size="1024x1024")
    assert len(result.data or []) == 1 and result.data[0].url  # type: ignore[index]
    extra: dict[str, Any] = result.model_extra or {}
    task = server.detail(extra["task_id"])
    assert len(task["parameters"]["inputImage"]) == 2 and task["pexit"] == "0"

    # One file in the plain ``image`` field, two images back inline; "auto" follows the reference's 16:9.
    wide = ("wide.png", png_bytes(160, 90), "image/png")
    inline = client.images.edit(image=wide, prompt="the same, at night", n=2, size="auto", response_format="b64_json")
    assert [_image(item.b64_json).size for item in inline.data or []] == [(1280, 720), (1280, 720)]


def test_bearer_rules_and_errors_in_openai_shape(make_app: Any) -> None:
    server = make_app(model={"workers": 0})
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0, http_client=server.http)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.images.generate(prompt="x")
    assert denied.value.code == "invalid_api_key"
    # A signature project refuses its key without the secret: OpenAI clients cannot sign, so the secret goes along.
    keyonly = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=server.creds.api_key, max_retries=0, http_client=server.http
    )
    with pytest.raises(openai.AuthenticationError) as info:
        keyonly.images.generate(prompt="x")
    assert "secret" in str(info.value)

    client = _client(server)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="10x10")
    assert bad.value.param == "size" and "[size]" in bad.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as many:
        client.images.generate(prompt="x", n=16)
    # Our field is maxImages; the message speaks OpenAI's names.
    assert many.value.param == "n" and "[n]" in many.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as empty:
        client.images.generate(prompt="")
    assert empty.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as noimage:
        client.images.edit(image=[], prompt="x")
    assert noimage.value.param == "image"
    raw = server.http.post(
        "/v1/images/generations",
        headers={"Authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"},
        json={"prompt": "x", "response_format": "url", "output_format": "webp"},
    )
    error = raw.json()["error"]
    assert raw.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "output_format"


def test_key_only_project_takes_the_bare_key(tiny_server: LiveServer) -> None:
    server = tiny_server
    other = create_project(server.settings, "key-only", signature=False)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=other.api_key, max_retries=0, http_client=server.http)
    result = client.images.generate(prompt="a red kite", size="1K")
    assert result.data and result.data[0].url


def test_client_that_hangs_up_cancels_its_task(shared_server: Any) -> None:
    server = shared_server(**SCRIPTED_SLOW)  # a real socket to hang up on; no pipeline needed
    body = json.dumps({"prompt": "slow", "size": "1K"}).encode()
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.creds.api_key}:{server.creds.api_secret}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=10) as client:
        client.sendall(head.encode() + body)
        deadline = time.monotonic() + 30
        while not (tasks := server.post("/v1/Task/List", json={}).json()["tasklist"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tasks) == 1
        server.wait_progress(tasks[0]["id"])  # it runs, and its client is still waiting for the images
    # The client has hung up (its socket is closed): the cancel ends the task at its next step.
    task = server.wait(tasks[0]["id"], timeout=60)
    assert task["status"] == "task_cancel" and task["pexit"] == "130", "nobody can fetch its images"


def test_synchronous_waits_are_capped_per_project(make_live: Any) -> None:
    # No model worker: every task stays queued, so each request waits until its client hangs up. The waiting
    # requests are sent on raw sockets and hung up by closing them when the test is done, not by a client timeout.
    server = make_live(model={"workers": 0}, sync_max_per_project=2, sync_wait_seconds=60)
    other = create_project(server.settings, "other", signature=True)
    waits = server.services._sync_waiting

    def hold(creds: Any) -> socket.socket:
        """A synchronous request left waiting for its answer: closing the socket hangs up."""
        body = json.dumps({"prompt": "q"}).encode()
        head = (
            "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {creds.api_key}:{creds.api_secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock = socket.create_connection(("127.0.0.1", server.settings.port), timeout=10)
        sock.sendall(head.encode() + body)
        return sock

    def unanswered(sock: socket.socket) -> bool:
        """Nothing came back on it yet (no answer, no hang-up of the server's)."""
        sock.setblocking(False)
        try:
            sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            sock.setblocking(True)
        return False

    def tasks(creds: Any = None) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = server.post("/v1/Task/List", creds, json={}).json()["tasklist"]
        return listed

    waiting = [hold(server.creds) for _ in range(2)]
    project = server.creds.project_id
    until(lambda: waits.get(project) == 2 and len(tasks()) == 2, "both requests to be let in and wait", 30)
    headers = {"Authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"}
    refused = httpx.post(f"{server.url}/v1/images/generations", headers=headers, json={"prompt": "q"}, timeout=10)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
    assert "2 synchronous image requests waiting" in refused.json()["error"]["message"]
    theirs = hold(other)  # another project has its own places
    until(lambda: waits.get(other.project_id) == 1 and len(tasks(other)) == 1, "the other project's request", 30)
    assert all(unanswered(sock) for sock in [*waiting, theirs]), "let in requests wait for their task"
    for sock in [*waiting, theirs]:
        sock.close()
    # The clients hung up: their tasks are cancelled and their places free again.
    until(lambda: project not in waits, "the hung-up requests' places to free", 30)
    listed = tasks()
    assert [task["status"] for task in listed] == ["task_cancel", "task_cancel"], listed
    again = hold(server.creds)
    until(lambda: waits.get(project) == 1 and len(tasks()) == 3, "a freed place to let a request in", 30)
    assert unanswered(again)
    again.close()


async def test_synchronous_waits_do_not_poll_the_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models={MODEL: ModelSpec(workers=0)}, sync_max_per_project=8)
    creds = await asyncio.to_thread(create_project, settings, "waits", signature=False)
    app = create_app(settings)
    statements = 0

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal statements  # reads of one task row: what a polling wait does
        statements += "WHERE tasks.id = ?" in statement

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as http,
    ):
        services = app.state.services
        headers = {"Authorization": f"Bearer {creds.api_key}"}
        calls = [
            asyncio.create_task(http.post("/v1/images/generations", headers=headers, json={"prompt": f"{n}"}))
            for n in range(8)
        ]
        async with asyncio.timeout(20):
            while (await services.store.list_ids(creds.project_id, start=0, limit=20))[1] < 8:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        sqlalchemy.event.listen(services.engine.sync_engine, "before_cursor_execute", count)
        await asyncio.sleep(2.0)
        sqlalchemy.event.remove(services.engine.sync_engine, "before_cursor_execute", count)
        # Polling every 0.1 s would be 160 queries; waits on the hub read the row once per 5 s at most.
        assert statements <= 8, statements
        # An end published on the hub answers its waiting request at once.
        ids, _ = await services.store.list_ids(creds.project_id, start=0, limit=20)
        started = time.monotonic()
        for task_id in ids:
            await services.store.cancel_queued(task_id)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert time.monotonic() - started < 5
        assert [a.status_code for a in answers] == [400] * 8
        assert all("was cancelled" in a.json()["error"]["message"] for a in answers)
