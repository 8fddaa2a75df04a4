"""Issue 11 through the real server: a socket flood, a decompression bomb, oversized JSON, connections that
never finish their headers, slow and failing callback receivers. The "public attacker host" is an HTTP
server on 127.0.0.2 that the server allow-lists (``fetch_allow_hosts``); a second tenant's callback
receiver listens on 127.0.0.3. One server serves the whole module, started with a soft open-file limit of
256 (``serve`` must raise it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dreamserve.projects import Credentials, create_project
from tests.conftest import MODEL, SCRIPTED, App, Server, free_port, launch, open_app

#: The bomb: this many bytes of zeros, gzipped twice (about 12.6 kB on the wire).
BOMB_BYTES = 1 << 30
SERVER_NOFILE_SOFT = 256


def double_gzip(size: int) -> bytes:
    inner = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [inner.compress(zeros) for _ in range(size // len(zeros))]
    parts.append(inner.flush())
    outer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return outer.compress(b"".join(parts)) + outer.flush()


@dataclass
class Attacker:
    """The HTTP servers on 127.0.0.2 (attacker, slow receiver) and 127.0.0.3 (another tenant's receiver)."""

    port: int
    bomb: bytes = b""
    #: Seconds the slow receiver takes to answer each callback (it stops waiting when the client hangs up).
    slow_seconds: float = 30.0
    posts: dict[str, list[float]] = field(default_factory=dict)
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    making: threading.Thread | None = None

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    state = Attacker(port=free_port())
    # Made while the server starts; the bomb test waits for it.
    state.making = threading.Thread(target=lambda: setattr(state, "bomb", double_gzip(BOMB_BYTES)), daemon=True)
    state.making.start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-encoding", "gzip, gzip")
            self.send_header("content-length", str(len(state.bomb)))
            self.end_headers()
            self.wfile.write(state.bomb)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            state.posts.setdefault(self.path, []).append(time.monotonic())
            if self.path == "/slow":
                with state.lock:
                    state.active += 1
                    state.max_active = max(state.max_active, state.active)
                self._linger(state.slow_seconds)
                with state.lock:
                    state.active -= 1
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def _linger(self, seconds: float) -> None:
            """Wait ``seconds``, or less if the client hangs up (it gave up: no longer in flight for it)."""
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                readable, _, _ = select.select([self.connection], [], [], 0.05)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return

        def log_message(self, *args: Any) -> None:
            pass

    servers = [ThreadingHTTPServer((host, state.port), Handler) for host in ("127.0.0.2", "127.0.0.3")]
    for httpd in servers:
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def _low_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE_SOFT, hard))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, attacker: Attacker) -> Iterator[Server]:
    server = launch(
        tmp_path_factory,
        tmp_path_factory.mktemp("hardening"),
        start=False,
        allow_private=False,
        fetch_allow_hosts=["127.0.0.2", "127.0.0.3"],
        callback_allow_hosts=["127.0.0.2", "127.0.0.3"],
        # The scripted model process (no torch: no model load): these tests need tasks to run, not a pipeline.
        model={"engine": SCRIPTED, "max_pixels": 64 * 64, "steps": 2},
        min_pixels=64 * 64,
        socket_max_per_address=6,
        socket_max_tasks=2,
        socket_max_bad_frames=5,
        webhook_timeout_seconds=3,
        webhook_per_host=2,
        webhook_breaker_failures=3,
        webhook_breaker_seconds=60,
        webhook_attempts=10,
        # A failed callback is not retried within the test: the breaker counts distinct deliveries.
        webhook_backoff_seconds=60,
        http_keepalive_seconds=1,
    )
    server.preexec = _low_nofile
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The server's callback settings on an in-process app, for the webhook test (no socket of its own needed)."""
    app = open_app(
        tmp_path_factory.mktemp("hooks"),
        allow_private=False,
        fetch_allow_hosts=["127.0.0.2", "127.0.0.3"],
        callback_allow_hosts=["127.0.0.2", "127.0.0.3"],
        model={"engine": SCRIPTED, "max_pixels": 64 * 64, "steps": 2},
        min_pixels=64 * 64,
        webhook_timeout_seconds=3,
        webhook_per_host=2,
        webhook_breaker_failures=3,
        webhook_breaker_seconds=60,
        webhook_attempts=10,
        # A failed callback is not retried within the test: the breaker counts distinct deliveries.
        webhook_backoff_seconds=60,
    )
    yield app
    app.close()


def rss(server: Server) -> int:
    assert server.process is not None
    return int(psutil.Process(server.process.pid).memory_info().rss)


def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/v1"


def tiny(server: Server | App, creds: Credentials | None = None, **extra: Any) -> str:
    body = server.post(f"/v1/Run/{MODEL}", creds, json={"prompt": "x", "size": "64x64", **extra}).json()
    assert body["result"] is True, body
    return str(body["taskid"])


# -- 1. socket flood ---------------------------------------------------------------------------------------------


async def _junk(ws: Any, seconds: float) -> None:
    """Send junk registrations as fast as the server takes them, for ``seconds`` or until it closes the socket."""
    number = 0
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                number += 1
                await ws.send(json.dumps({"type": "task_info", "tasktoken": f"junk-{number}"}))
                await asyncio.sleep(0)  # let the client read what the server sent (its close, say)


def test_socket_flood_neither_freezes_the_api_nor_stops_generation(server: Server) -> None:
    async def flood() -> tuple[float, list[int | None]]:
        sockets = [await connect(ws_url(server), close_timeout=1) for _ in range(4)]
        await asyncio.gather(*(_junk(ws, 5.0) for ws in sockets))
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{server.url}/healthz")).status_code == 200
        answered = time.monotonic() - started
        for ws in sockets:
            await asyncio.wait_for(ws.wait_closed(), 30)
        return answered, [ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None for ws in sockets]

    answered, codes = asyncio.run(asyncio.wait_for(flood(), 60))
    assert answered < 2.0, f"the API took {answered:.1f} s to answer after the flood"
    assert codes == [1008] * 4, f"junk-sending sockets are closed with 1008 (policy violation): {codes}"
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["loops"] == [], ready.text
    assert server.wait(tiny(server), timeout=60)["pexit"] == "0"


def test_socket_rules_per_address_per_socket_and_repeated_tokens(server: Server) -> None:
    async def scenario() -> None:
        url = ws_url(server)
        sockets = [await connect(url) for _ in range(6)]
        try:
            # The client offers permessage-deflate; the server declines (ws_compression): zlib streams per socket
            # doubled a socket's memory and fragmented the heap under a flood.
            assert "permessage-deflate" in sockets[0].request.headers["Sec-WebSocket-Extensions"]
            assert "Sec-WebSocket-Extensions" not in sockets[0].response.headers
            with pytest.raises(ConnectionClosed) as closed:
                async with connect(url) as extra:
                    await asyncio.wait_for(extra.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert "task sockets from one address" in closed.value.rcvd.reason
            runs = [server.post(f"/v1/Run/{MODEL}", json={"prompt": "x", "size": "64x64"}).json() for _ in range(3)]
            tokens = [run["socketaccesstoken"] for run in runs]
            ws = sockets[0]
            # Registered while the tasks run: the same token twice is followed once; a third is over the limit.
            for token in (tokens[0], tokens[0], tokens[1], tokens[2]):
                await ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
            frames: list[dict[str, Any]] = []
            while sum(f["type"] == "task_postprocess_end" for f in frames) < 2:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            with pytest.raises(TimeoutError):
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 1)))
            errors = [f["message"] for f in frames if f["type"] == "error"]
            limit = "This socket already follows 2 tasks, the limit; open another socket, or wait for one to end."
            assert errors == [limit], errors
            ends = sorted(f["tasktoken"] for f in frames if f["type"] == "task_postprocess_end")
            assert ends == sorted(tokens[:2]), "each followed task ends once, the third is not followed"
            first = [f["type"] for f in frames if f.get("tasktoken") == tokens[0]]
            assert first.count("task_queue") == 1 and first.count("task_postprocess_end") == 1, first
        finally:
            for ws in sockets:
                await ws.close()
        await asyncio.sleep(0.5)
        # Closed sockets free their address's places, and an ended follower frees the socket's.
        async with connect(url) as again:
            await again.send(json.dumps({"type": "task_info", "tasktoken": tokens[2]}))
            frame = json.loads(await asyncio.wait_for(again.recv(), 5))
            assert frame["type"] != "error", frame

    asyncio.run(asyncio.wait_for(scenario(), 90))


# -- 2. decompression bomb ---------------------------------------------------------------------------------------


def test_double_gzip_bomb_fails_the_task_and_costs_no_memory(server: Server, attacker: Attacker) -> None:
    assert attacker.making is not None
    attacker.making.join(120)
    assert 0 < len(attacker.bomb) < 20_000, len(attacker.bomb)
    before = rss(server)
    taskid = tiny(server, inputImage=attacker.url("127.0.0.2", "/bomb.png"))
    task = server.wait(taskid, timeout=60)
    grown = rss(server) - before
    assert task["pexit"] == "2", task
    assert "Content-Encoding 'gzip, gzip'" in task["debugerror"] and "identity" in task["debugerror"], task
    assert grown < 100 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


# -- 3. JSON bodies ----------------------------------------------------------------------------------------------


def test_json_bodies_have_their_own_small_limit(server: Server) -> None:
    big = json.dumps({"prompt": "x" * (3 << 20), "size": "64x64"}).encode()
    before = rss(server)
    headers = {**server.headers(), "content-type": "application/json"}
    declared = httpx.post(f"{server.url}/v1/Run/{MODEL}", content=big, headers=headers, timeout=30)
    assert declared.status_code == 413, declared.text
    assert declared.json()["result"] is False and "1,048,576 bytes" in declared.json()["errors"][0]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    try:
        streamed = httpx.post(f"{server.url}/v1/Run/{MODEL}", content=chunks(), headers=headers, timeout=30)
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["errors"][0]["message"].startswith("The JSON body is larger than 1,048,576 bytes")
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # the server answered and closed before the client finished sending: refused either way
    assert server.wait(tiny(server), timeout=60)["pexit"] == "0", "a small JSON body still works"

    bearer = {"authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"}  # type: ignore[union-attr]
    openai = httpx.post(f"{server.url}/v1/images/generations", content=big, headers=bearer, timeout=30)
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "request_too_large", openai.text
    assert rss(server) - before < 50 * 2**20


# -- 4. connections that never finish their headers ---------------------------------------------------------------


def test_idle_and_half_open_connections_do_not_deny_service(server: Server) -> None:
    assert server.process is not None
    limits = psutil.Process(server.process.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert limits[0] == limits[1] > SERVER_NOFILE_SOFT, f"serve raises its soft open-file limit: {limits}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    half_open = []
    try:
        for _ in range(2 * SERVER_NOFILE_SOFT):
            conn = socket.create_connection(("127.0.0.1", server.settings.port), timeout=5)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            half_open.append(conn)
        time.sleep(0.5)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        # An idle keep-alive connection is closed after http_keepalive_seconds (1 s here).
        with socket.create_connection(("127.0.0.1", server.settings.port), timeout=6) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            started, answer = time.monotonic(), b""
            while chunk := idle.recv(65536):  # until the server closes it (socket.timeout after 6 s otherwise)
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            assert time.monotonic() - started < 5, "the server closes an idle keep-alive connection"
    finally:
        for conn in half_open:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- 6. webhooks ---------------------------------------------------------------------------------------------------


def deliveries(server: App, taskid: str, creds: Credentials | None = None) -> list[dict[str, Any]]:
    body = server.post("/v1/Task/Webhooks", creds, json={"taskid": taskid}).json()
    rows: list[dict[str, Any]] = body["deliveries"]
    return rows


def test_slow_failing_receiver_delays_nobody_else(hooks: App, attacker: Attacker) -> None:
    server = hooks
    other = create_project(server.settings, "other-tenant", signature=True)
    slow = [tiny(server, callbackUrl=attacker.url("127.0.0.2", "/slow")) for _ in range(8)]
    for taskid in slow:
        server.wait(taskid, timeout=60)
    mine = tiny(server, other, callbackUrl=attacker.url("127.0.0.3", "/fast"))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and server.detail(mine, other)["status"] != "task_postprocess_end":
        time.sleep(0.1)
    ended = time.monotonic()
    while time.monotonic() < deadline and not attacker.posts.get("/fast"):
        time.sleep(0.05)
    assert attacker.posts.get("/fast"), "the other tenant's callback arrived"
    delay = attacker.posts["/fast"][0] - ended
    # One at a time, it would wait behind 8 x 3 s of the slow receiver (9 s until the breaker, with one).
    assert delay < 7.0, f"the other tenant's callback waited {delay:.1f} s behind the slow receiver"
    # The slow receiver got its callbacks two at a time (webhook_per_host), each cut at 3 s, and after three
    # failures in a row it is left alone: the rest wait, postponed, without spending attempts.
    settle = time.monotonic() + 30
    while True:
        rows = [row for taskid in slow for row in deliveries(server, taskid)]
        if all(row["state"] == "pending" and row["lasterror"] for row in rows) or time.monotonic() > settle:
            break
        time.sleep(0.5)
    hits = len(attacker.posts.get("/slow", []))
    assert attacker.max_active == 2, attacker.max_active
    assert 3 <= hits <= 4, hits
    assert all(row["state"] == "pending" for row in rows), [(row["state"], row["lasterror"]) for row in rows]
    assert sum(int(row["attempts"]) for row in rows) == hits, rows
    assert all("took longer than 3 s" in row["lasterror"] or "circuit breaker" in row["lasterror"] for row in rows)
    assert sum("circuit breaker" in row["lasterror"] for row in rows) >= len(slow) - hits, rows
