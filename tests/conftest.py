"""Fixtures that run the real thing, in two tiers.

* ``make_app``: ``create_app(settings)`` in this process behind Starlette's ``TestClient`` (the lifespan runs, so
  the database, reaper, webhook loop and supervisors are real), for every test that needs no socket of a server.
  Fast: no interpreter start. ``shared_app`` keeps one per set of options for the session; ``scripted`` runs the
  scripted engine in the model process (the supervisor tier: no torch, steps as long as the test needs).
* ``make_live``: the same app served by uvicorn on a thread of this process, configured as ``serve`` configures it
  (``LiveServer``), for the tests that need a real socket (raw HTTP, WebSockets, hang-ups, TLS, write stalls, a
  browser, a CLI or curl in another process). No interpreter to start: a start costs what the app's lifespan and
  its model processes cost. ``shared_server`` starts one per set of options for the session, for all the tests
  that ask for the same; ``tiny_server`` (the tiny FLUX.2-klein pipeline in its spawned model process) is the
  common case: every test that needs the real pipeline and no options of its own uses it, so the session pays
  torch's imports and the pipeline's load for it once (an in-process ``TINY`` app beside it paid them again).
* ``make_server``: ``dreamserve serve`` in a subprocess, SQLite on disk, only for the tests that need its process
  (they kill it, restart it, sabotage its data folder or lower its descriptor limit). A start costs an
  interpreter's imports on top.

Shared apps and servers are seen through a project of the test's own, and what it leaves unfinished is cancelled
when it ends. Every tier gives the same helpers (``post``, ``run``, ``detail``, ``wait``, ``log``; ``http`` for any
other request), and a small HTTP server stands in for input URLs and callbacks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from PIL import Image
from starlette.testclient import TestClient

from dreamserve.projects import Credentials, create_project
from dreamserve.settings import ModelSpec, Settings
from dreamserve.signing import auth_headers
from dreamserve.sizes import MIN_PIXELS
from dreamserve.status import TaskStatus

MODEL = "bytedance/seedream-v4"
#: Fixtures that start a process of their own (a server, a browser, the diffusers model process of a shared app):
#: tests using them are not in the fast tier.
PROCESS_FIXTURES = frozenset(
    {"make_server", "make_live", "shared_server", "shared_app", "fuzz_server", "browser", "klein"}
)
#: Modules that run models in this process or kill processes on purpose.
PROCESS_MODULES = frozenset({"test_engine.py", "test_faults.py", "test_scaleout.py", "test_cli.py"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true", help="only the fast tier: in-process tests, no server, model or browser process"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fast"):
        return
    slow = [
        item
        for item in items
        if item.path.name in PROCESS_MODULES or PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


# `serve` saves its credentials for the CLI in the user's config folder: tests' servers never write the real one.
os.environ["DREAMSERVE_CONFIG_DIR"] = tempfile.mkdtemp(prefix="dreamserve-test-config-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_project(settings: Settings, name: str) -> Credentials:
    """A signature project, created in a thread of its own: the caller may be running an event loop (Playwright's
    sync API does), and ``create_project`` runs one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(create_project, settings, name, True).result()


def png_bytes(width: int = 96, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Certificates:
    """A CA made for this test session and a certificate it signed for 127.0.0.1 and localhost (PEM files)."""

    ca_file: Path
    certfile: Path
    keyfile: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts only the session's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@cache
def certificates(folder: Path) -> Certificates:
    """The session's certificates, written once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(files.certfile), append=i > 0)
    cert.private_key_pem.write_to_path(str(files.keyfile))
    return files


@dataclass
class Api:
    """The helpers both tiers share; ``http`` is an ``httpx.Client`` that reaches the server at ``url``."""

    settings: Settings
    creds: Credentials | None = None

    @property
    def url(self) -> str:
        return self.settings.base_url

    @property
    def http(self) -> httpx.Client:
        raise NotImplementedError

    def headers(self, creds: Credentials | None = None) -> dict[str, str]:
        creds = creds or self.creds
        assert creds is not None
        return auth_headers(creds.api_key, creds.api_secret, str(int(time.time())))

    def post(self, path: str, creds: Credentials | None = None, **kwargs: Any) -> httpx.Response:
        return self.http.post(path, headers=self.headers(creds), **kwargs)

    def run(self, data: dict[str, Any] | None = None, files: Any = None, **kwargs: Any) -> dict[str, Any]:
        if files is None:
            response = self.post(f"/v1/Run/{MODEL}", json=data, **kwargs)
        else:
            response = self.post(f"/v1/Run/{MODEL}", data=data, files=files, **kwargs)
        body: dict[str, Any] = response.json()
        return body

    def detail(self, taskid: str, creds: Credentials | None = None) -> dict[str, Any]:
        body = self.post("/v1/Task/Detail", creds, json={"taskid": taskid}).json()
        assert body["result"] is True, body
        task: dict[str, Any] = body["tasklist"][0]
        return task

    def wait(self, taskid: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.detail(taskid)
            if TaskStatus(task["status"]).is_terminal:
                return task
            time.sleep(0.1)
        raise AssertionError(f"task {taskid} did not finish in {timeout} s: {task['status']}")

    def wait_progress(self, taskid: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the task has finished at least one denoising step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.detail(taskid)
            if task["progress"] and task["status"] == TaskStatus.START:
                return task
            assert not TaskStatus(task["status"]).is_terminal, task["status"]
            time.sleep(0.05)
        raise AssertionError(f"task {taskid} made no progress: {task['status']}")

    def workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self.http.get("/healthz").json()["workers"]
        return workers

    def settle(self, timeout: float = 120) -> None:
        """Cancel what this view's project left unfinished, then wait until every worker is ready again (a
        killed model process reloading, say): the next test on a shared server or app starts from an idle one."""
        tasks = self.post("/v1/Task/List", json={"limit": 100}).json()["tasklist"]
        unfinished = [task["id"] for task in tasks if not TaskStatus(task["status"]).is_terminal]
        for taskid in unfinished:
            self.post("/v1/Task/Cancel", json={"taskid": taskid})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [t for t in unfinished if not TaskStatus(self.detail(t)["status"]).is_terminal]
            if not pending and all(worker["state"] == "ready" for worker in self.workers()):
                return
            time.sleep(0.05)
        raise AssertionError(f"the shared server did not settle in {timeout} s: {self.workers()}")


@dataclass(kw_only=True)
class Server(Api):
    """A ``dreamserve serve`` subprocess."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None
    #: Run in the server's process before it starts (e.g. to lower a resource limit).
    preexec: Callable[[], None] | None = None
    #: Where this view's part of the log begins: a shared server's log holds earlier tests' lines too.
    log_start: int = 0
    #: How clients check the server's certificate: the session CA's context for a server started with ``tls``.
    verify: ssl.SSLContext | bool = True

    def log(self) -> str:
        """The server's log since this view was made."""
        with self.log_path.open("rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")

    @property
    def http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60, verify=self.verify)
        return self._client

    def start(self, timeout: float = float(os.environ.get("DREAMSERVE_TEST_START_TIMEOUT", 90))) -> None:
        command = [
            sys.executable,
            "-m",
            "dreamserve",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.settings.port),
        ]
        if self.settings.ssl_certfile is not None:  # the flags, as an operator types them (env works too)
            command += [
                "--ssl-certfile",
                str(self.settings.ssl_certfile),
                "--ssl-keyfile",
                str(self.settings.ssl_keyfile),
            ]
        with self.log_path.open("ab") as log:  # the server has its own copy of the descriptor
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec
            )
        deadline = time.monotonic() + timeout
        # One client for the whole wait: ``httpx.get`` builds a client (and its TLS context) per call, some 25 ms
        # of CPU each, taken from the server it polls on a 2-core machine.
        with httpx.Client(timeout=2, verify=self.verify) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-4000:]}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()  # not left running behind a failed start
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.close_client()

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def view(self) -> Server:
        """This server seen through a new project: the test sees only its own tasks, files and log lines."""
        creds = new_project(self.settings, "test")
        return replace(self, creds=creds, _client=None, log_start=self.log_path.stat().st_size)

    def settle(self, timeout: float = 120) -> None:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"a shared server was stopped by a test:\n{self.log()[-3000:]}")
        super().settle(timeout)


@dataclass(kw_only=True)
class App(Api):
    """``create_app(settings)`` in this process; the TestClient runs its lifespan on a loop in another thread, so
    background loops (reaper, webhooks) go on while a test sleeps. Full URLs work too: the host is not looked at."""

    client: TestClient
    #: What the ``dreamserve`` loggers (the model process's replayed records included) logged since this view was
    #: made, in ``serve``'s format without the time and level: what ``Server.log`` reads from the server's file.
    recorder: LogRecorder = field(default_factory=lambda: LogRecorder.attach())

    @property
    def http(self) -> httpx.Client:
        return self.client

    def log(self) -> str:
        return self.recorder.text()

    def sdk_http(self) -> httpx.Client:
        """An ``httpx.Client`` that reaches this app through its ``TestClient`` (which is an ``httpx2`` client, so
        SDKs that insist on an ``httpx.Client`` refuse it). A streamed answer arrives whole, once it ended."""
        return httpx.Client(base_url=self.url, transport=ViaTestClient(self.client))

    @property
    def services(self) -> Any:
        """The app's ``Services`` (store, hub, supervisors), for what a test reads or does behind the API."""
        return self.client.app.state.services  # type: ignore[attr-defined]

    def view(self) -> App:
        """This app seen through a new project: the test sees only its own tasks, files and log lines."""
        return replace(self, creds=new_project(self.settings, "test"), recorder=LogRecorder.attach())

    def close(self) -> None:
        self.recorder.detach()
        self.client.__exit__(None, None, None)


class ViaTestClient(httpx.BaseTransport):
    """Sends each request through a ``TestClient`` (the ASGI app in this process)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.client.request(
            request.method, str(request.url), headers=request.headers.multi_items(), content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers.multi_items(), content=answer.content)


class LogRecorder(logging.Handler):
    """Keeps the formatted records of the ``dreamserve`` loggers from ``attach`` to ``detach``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s%(task)s: %(message)s"))

    @classmethod
    def attach(cls) -> LogRecorder:
        recorder = cls()
        logging.getLogger("dreamserve").addHandler(recorder)
        return recorder

    def detach(self) -> None:
        logging.getLogger("dreamserve").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        task_id = getattr(record, "task_id", None)  # as serve prints it (logs.about)
        record.task = f" [task {task_id}]" if task_id is not None else ""
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(kw_only=True)
class LiveServer(Api):
    """``create_app(settings)`` served by uvicorn on a thread of this process, configured as ``serve`` configures
    it (``cli.server.uvicorn_config``: the guarded protocol, its bounds, TLS): a real socket (raw HTTP, WebSockets,
    hang-ups, TLS, clients and browsers in other processes) without an interpreter of its own to start."""

    web: Any  # uvicorn.Server
    thread: threading.Thread
    app: Any  # the FastAPI app it serves
    #: The status of every HTTP answer, uvicorn's own 500 for an app that raised included.
    statuses: list[int]
    recorder: LogRecorder = field(default_factory=lambda: LogRecorder.attach())
    verify: ssl.SSLContext | bool = True
    _client: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60, verify=self.verify)
        return self._client

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def services(self) -> Any:
        """The app's ``Services``, for what a test reads or does behind the API (as ``App.services``)."""
        return self.app.state.services

    def log(self) -> str:
        return self.recorder.text()

    def view(self) -> LiveServer:
        """This server seen through a new project: the test sees only its own tasks, files and log lines."""
        return replace(self, creds=new_project(self.settings, "test"), _client=None, recorder=LogRecorder.attach())

    def settle(self, timeout: float = 120) -> None:
        if not self.thread.is_alive():
            raise AssertionError(f"a shared server stopped:\n{self.log()[-3000:]}")
        super().settle(timeout)

    def close_client(self) -> None:
        self.recorder.detach()
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self) -> None:
        self.web.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():  # a connection that never ends (a held stream) holds a graceful shutdown
            self.web.force_exit = True
            self.thread.join(30)
        self.close_client()


def recording_statuses(app: Any, statuses: list[int]) -> Any:
    """``app`` as an ASGI app that appends the status of each HTTP answer to ``statuses``."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        try:
            await app(scope, receive, sending)
        except Exception:
            statuses.append(500)  # what uvicorn answers for it
            raise

    return asgi


def start_live(
    tmp_path_factory: pytest.TempPathFactory,
    data_dir: Path | None = None,
    allow_private: bool = True,
    tls: bool = False,
    timeout: float = 300,
    **overrides: Any,
) -> LiveServer:
    """A ``LiveServer`` with ``launch``'s options, started and ready (its model processes loaded). ``env`` is set
    in this process while it starts: its model processes are spawned with it."""
    import uvicorn

    from dreamserve.api.app import create_app
    from dreamserve.cli.server import uvicorn_config

    data_dir = data_dir or tmp_path_factory.mktemp("data")
    env = overrides.pop("env", {})
    certs = certificates(tmp_path_factory.getbasetemp() / "tls") if tls else None
    files = {"ssl_certfile": certs.certfile, "ssl_keyfile": certs.keyfile} if certs is not None else {}
    settings = build_settings(data_dir, allow_private, **overrides, **files)
    creds = new_project(settings, "tests")
    statuses: list[int] = []
    certfile, keyfile = (str(certs.certfile), str(certs.keyfile)) if certs is not None else (None, None)
    app = create_app(settings)
    web = uvicorn.Server(uvicorn_config(recording_statuses(app, statuses), settings, certfile, keyfile))
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        thread = threading.Thread(target=web.run, name=f"live-server-{settings.port}", daemon=True)
        verify = certs.context() if certs is not None else True
        server = LiveServer(
            settings=settings, creds=creds, web=web, thread=thread, app=app, statuses=statuses, verify=verify
        )
        thread.start()
        try:
            until(lambda: web.started or not thread.is_alive(), "the live server to start", timeout)
            assert thread.is_alive(), f"the live server did not start:\n{server.log()[-4000:]}"
            ready = server.http  # bound for the lambda
            until(lambda: ready.get("/readyz").status_code == 200, "the live server's model processes", timeout)
        except BaseException:
            server.stop()  # not left running behind a failed start
            raise
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return server


@pytest.fixture
def make_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start ``LiveServer``s with chosen settings (``start_live``); they stop after the test."""
    servers: list[LiveServer] = []

    def factory(**options: Any) -> LiveServer:
        server = start_live(tmp_path_factory, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@cache
def migrated_database() -> Path:
    """An empty SQLite database at the head revision, migrated once per session (Alembic takes some 0.2 s of CPU
    per new database): each data folder of a test starts from a copy of it (``build_settings``)."""
    from dreamserve.queue.db import make_engine
    from dreamserve.queue.migrate import upgrade

    path = Path(tempfile.mkdtemp(prefix="dreamserve-test-schema-")) / "dreamserve.db"

    async def migrate() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{path}", 1)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the caller may be running an event loop
        pool.submit(asyncio.run, migrate()).result()
    assert not path.with_name(path.name + "-wal").exists(), "the last close checkpoints the WAL into the file"
    return path


def build_settings(data_dir: Path, allow_private: bool = True, **overrides: Any) -> Settings:
    """Settings for a test's server or app in ``data_dir``; a folder with no database yet gets a copy of the
    migrated one (a test that brings its own database, an older schema say, keeps it)."""
    spec = ModelSpec(**overrides.pop("model", {}))
    settings = Settings(
        data_dir=data_dir,
        host="127.0.0.1",
        port=free_port(),
        models=overrides.pop("models", None) or {MODEL: spec},
        fetch_allow_private=allow_private,
        **overrides,
    )
    database = data_dir / "dreamserve.db"
    if settings.database_url is None and not database.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(migrated_database(), database)  # its mode (0600) with it
    return settings


@pytest.fixture
def make_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """In-process apps with chosen settings (``model={"workers": 0}`` for no model process at all)."""
    apps: list[App] = []

    def factory(data_dir: Path | None = None, allow_private: bool = True, **overrides: Any) -> App:
        app = open_app(data_dir or tmp_path_factory.mktemp("data"), allow_private, **overrides)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.close()


def open_app(data_dir: Path, allow_private: bool = True, **overrides: Any) -> App:
    """``create_app`` behind an entered ``TestClient`` (the lifespan runs: migrations, services, background loops)."""
    from dreamserve.api.app import create_app

    settings = build_settings(data_dir, allow_private, **overrides)
    creds = create_project(settings, "tests", signature=True)
    client = TestClient(create_app(settings), base_url=settings.base_url, raise_server_exceptions=False)
    client.__enter__()
    return App(settings=settings, creds=creds, client=client)


def launch(
    tmp_path_factory: pytest.TempPathFactory,
    data_dir: Path | None = None,
    start: bool = True,
    allow_private: bool = True,
    tls: bool = False,
    **overrides: Any,
) -> Server:
    """A server with chosen settings, a data dir of its own and a signature project.

    ``allow_private=False`` starts a server whose fetches refuse loopback and private addresses (production);
    ``tls=True`` one that serves HTTPS with the session's certificate (``Server.verify`` trusts its CA); ``env``
    adds variables to its environment (``SCRIPTED_SLOW``'s step time)."""
    data_dir = data_dir or tmp_path_factory.mktemp("data")
    extra_env = overrides.pop("env", {})
    certs = certificates(tmp_path_factory.getbasetemp() / "tls") if tls else None
    files = {"ssl_certfile": certs.certfile, "ssl_keyfile": certs.keyfile} if certs is not None else {}
    spec = ModelSpec(**overrides.get("model", {}))
    settings = build_settings(data_dir, allow_private, **overrides, **files)
    overrides.pop("model", None)
    env = {
        **os.environ,
        "DREAMSERVE_DATA_DIR": str(data_dir),
        "DREAMSERVE_MODELS": json.dumps({MODEL: spec.model_dump()}),
        "DREAMSERVE_FETCH_ALLOW_PRIVATE": "true" if allow_private else "false",
        "PYTHONUNBUFFERED": "1",
        **{
            f"DREAMSERVE_{k.upper()}": json.dumps(v) if isinstance(v, list | dict) else str(v)
            for k, v in overrides.items()
        },
        **extra_env,
    }
    verify = certs.context() if certs is not None else True
    server = Server(settings=settings, env=env, log_path=data_dir / "server.log", verify=verify)
    server.creds = new_project(settings, "tests")
    if start:
        server.start()
    return server


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start servers with chosen model settings (``launch``); they stop after the test."""
    servers: list[Server] = []

    def factory(start: bool = True, **options: Any) -> Server:
        server = launch(tmp_path_factory, start=False, **options)
        servers.append(server)  # stopped at the end even if it fails to start
        if start:
            server.start()
        return server

    yield factory
    for server in servers:
        server.stop()


#: The scripted engine (``tests/scripted_engine.py``): a model process with no torch, real PNGs after a set delay
#: per step; words in the prompt make it crash, fail or ignore stops.
SCRIPTED = "tests.scripted_engine:ScriptedEngine"
#: The tiny model generating at 64x64 (larger sizes are upscaled): what most end-to-end tests need (``tiny_server``).
#: Files are kept a day, as long as Ark's links last, so URLs carry when they expire (test_ark); no other user of
#: the tiny server reads an expiry.
TINY: dict[str, Any] = {"model": {"max_pixels": 64 * 64}, "retention_seconds": 86400}
#: 384x384 in 60 steps: tasks long enough to cancel or kill while they run (test_service, test_openai); a task
#: that only has to finish asks for a small size (64x64 is allowed) and takes a fraction of that.
SLOW: dict[str, Any] = {"model": {"max_pixels": 384 * 384, "steps": 60, "max_batch": 4}, "min_pixels": 64 * 64}
#: 256x256 in 30 steps: a task runs for seconds, long enough to watch its progress (webhooks, the playground).
PROGRESS: dict[str, Any] = {"model": {"max_pixels": 256 * 256, "steps": 30}}
#: SLOW's shape on a server whose model process runs the scripted engine (no torch: it starts in a second): a task
#: lasts 4 s (400 steps of 10 ms), long enough to stop while it runs, for the tests that need the server's socket.
SCRIPTED_SLOW: dict[str, Any] = {
    "model": {"engine": SCRIPTED, "max_pixels": 384 * 384, "steps": 400, "max_batch": 4},
    "min_pixels": 64 * 64,
    "env": {"DREAMSERVE_SCRIPTED_STEP_SECONDS": "0.01"},
}


class SharedServers:
    """``LiveServer``s started at first use and kept for the session, one per set of options; the ``keep`` used
    last stay running (each may hold a model process in memory)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, keep: int = 6) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.keep = keep
        self.servers: dict[str, LiveServer] = {}

    def get(self, options: dict[str, Any]) -> LiveServer:
        key = json.dumps(options, sort_keys=True)
        server = self.servers.pop(key, None)
        if server is None or not server.thread.is_alive():
            if server is not None:
                server.stop()
            server = start_live(self.tmp_path_factory, **json.loads(key))  # a copy: the options stay as given
        self.servers[key] = server  # the most recently used last
        while len(self.servers) > self.keep:
            self.servers.pop(next(iter(self.servers))).stop()
        return server

    def close(self) -> None:
        for server in self.servers.values():  # all asked at once: each waits for its connections to close
            server.web.should_exit = True
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    servers = SharedServers(tmp_path_factory)
    yield servers
    servers.close()


@pytest.fixture
def shared_server(shared_servers: SharedServers) -> Iterator[Callable[..., LiveServer]]:
    """``shared_server(**options)``: the session's ``LiveServer`` with those ``start_live`` options, seen through a
    project of this test's own (``LiveServer.view``). Left idle when the test ends (``LiveServer.settle``)."""
    views: list[LiveServer] = []

    def factory(**options: Any) -> LiveServer:
        view = shared_servers.get(options).view()
        views.append(view)
        return view

    yield factory
    try:
        for view in views:
            view.settle()
    finally:
        for view in views:
            view.close_client()


class SharedApps:
    """In-process apps (``open_app``) opened at first use and kept for the session, one per set of options, as
    ``SharedServers`` keeps servers: what a model process costs to start is paid once per set."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, keep: int = 4) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.keep = keep
        self.apps: dict[str, App] = {}

    def get(self, options: dict[str, Any]) -> App:
        key = json.dumps(options, sort_keys=True)
        app = self.apps.pop(key, None)
        if app is None:
            app = open_app(self.tmp_path_factory.mktemp("shared-app"), **json.loads(key))  # a copy: options stay
            # Ready as a started server is (``Server.start`` waits for /readyz): its model processes loaded.
            ready = app  # bound for the lambda
            until(lambda: ready.http.get("/readyz").status_code == 200, "the shared app's model processes", 300)
        self.apps[key] = app  # the most recently used last
        while len(self.apps) > self.keep:
            self.apps.pop(next(iter(self.apps))).close()
        return app

    def close(self) -> None:
        # All at once: each waits for its model processes to exit (up to ``ChildProcess.close``'s timeout).
        with concurrent.futures.ThreadPoolExecutor(max(len(self.apps), 1)) as pool:
            list(pool.map(App.close, self.apps.values()))


@pytest.fixture(scope="session")
def shared_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedApps]:
    apps = SharedApps(tmp_path_factory)
    yield apps
    apps.close()


@pytest.fixture
def shared_app(shared_apps: SharedApps) -> Iterator[Callable[..., App]]:
    """``shared_app(**options)``: the session's in-process app with those ``open_app`` options, seen through a
    project of this test's own (``App.view``), left idle when the test ends (``Api.settle``)."""
    views: list[App] = []

    def factory(**options: Any) -> App:
        view = shared_apps.get(options).view()
        views.append(view)
        return view

    yield factory
    try:
        for view in views:
            view.settle()
    finally:
        for view in views:
            view.recorder.detach()


@pytest.fixture
def tiny_server(shared_server: Callable[..., LiveServer]) -> LiveServer:
    """The session's ``TINY`` live server, seen through a fresh project: for every test of the real pipeline with
    no options of its own, those that need its socket (a CLI or curl in a subprocess, a raw WebSocket) or not."""
    return shared_server(**TINY)


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for ``condition`` (polled every 20 ms), failing after ``timeout`` seconds with ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


@pytest.fixture
def scripted(make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> Callable[..., App]:
    """An in-process app whose workers run the scripted engine, ``steps`` steps of ``step_seconds`` each: the
    supervisor tier (the real supervisor, pipe protocol and spawned model process, no torch, no uvicorn)."""

    def factory(steps: int = 4, step_seconds: float = 0.02, **overrides: Any) -> App:
        monkeypatch.setenv("DREAMSERVE_SCRIPTED_STEP_SECONDS", str(step_seconds))
        model = {"engine": SCRIPTED, "steps": steps, **overrides.pop("model", {})}
        app = make_app(model=model, **{"min_pixels": 64 * 64, **overrides})
        until(lambda: all(w["state"] == "ready" for w in app.workers()), "the scripted model process to load")
        return app

    return factory


@dataclass
class Receiver:
    """A local HTTP server: serves ``files`` on GET and records POSTed bodies (callbacks)."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    posts: list[dict[str, Any]] = field(default_factory=list)
    fail_first: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("content-length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.posts.append({"path": self.path, "headers": headers, "raw": body, "body": json.loads(body)})
            failing = state.fail_first > 0
            state.fail_first -= 1
            self.send_response(500 if failing else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def scripted_app(scripted: Callable[..., App]) -> Callable[..., App]:
    """``scripted`` at a public https URL (the TestClient looks at no scheme or host) and the server's own size
    floor (Replicate's clients wrap only https outputs as files); ``workers=0``: no model process."""

    def factory(steps: int = 4, step_seconds: float = 0.02, workers: int = 1, **overrides: Any) -> App:
        options = {"public_url": "https://testserver", "min_pixels": MIN_PIXELS, **overrides}
        return scripted(steps, step_seconds, model={"workers": workers}, **options)

    return factory
