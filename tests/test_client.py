"""The SDK without a dreamserve server: request shapes on ``httpx.MockTransport``, the socket against a
small scripted websockets server, and the signature against api-spec.md's test vectors."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection as AsyncServerConnection
from websockets.asyncio.server import serve as async_serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from dreamserve.cli.generate import _credentials
from dreamserve.client import AsyncClient, Client, Event, ImageInput, RunResult, TransportError
from dreamserve.errors import (
    AuthError,
    DreamError,
    InvalidRequest,
    InvalidState,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
    TaskFailed,
)
from dreamserve.signing import auth_headers, sign, verify

Handler = Callable[[httpx.Request], httpx.Response]
PNG = b"\x89PNG\r\n\x1a\n fake"


def ok(**fields: Any) -> httpx.Response:
    return httpx.Response(200, json={"errors": [], **fields, "result": True})


def task(status: str, pexit: str = "", **fields: Any) -> dict[str, Any]:
    return {"id": "7", "socketaccesstoken": "tok", "status": status, "pexit": pexit, "outputs": [], **fields}


def make_client(handler: Handler, secret: str | None = "secret", **kwargs: Any) -> Client:
    return Client("http://server", "key", secret, transport=httpx.MockTransport(handler), **kwargs)


# -- signing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "secret", "nonce", "signature"),
    [
        (
            "test-api-key",
            "test-secret",
            "1700000000000",
            "2d99fa1b6934f66a712785d1b402997e1b13d9d7cd5e0085211dac133ae4a8ef",
        ),
        ("api", "secret", "nonce-1", "d453af9a65c4ddd1ff17d5b03d3224b906899f3445dc4b4aadb5580260c60586"),
    ],
)
def test_wiro_signature_vectors(key: str, secret: str, nonce: str, signature: str) -> None:
    assert sign(key, secret, nonce) == signature
    assert verify(key, secret, nonce, signature.upper())
    assert not verify(key, secret, nonce + "0", signature)
    assert not verify(key, secret, nonce, "é" * 64)  # non-ASCII header: False, not TypeError
    assert auth_headers(key, secret, nonce) == {"x-api-key": key, "x-nonce": nonce, "x-signature": signature}
    assert auth_headers(key, None) == {"x-api-key": key}


def test_default_nonce_is_unix_seconds() -> None:
    headers = auth_headers("k", "s")
    assert len(headers["x-nonce"]) == 10 and verify("k", "s", headers["x-nonce"], headers["x-signature"])


def test_client_signs_every_request_with_a_fresh_nonce_and_key_only_sends_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(tasklist=[task("task_queue")])

    with make_client(handler) as client:
        client.detail(taskid="7")
        client.detail(tasktoken="tok")
    nonces = [int(r.headers["x-nonce"]) for r in seen]
    assert nonces[0] < nonces[1] and len(str(nonces[0])) == 13  # milliseconds, strictly increasing
    assert all(verify("key", "secret", r.headers["x-nonce"], r.headers["x-signature"]) for r in seen)
    assert [json.loads(r.content) for r in seen] == [{"taskid": "7"}, {"tasktoken": "tok"}]
    assert seen[0].url == "http://server/v1/Task/Detail"

    with make_client(handler, secret=None) as client:
        client.detail(taskid="7")
    assert seen[-1].headers["x-api-key"] == "key" and "x-signature" not in seen[-1].headers


# -- Run --------------------------------------------------------------------------------------------


def test_run_sends_files_and_urls_in_one_repeated_field_in_order(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(taskid="7", socketaccesstoken="tok")

    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    images: list[ImageInput] = ["https://example.com/hat.jpg", image, b"\xff\xd8\xff jpeg bytes"]
    with make_client(handler) as client:
        result = client.run("a cat", images=images, size="2K", max_images=2, watermark=True, seed=3)
    assert result == RunResult("7", "tok")
    request = seen[0]
    assert request.url.path == "/v1/Run/bytedance/seedream-v4"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert verify("key", "secret", request.headers["x-nonce"], request.headers["x-signature"])
    body = request.content.decode("latin-1")
    for name, value in [("prompt", "a cat"), ("size", "2K"), ("maxImages", "2"), ("watermark", "true"), ("seed", "3")]:
        assert f'name="{name}"\r\n\r\n{value}\r\n' in body
    # The three references, in the caller's order: the URL as a plain field, then the two files.
    parts = [body.index(marker) for marker in ("hat.jpg", 'filename="cat.png"', 'filename="image-2.jpg"')]
    assert body.count('name="inputImage"') == 3 and parts == sorted(parts)
    assert "Content-Type: image/png" in body and "Content-Type: image/jpeg" in body


def test_run_without_files_is_wiro_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(taskid="1", socketaccesstoken="t")

    with make_client(handler) as client:
        client.run("x", model="ByteDance/seedream-v4", images=["https://e.com/a.png"], callback_url="https://cb")
        client.run("y", priority=2)
    assert seen[0].url.path == "/v1/Run/ByteDance/seedream-v4"
    assert seen[0].headers["content-type"] == "application/json"
    assert json.loads(seen[0].content) == {
        "prompt": "x",
        "maxImages": 1,
        "watermark": "false",
        "callbackUrl": "https://cb",
        "inputImage": ["https://e.com/a.png"],
    }
    assert json.loads(seen[1].content) == {"prompt": "y", "maxImages": 1, "watermark": "false", "priority": 2}


def test_a_missing_input_file_is_reported_before_sending(tmp_path: Path) -> None:
    with make_client(lambda r: ok()) as client, pytest.raises(InvalidRequest, match="missing.png"):
        client.run("x", images=[tmp_path / "missing.png"])


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "message", "error"),
    [
        (401, 0, "Project authorization is not valid.", AuthError),
        (200, 0, "Project authorization is not founded.", AuthError),
        (200, 0, "Request parameter [size] is not a size", InvalidRequest),
        (200, 1, "There is no task yet.", NotFound),
        (200, 1, "Task is not in a cancellable state.", InvalidState),
        (200, 1, "Task could not be killed: task 7 is already finished.", InvalidState),
        (429, 96, "Slow down.", RateLimited),
        (200, 96, "You have reached your concurrent task limit.", RateLimited),
        (404, 0, "Error parsing url.", RouteNotFound),
        (500, 0, "Internal server error.", TransportError),
    ],
)
def test_error_envelope_raises_the_matching_class(
    status: int, code: int, message: str, error: type[DreamError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"result": False, "errors": [{"code": code, "message": message}]}
        return httpx.Response(status, json=body, headers={"retry-after": "3"})

    with make_client(handler) as client, pytest.raises(error) as info:
        client.detail(taskid="1")
    assert info.value.message == message
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 3


@pytest.mark.parametrize(
    ("status", "item", "error"),
    [
        # dreamserve names the class in ``type``; the English wording no longer matters.
        (200, {"code": 1, "message": "Nope.", "type": "invalid_state"}, InvalidState),
        (200, {"code": 1, "message": "Task is not in a cancellable state.", "type": "not_found"}, NotFound),
        (200, {"code": 0, "message": "Bad.", "type": "invalid_request", "param": "size"}, InvalidRequest),
        (413, {"code": 0, "message": "Too big.", "type": "request_too_large"}, RequestTooLarge),
        (405, {"code": 0, "message": "Error parsing url.", "type": "method_not_allowed"}, MethodNotAllowed),
        (429, {"code": 96, "message": "Slow.", "type": "rate_limited"}, RateLimited),
        (500, {"code": 0, "message": "Task 1 failed.", "type": "task_failed"}, TaskFailed),
        (500, {"code": 0, "message": "Internal server error.", "type": "server_error"}, TransportError),
        (200, {"code": 0, "message": "From a newer server.", "type": "no_such_type"}, InvalidRequest),
    ],
)
def test_error_type_maps_back_to_the_class(status: int, item: dict[str, Any], error: type[DreamError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"result": False, "errors": [item]}, headers={"retry-after": "2"})

    with make_client(handler) as client, pytest.raises(error) as info:
        client.detail(taskid="1")
    assert type(info.value) is error and info.value.message == item["message"]
    assert info.value.param == item.get("param")


def test_non_wiro_answers_and_network_failures_are_transport_errors() -> None:
    with make_client(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>")) as client:
        with pytest.raises(TransportError, match="Bad Gateway") as info:
            client.detail(taskid="1")
        assert info.value.status_code == 502

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with make_client(refuse) as client, pytest.raises(TransportError, match="ConnectError"):
        client.run("x")


def test_cancel_and_kill_read_the_tasklist_or_fall_back_to_detail() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/Task/Cancel":
            return ok(tasklist=[task("task_cancel", "130")])
        if request.url.path == "/v1/Task/Kill":
            return ok()  # Wiro's clients rely on `result` alone
        return ok(tasklist=[task("task_cancel", "137")])

    with make_client(handler) as client:
        assert client.cancel("7").pexit == "130"
        assert client.kill(7).pexit == "137"
    assert paths == ["/v1/Task/Cancel", "/v1/Task/Kill", "/v1/Task/Detail"]


# -- task objects and events ------------------------------------------------------------------------


def test_task_properties_keep_the_wire_object() -> None:
    raw = task("task_postprocess_end", "0", outputs=[{"name": "0.png", "url": "http://x/0.png"}], extra="kept")
    with make_client(lambda r: ok(total="1", tasklist=[raw])) as client:
        done = client.detail(taskid="7")
    assert done.data == raw and done.is_terminal and done.succeeded and done.outputs[0]["name"] == "0.png"
    failed = type(done)(task("task_postprocess_end", "1", debugerror="CUDA out of memory"))
    assert failed.is_terminal and not failed.succeeded and failed.debugerror == "CUDA out of memory"
    assert type(done)(task("task_error")).is_terminal  # Detail's fatal pre-run status
    assert not type(done)(task("task_start")).is_terminal


def test_event_parsing_progress_queue_position_and_outputs() -> None:
    progress = {"type": "progressGenerate", "percentage": "60", "stepCurrent": "6", "stepTotal": "10"}
    as_string = Client._event(json.dumps({"type": "task_output", "id": "7", "message": json.dumps(progress)}))
    assert as_string is not None and as_string.progress is not None
    assert (as_string.progress.step, as_string.progress.total, as_string.progress.percentage) == (6, 10, 60.0)
    numeric = Event("task_output", "7", message={"percentage": 10, "stepCurrent": 1, "remainingTime": "3s"})
    assert numeric.progress is not None and numeric.progress.step == 1 and numeric.progress.remaining == "3s"
    assert Event("task_output", "7", message="plain log line").progress is None
    assert Event("task_queue", "7", message={"position": "3"}).queue_position == 3
    assert Event("task_queue", "7").queue_position is None
    end = Client._event(json.dumps({"type": "task_postprocess_end", "id": "7", "message": [{"url": "u"}]}))
    assert end is not None and end.is_terminal and end.outputs == [{"url": "u"}]
    assert Event("task_cancel", "7", message="cancelled").is_terminal
    assert not Event("task_error", "7", message="stderr line").is_terminal  # interim log, not failure
    assert Client._event("not json") is None and Client._event('{"type": "connected"}') is None
    with pytest.raises(NotFound, match="No task"):
        Client._event(json.dumps({"type": "error", "message": "No task has that tasktoken.", "result": False}))


@contextmanager
def socket_server(frames: list[Any]) -> Iterator[tuple[str, list[Any]]]:
    """A websockets server that records the registration, then plays ``frames`` and waits for the close."""
    registrations: list[Any] = []

    def handler(ws: ServerConnection) -> None:
        registrations.append(json.loads(ws.recv()))
        for frame in frames:
            ws.send(frame if isinstance(frame, str) else json.dumps(frame))
        with suppress(ConnectionClosed):
            ws.recv()

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/v1", registrations
        server.shutdown()


def frame(kind: str, message: Any = None) -> dict[str, Any]:
    return {"type": kind, "id": "7", "tasktoken": "tok", "message": message, "result": True}


FRAMES = [
    {"type": "connected", "version": "1.0"},
    frame("task_queue", {"position": "2"}),
    frame("task_start"),
    frame("task_output", json.dumps({"type": "progressGenerate", "stepCurrent": "1", "stepTotal": "2"})),
    frame("task_postprocess_end", [{"name": "0.png", "url": "http://server/v1/File/k/0.png"}]),
    frame("task_output", "never read: the stream ends at the terminal event"),
]


def test_wait_follows_the_socket_then_reads_detail() -> None:
    done = task("task_postprocess_end", "0", outputs=[{"name": "0.png", "url": "http://server/v1/File/k/0.png"}])
    with socket_server(FRAMES) as (url, registrations), make_client(lambda r: ok(tasklist=[done]), socket_url=url) as c:
        seen: list[Event] = []
        final = c.wait(tasktoken="tok", on_event=seen.append)
    assert registrations == [{"type": "task_info", "tasktoken": "tok"}]
    assert [e.type for e in seen] == ["task_queue", "task_start", "task_output", "task_postprocess_end"]
    assert seen[0].queue_position == 2 and seen[2].progress is not None and seen[2].progress.total == 2
    assert final.succeeded and final.outputs[0]["name"] == "0.png"


def test_wait_lets_errors_of_on_event_through() -> None:
    def on_event(event: Event) -> None:
        raise InvalidRequest("the consumer's own error")

    with (
        socket_server(FRAMES) as (url, _),
        make_client(lambda r: ok(), socket_url=url) as client,
        pytest.raises(InvalidRequest, match="consumer"),
    ):
        client.wait(tasktoken="tok", on_event=on_event)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_wait_falls_back_to_polling_detail_when_the_socket_fails() -> None:
    answers = [
        task("task_queue"),
        task("task_start", progress={"stepCurrent": "1", "stepTotal": "4"}),
        task("task_start", progress={"stepCurrent": "1", "stepTotal": "4"}),
        task("task_postprocess_end", "0"),
    ]
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return ok(tasklist=[answers.pop(0)])

    seen: list[Event] = []
    with make_client(handler, socket_url=closed_port_url()) as client:
        final = client.wait(taskid="7", poll=(0.0,), on_event=seen.append)
    assert final.succeeded
    # A taskid is resolved to the token first (the socket needs it); then Detail polls by token.
    assert bodies[0] == {"taskid": "7"} and bodies[1:] == [{"tasktoken": "tok"}] * 3
    assert [e.type for e in seen] == ["task_start", "task_output", "task_postprocess_end"]


def flaky_detail(*answers: dict[str, Any]) -> Handler:
    """Detail that first refuses the connection, then answers ``answers`` in turn: a restarting server."""
    replies: list[dict[str, Any] | None] = [None, *answers]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = replies.pop(0)
        if answer is None:
            raise httpx.ConnectError("connection refused", request=request)
        return ok(tasklist=[answer])

    return handler


def test_wait_polls_on_through_a_transport_failure_and_a_run_raises_it() -> None:
    with make_client(flaky_detail(task("task_postprocess_end", "0")), socket_url=closed_port_url()) as client:
        assert client.wait(tasktoken="tok", poll=(0.0,)).succeeded
    with make_client(flaky_detail(), socket_url=closed_port_url()) as client:
        with pytest.raises(TransportError, match="POST http://server/v1/Run/.* failed: ConnectError") as info:
            client.run("x")
        assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_async_wait_polls_on_through_a_transport_failure() -> None:
    transport = httpx.MockTransport(flaky_detail(task("task_start"), task("task_cancel", "130")))
    async with AsyncClient("http://server", "k", None, transport=transport, socket_url=closed_port_url()) as c:
        assert (await c.wait(tasktoken="tok", poll=(0.0,))).status == "task_cancel"
    async with AsyncClient("http://server", "k", None, transport=httpx.MockTransport(flaky_detail())) as c:
        with pytest.raises(TransportError, match="ConnectError"):
            await c.detail(7)


def test_wait_gives_up_at_its_timeout() -> None:
    client = make_client(lambda r: ok(tasklist=[task("task_queue")]), socket_url=closed_port_url())
    with client, pytest.raises(TimeoutError, match="task_queue"):
        client.wait(tasktoken="tok", timeout=0.3, poll=(0.05,))


# -- downloads --------------------------------------------------------------------------------------


def test_download_follows_redirects_keeps_names_inside_the_folder(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/v1/File/"):
            return httpx.Response(307, headers={"location": "http://bucket/out/0.png?X-Amz-Signature=abc"})
        if request.url.host == "bucket":
            return httpx.Response(200, content=PNG)
        return httpx.Response(200, json={"result": False, "errors": [{"code": 1, "message": "File not found."}]})

    with make_client(handler) as client:
        path = client.download({"name": "0.png", "url": "http://server/v1/File/k/0.png"}, tmp_path / "out")
        evil = client.download({"name": "../../evil.png", "url": "http://server/v1/File/k/1.png"}, tmp_path)
        bare = client.download("http://server/v1/File/k/2%20b.png", tmp_path, filename="7-2.png")
        with pytest.raises(NotFound, match="File not found"):
            client.download("http://server/gone.png", tmp_path)
    assert path == tmp_path / "out" / "0.png" and path.read_bytes() == PNG
    assert evil == tmp_path / "evil.png" and bare.name == "7-2.png"
    assert "x-api-key" not in seen[0].headers  # output URLs are capabilities: credentials stay home
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7-2.png", "evil.png", "out"]  # no partial files


# -- AsyncClient ------------------------------------------------------------------------------------


async def test_async_client_runs_and_waits_over_its_socket(tmp_path: Path) -> None:
    async def handler(ws: AsyncServerConnection) -> None:
        assert json.loads(await ws.recv()) == {"type": "task_info", "tasktoken": "tok"}
        for item in FRAMES:
            await ws.send(json.dumps(item))

    def http(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/Run/"):
            return ok(taskid="7", socketaccesstoken="tok")
        return ok(tasklist=[task("task_postprocess_end", "0")])

    async with async_serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        async with AsyncClient("http://server", "k", "s", transport=httpx.MockTransport(http), socket_url=url) as c:
            run = await c.run("x", images=[PNG])
            events = [e async for e in c.events(run.socketaccesstoken)]
            final = await c.wait(tasktoken=run.socketaccesstoken)
    assert [e.type for e in events][-1] == "task_postprocess_end" and final.succeeded


async def test_async_wait_falls_back_to_polling() -> None:
    answers = [task("task_start"), task("task_cancel", "130")]
    transport = httpx.MockTransport(lambda r: ok(tasklist=[answers.pop(0)]))
    async with AsyncClient("http://server", "k", None, transport=transport, socket_url=closed_port_url()) as c:
        final = await c.wait(tasktoken="tok", poll=(0.0,))
    assert final.status == "task_cancel" and final.is_terminal and not final.succeeded


async def test_both_faces_send_the_same_requests_and_read_the_same_answers(tmp_path: Path) -> None:
    # One implementation behind both: every call, the fallbacks included, makes the same requests in the same order.
    def server(log: list[tuple[str, str, bytes]]) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            log.append((request.method, request.url.path, b"" if b"--" in request.content else request.content))
            if request.url.path == "/v1/Task/Kill":
                return ok()
            if request.url.path == "/v1/File/Upload":
                return ok(list=[{"url": "http://server/v1/File/k/a.png"}])
            if request.url.path.startswith("/v1/File/k/"):
                return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
            if request.url.path.startswith("/v1/Run/"):
                return ok(taskid="7", socketaccesstoken="tok")
            return ok(tasklist=[task("task_postprocess_end", "0")])

        return handler

    sync_log: list[tuple[str, str, bytes]] = []
    async_log: list[tuple[str, str, bytes]] = []
    url = closed_port_url()
    with make_client(server(sync_log), socket_url=url) as c:
        answers = [
            c.run("x", images=["http://elsewhere/a.png"], seed=3),
            c.upload(PNG)["url"],
            c.kill(7).status,
            c.wait(taskid=7, poll=(0.0,)).status,
            c.download("http://server/v1/File/k/0.png", tmp_path / "sync").read_bytes(),
        ]
    transport = httpx.MockTransport(server(async_log))
    async with AsyncClient("http://server", "key", "secret", transport=transport, socket_url=url) as a:
        async_answers = [
            await a.run("x", images=["http://elsewhere/a.png"], seed=3),
            (await a.upload(PNG))["url"],
            (await a.kill(7)).status,
            (await a.wait(taskid=7, poll=(0.0,))).status,
            (await a.download("http://server/v1/File/k/0.png", tmp_path / "async")).read_bytes(),
        ]
    assert answers == async_answers and answers[-1] == PNG
    assert sync_log == async_log and [path for _, path, _ in sync_log][:3] == [
        "/v1/Run/bytedance/seedream-v4",
        "/v1/File/Upload",
        "/v1/Task/Kill",
    ]


# -- the CLI's credentials --------------------------------------------------------------------------


def test_cli_credentials_come_from_flags_then_env_then_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DREAMSERVE_API_KEY", "DREAMSERVE_API_SECRET", "DREAMSERVE_SERVER", "DREAMSERVE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    stored = {"api_key": "file-key", "api_secret": "file-secret", "server": "http://file:1", "project_id": 1}
    (tmp_path / "credentials.json").write_text(json.dumps(stored))
    assert _credentials(None, None, None, tmp_path) == ("http://file:1", "file-key", "file-secret")
    monkeypatch.setenv("DREAMSERVE_API_KEY", "env-key")
    monkeypatch.setenv("DREAMSERVE_SERVER", "env:2")
    # The file's secret belongs to another key: it is not used to sign env-key's requests.
    assert _credentials(None, None, None, tmp_path) == ("http://env:2", "env-key", None)
    monkeypatch.setenv("DREAMSERVE_API_SECRET", "env-secret")
    assert _credentials(None, None, None, tmp_path) == ("http://env:2", "env-key", "env-secret")
    assert _credentials("http://flag:3", "file-key", None, tmp_path) == ("http://flag:3", "file-key", "file-secret")
    assert _credentials(None, "k", "s", tmp_path)[1:] == ("k", "s")
