"""Signed callbacks against a real server: chosen events in order, throttled progress, retries with backoff,
the delivery log, and the webhook secret handed out by ``keys create`` and ``credentials.json``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from dreamserve import cli
from dreamserve.dialects.wiro.render import progress_object
from dreamserve.dialects.wiro.webhook import progress_record
from dreamserve.facts import Progress
from dreamserve.projects import Credentials, ensure_default_credentials
from dreamserve.queue.db import WebhookDelivery
from dreamserve.signing import sign_webhook, verify_webhook
from dreamserve.webhooks import CallbackEvent
from tests.conftest import MODEL, PROGRESS, SCRIPTED, free_port, new_project, until


@dataclass
class Hook:
    """A callback receiver that answers each POST with the next of ``statuses`` (then 200) and logs when it came.
    POSTs to a path in ``failing`` get 500; those to a path in ``held`` are answered once ``release`` is set."""

    port: int
    statuses: list[int] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return self.at("/hook")

    def at(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.posts

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """The bodies, after checking that every delivery carries a valid signature."""
        for post in self.posts:
            headers = post["headers"]
            stamp, signature = headers["x-dreamserve-timestamp"], headers["x-dreamserve-signature"]
            assert verify_webhook(secret, stamp, post["raw"], signature), post
        return [json.loads(post["raw"]) for post in self.posts]


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.posts.append({"at": time.monotonic(), "path": self.path, "headers": headers, "raw": raw})
            if self.path in state.held:
                state.release.wait(30)
            failed = self.path in state.failing
            self.send_response(500 if failed else state.statuses.pop(0) if state.statuses else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()


def deliveries(server: Any, taskid: str, creds: Credentials | None = None) -> list[dict[str, Any]]:
    body = server.post("/v1/Task/Webhooks", creds, json={"taskid": taskid}).json()
    assert body["result"] is True and body["total"] == str(len(body["deliveries"]))
    rows: list[dict[str, Any]] = body["deliveries"]
    return rows


def test_start_progress_completed_arrive_signed_in_order(shared_app: Any, hook: Hook) -> None:
    # PROGRESS's 30 steps on the scripted model process (50 ms each): progress for 1.5 s, no pipeline needed.
    server = shared_app(**{**PROGRESS, "model": {**PROGRESS["model"], "engine": SCRIPTED}})
    events = "start,progress,completed"
    run = server.run({"prompt": "followed", "size": "1K", "callbackUrl": hook.url, "callbackEvents": events})
    task = server.wait(run["taskid"])
    # A row is marked delivered after the receiver has answered: wait for the rows, not for the posts.
    until(
        lambda: all(row["state"] not in ("pending", "sending") for row in deliveries(server, run["taskid"])),
        "every delivery to be sent and answered",
    )
    log = deliveries(server, run["taskid"])
    bodies = hook.verified(server.creds.webhook_secret)
    kinds = [post["headers"]["x-dreamserve-event"] for post in hook.posts]
    progress = kinds.count("progress")
    assert kinds == ["start", *["progress"] * progress, "completed"] and progress >= 1, kinds
    assert bodies[0] == {"event": "start", "taskid": run["taskid"], "status": "task_start", "progress": None}
    # Byte for byte, key order included: the outbox's record is POSTed as it was stored.
    start = f'{{"event": "start", "taskid": "{run["taskid"]}", "status": "task_start", "progress": null}}'
    assert hook.posts[0]["raw"] == start.encode()
    assert bodies[1]["event"] == "progress" and bodies[1]["progress"]["stepTotal"] == "30"
    # The completed delivery is the final task object, as Wiro posts it.
    assert bodies[-1]["status"] == "task_postprocess_end" and bodies[-1]["outputs"] == task["outputs"]

    # Progress is throttled to one delivery a second per task, though steps come much faster.
    created = [int(row["createtime"]) for row in log if row["event"] == "progress"]
    running = int(task["endtime"]) - int(task["starttime"]) + 1
    assert len(created) <= running + 1 and len(set(created)) == len(created), (created, running)
    assert [(row["event"], row["state"], row["attempts"], row["laststatus"]) for row in (log[0], log[-1])] == [
        ("start", "delivered", "1", "200"),
        ("completed", "delivered", "1", "200"),
    ]
    assert [post["headers"]["x-dreamserve-delivery"] for post in hook.posts] == [row["id"] for row in log]

    # A progress delivery is Wiro's progress object, every value a string, in its key order: rendered when sent from
    # the fact its outbox row stores (a ``Progress`` dump, no wire shape).
    assert list(bodies[1]) == ["event", "taskid", "status", "progress"]
    assert list(bodies[1]["progress"]) == WIRO_PROGRESS_KEYS
    assert all(isinstance(value, str) for value in bodies[1]["progress"].values())
    stored = server.client.portal.call(stored_payloads, server.services, int(run["taskid"]))
    assert set(stored[1]["progress"]) <= {"step", "total", "elapsed"}, stored[1]
    assert progress_object(Progress.read(stored[1]["progress"])) == bodies[1]["progress"]
    assert {**stored[1], "progress": bodies[1]["progress"]} == bodies[1]


#: Wiro's progress object, as its socket and its progress callbacks send it.
WIRO_PROGRESS_KEYS = [
    "type",
    "task",
    "percentage",
    "stepCurrent",
    "stepTotal",
    "speed",
    "speedType",
    "elapsedTime",
    "remainingTime",
]


async def stored_payloads(services: Any, task_id: int) -> list[dict[str, Any]]:
    """The payloads the outbox stored for a task's deliveries, in order."""
    query = select(WebhookDelivery.payload).where(WebhookDelivery.task_id == task_id).order_by(WebhookDelivery.id)
    async with services.sessions() as session:
        return list((await session.execute(query)).scalars())


def test_progress_callbacks_render_the_stored_fact_and_send_earlier_rows_as_stored() -> None:
    step = Progress(step=3, total=30, elapsed=1.5)
    fact = {"event": "progress", "taskid": "7", "status": "task_output", "progress": step.dump()}
    rendered = progress_record(CallbackEvent.model_validate(fact))
    assert rendered == {**fact, "progress": progress_object(step)} and list(rendered["progress"]) == WIRO_PROGRESS_KEYS
    assert rendered["progress"]["stepCurrent"] == "3" and rendered["progress"]["speed"] == "2.00"
    # A row an earlier version wrote stored Wiro's object itself: it is sent byte for byte as stored.
    legacy = {
        **fact,
        "progress": {
            "type": "progressGenerate",
            "task": "Generate",
            "percentage": "10",
            "stepCurrent": "3",
            "stepTotal": "30",
            "speed": "1.97",
            "speedType": "it/s",
            "elapsedTime": "2s",
            "remainingTime": "14s",
        },
    }
    assert json.dumps(progress_record(CallbackEvent.model_validate(legacy))) == json.dumps(legacy)
    # No step yet (a start delivery): sent as stored.
    start = {**fact, "event": "start", "progress": None}
    assert json.dumps(progress_record(CallbackEvent.model_validate(start))) == json.dumps(start)


def test_retries_back_off_then_give_up_and_the_log_says_why(make_app: Any, hook: Hook) -> None:
    server = make_app(model={"workers": 0}, webhook_attempts=3, webhook_backoff_seconds=0.6)
    hook.statuses = [500, 503, 500, 500]
    run = server.run({"prompt": "never runs", "size": "1K", "callbackUrl": hook.url})
    assert server.post("/v1/Task/Cancel", json={"taskid": run["taskid"]}).json()["result"] is True
    posts = hook.wait_for(3)
    # Given up after its third attempt (the row is failed, which no sender claims again): no fourth comes.
    until(lambda: deliveries(server, run["taskid"])[0]["state"] == "failed", "the delivery to be given up")
    assert len(posts) == 3
    # A cancelled task is "completed" too: its final object says how it ended.
    bodies = hook.verified(server.creds.webhook_secret)
    assert {(body["status"], body["pexit"]) for body in bodies} == {("task_cancel", "130")}
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(posts, posts[1:], strict=False)]
    assert gaps[0] >= 0.6 * 0.9 and gaps[1] >= 1.2 * 0.9, f"exponential backoff: {gaps}"
    [row] = deliveries(server, run["taskid"])
    assert (row["event"], row["state"], row["attempts"], row["laststatus"]) == ("completed", "failed", "3", "500")


def test_unreachable_receiver_is_retried_then_delivered(make_app: Any, hook: Hook) -> None:
    server = make_app(model={"workers": 0}, webhook_backoff_seconds=0.3)
    closed = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    first = server.run({"prompt": "to nowhere", "size": "1K", "callbackUrl": closed})
    second = server.run({"prompt": "to the hook", "size": "1K", "callbackUrl": hook.url})
    hook.statuses = [500]
    for run in (first, second):
        server.post("/v1/Task/Cancel", json={"taskid": run["taskid"]})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        [failing] = deliveries(server, first["taskid"])
        [ok] = deliveries(server, second["taskid"])
        if int(failing["attempts"]) >= 2 and ok["state"] == "delivered":
            break
        time.sleep(0.2)
    # Still being retried: waiting for its next attempt, or in one right now.
    assert failing["state"] in ("pending", "sending") and failing["laststatus"] == "" and failing["lasterror"], failing
    assert (ok["state"], ok["attempts"], ok["lasterror"]) == ("delivered", "2", "")


def cancelled(server: Any, creds: Credentials, url: str) -> str:
    """A task of ``creds``' project, cancelled at once: its "completed" callback to ``url`` is due."""
    body = server.post(f"/v1/Run/{MODEL}", creds, json={"prompt": "called back", "size": "1K", "callbackUrl": url})
    taskid: str = body.json()["taskid"]
    assert server.post("/v1/Task/Cancel", creds, json={"taskid": taskid}).json()["result"] is True
    return taskid


def wait_rows(server: Any, creds: Credentials, taskids: list[str], done: Callable[[dict[str, Any]], bool]) -> None:
    """Until one delivery row of ``taskids`` is ``done`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while not any(done(row) for taskid in taskids for row in deliveries(server, taskid, creds)):
        assert time.monotonic() < deadline, [deliveries(server, taskid, creds) for taskid in taskids]
        time.sleep(0.1)


def test_one_projects_failing_receiver_pauses_only_its_own_callbacks(make_app: Any, hook: Hook) -> None:
    server = make_app(
        model={"workers": 0},
        webhook_per_host=1,
        webhook_breaker_failures=2,
        webhook_breaker_seconds=600,
        webhook_backoff_seconds=0.1,
    )
    tenant = new_project(server.settings, "the other tenant")
    hook.failing = {"/failing"}
    mine = [cancelled(server, server.creds, hook.at("/failing")) for _ in range(4)]
    # Two failures in a row trip the breaker of this project's callbacks to the host: its rows are postponed.
    wait_rows(server, server.creds, mine, lambda row: "circuit breaker" in row["lasterror"])
    theirs = cancelled(server, tenant, hook.at("/ok"))  # same host and port, another project
    wait_rows(server, tenant, [theirs], lambda row: row["state"] == "delivered")
    [row] = deliveries(server, theirs, tenant)
    assert (row["state"], row["attempts"], row["lasterror"]) == ("delivered", "1", "")
    # Delivered while the first project's callbacks to the same receiver are still paused, none of them sent.
    rows = [row for taskid in mine for row in deliveries(server, taskid)]
    assert all(row["state"] == "pending" and row["laststatus"] in ("", "500") for row in rows), rows
    assert sum(int(row["attempts"]) for row in rows) == 2, rows
    assert [post["path"] for post in hook.posts] == ["/failing", "/failing", "/ok"]


def test_one_projects_hung_receiver_takes_no_slot_of_another(make_app: Any, hook: Hook) -> None:
    # One slot per project and host, two in all: the due list (4 x 2 rows) is shorter than the first project's
    # backlog, so its rows come round-robin with the other project's or the other would never be looked at.
    server = make_app(model={"workers": 0}, webhook_per_host=1, webhook_concurrency=2, webhook_timeout_seconds=30)
    tenant = new_project(server.settings, "the other tenant")
    hook.held = {"/hung"}
    mine = [cancelled(server, server.creds, hook.at("/hung")) for _ in range(12)]
    wait_rows(server, server.creds, mine, lambda row: row["state"] == "sending")
    theirs = cancelled(server, tenant, hook.at("/ok"))
    wait_rows(server, tenant, [theirs], lambda row: row["state"] == "delivered")
    # Delivered while the first project's receiver still holds its one POST (the others wait their turn).
    assert not hook.release.is_set()
    assert [post["path"] for post in hook.posts] == ["/hung", "/ok"]
    hook.release.set()
    wait_rows(server, server.creds, mine, lambda row: row["state"] == "delivered")


def test_keys_create_and_credentials_json_carry_the_webhook_secret(make_app: Any, hook: Hook) -> None:
    server = make_app(model={"workers": 0})
    data_dir = str(server.settings.data_dir)
    created = CliRunner().invoke(cli.main, ["keys", "create", "--json", "--name", "hooks", "--data-dir", data_dir])
    assert created.exit_code == 0, created.output
    creds = Credentials(**json.loads(created.stdout))
    assert len(creds.webhook_secret) == 64 and creds.webhook_secret != server.creds.webhook_secret
    run = server.run({"prompt": "signed for hooks", "size": "1K", "callbackUrl": hook.url}, creds=creds)
    server.post("/v1/Task/Cancel", creds, json={"taskid": run["taskid"]})
    hook.wait_for(1)
    assert hook.verified(creds.webhook_secret)[0]["id"] == run["taskid"]
    with pytest.raises(AssertionError):
        hook.verified(server.creds.webhook_secret)  # another project's secret does not verify it
    # serve writes the default project's credentials (this function), webhook secret included.
    ensure_default_credentials(server.settings)
    saved = json.loads((server.settings.data_dir / "credentials.json").read_text())
    assert len(saved["webhook_secret"]) == 64


def test_verify_webhook_rejects_tampering_and_replays() -> None:
    body = b'{"event": "completed"}'
    now = str(int(time.time()))
    signature = sign_webhook("s3cret", now, body)
    assert verify_webhook("s3cret", now, body, signature)
    assert verify_webhook("s3cret", now, body, signature.upper()), "hex case does not matter"
    assert not verify_webhook("s3cret", now, body + b" ", signature)
    assert not verify_webhook("s3cret", str(int(now) + 1), body, signature)
    old = str(int(time.time()) - 600)
    assert not verify_webhook("s3cret", old, body, sign_webhook("s3cret", old, body)), "older than the tolerance"
    assert verify_webhook("s3cret", old, body, sign_webhook("s3cret", old, body), tolerance=900)
    assert not verify_webhook("s3cret", "yesterday", body, signature)
