"""End to end: HTTP, WebSocket, SQLite and the tiny FLUX.2-klein pipeline, through a real server where the test
needs its socket (a raw WebSocket, a CLI or curl in a subprocess, a SIGKILL), else through the in-process app; the
cancel, kill and batching flows run on the scripted model process (``tests/scripted_engine.py``), whose steps last
as long as the test needs, where the tiny pipeline needed 60 CPU-bound steps at 384x384."""

from __future__ import annotations

import io
import json
import re
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image
from websockets.sync.client import connect

from tests import wiro_samples
from tests.conftest import SCRIPTED, App, LiveServer, Receiver, png_bytes
from tests.wiro_samples import assert_like

ORDER = [
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_assign",
    "task_start",
    "task_output",
    "task_output_full",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
]


def socket_events(server: LiveServer | App, token: str, timeout: float = 120) -> list[dict[str, Any]]:
    """The task's frames until its end, from a WebSocket over TCP (a server) or through the ASGI app (an app)."""
    if isinstance(server, App):
        return _app_socket_events(server, token)
    frames = []
    with connect(server.url.replace("http://", "ws://") + "/v1", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=timeout))
            frames.append(frame)
            if frame["type"] in ("task_postprocess_end", "task_cancel"):
                break
    return frames


def _app_socket_events(app: App, token: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with app.client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps({"type": "task_info", "tasktoken": token}))
        while not frames or frames[-1]["type"] not in ("task_postprocess_end", "task_cancel"):
            frames.append(json.loads(ws.receive_text()))
    return frames


@pytest.fixture
def scripted_slow(scripted: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> App:
    """SLOW's shape on the scripted engine: 4 images a call, tasks of 4 s (400 steps of 10 ms: long enough to stop
    one while it runs), and a replacement model process that takes a second to start (so a test sees it restarting
    after a kill). The first one starts at once: the variable is read by each model process as it is spawned."""
    app = scripted(steps=400, step_seconds=0.01, model={"max_pixels": 384 * 384, "max_batch": 4})
    monkeypatch.setenv("DREAMSERVE_SCRIPTED_LOAD_SECONDS", "1")
    return app


def test_seed_flow_files_url_socket_detail_output(tiny_server: LiveServer, receiver: Receiver) -> None:
    server = tiny_server
    receiver.files["/ref.png"] = png_bytes(80, 80, (10, 200, 10))
    files = [("inputImage", (f"ref{i}.png", png_bytes(96, 64), "image/png")) for i in range(3)]
    data = {"prompt": "two cats on a sofa", "size": "1280x720", "maxImages": "2", "watermark": "false"}
    # Wiro's combinefileinput: files and a URL in the same repeated multipart field.
    files.append(("inputImage", (None, receiver.url("/ref.png"))))
    run = server.run(data=data, files=files)
    assert list(run) == ["errors", "taskid", "socketaccesstoken", "result"]
    assert run["result"] is True and run["errors"] == [] and run["taskid"].isdigit()
    assert len(run["socketaccesstoken"]) == 30

    frames = socket_events(server, run["socketaccesstoken"])
    types = [f["type"] for f in frames]
    assert [t for t in ORDER if t in types] == ORDER, types
    assert [t for t in types if t != "task_output"] == [t for t in ORDER if t != "task_output"]
    assert all(f["id"] == run["taskid"] and f["tasktoken"] == run["socketaccesstoken"] for f in frames)
    progress = [f["message"] for f in frames if f["type"] == "task_output"]
    assert progress[-1]["stepCurrent"] == progress[-1]["stepTotal"]
    assert all(isinstance(v, str) for p in progress for v in p.values())
    # Live frames may carry a step preview; the stored progress (replayed frames, Detail) never does.
    assert all(p["preview"].startswith("data:image/jpeg;base64,") for p in progress if "preview" in p)

    task = server.detail(run["taskid"])
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["progress"]["stepCurrent"] == progress[-1]["stepCurrent"] and "preview" not in task["progress"]
    assert frames[-1]["message"] == task["outputs"]
    assert [o["name"] for o in task["outputs"]] == ["0.png", "1.png"]
    for key in ("createtime", "accepttime", "preprocessstarttime", "assigntime", "starttime", "endtime"):
        assert task[key].isdigit() and int(task[key]) > 0, key
    assert task["canceltime"] == "0"
    float(task["elapsedseconds"])
    assert task["parameters"]["inputImage"][3] == receiver.url("/ref.png")

    images = []
    for output in task["outputs"]:
        response = httpx.get(output["url"])  # no credentials needed
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert int(output["size"]) == len(response.content)
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (1280, 720)
        assert image.text["ai_generated"] == "true"
        images.append(image.tobytes())
    assert images[0] != images[1], "maxImages gives distinct images"
    assert task["outputs"][0]["seed"] != task["outputs"][1]["seed"]


def test_json_body_and_late_socket_replay(tiny_server: LiveServer) -> None:
    server = tiny_server
    run = server.run({"prompt": "a lighthouse", "size": "1K", "maxImages": 1, "watermark": True})
    task = server.wait(run["taskid"])
    assert task["pexit"] == "0"
    # The task is over: a socket that registers now still gets every event, from the stored log.
    frames = socket_events(server, run["socketaccesstoken"])
    types = [f["type"] for f in frames]
    expected = [t for t in ORDER if "preprocess" not in t]
    assert [t for t in types if t != "task_output"] == [t for t in expected if t != "task_output"]
    image = Image.open(io.BytesIO(server.http.get(task["outputs"][0]["url"]).content))
    assert image.size == (1024, 1024) and image.text.get("watermark") == "visible"


def test_cancel_queued_kill_running_then_next_succeeds(scripted_slow: App) -> None:
    server = scripted_slow
    first = server.run({"prompt": "slow one", "size": "1K"})
    # Another shape: a same-shape task sent at once would join the first one's batch (batch_window_ms).
    second = server.run({"prompt": "waiting", "size": "1280x720"})
    server.wait_progress(first["taskid"])
    assert server.detail(second["taskid"])["status"] == "task_queue"

    cancelled = server.post("/v1/Task/Cancel", json={"taskid": second["taskid"]}).json()
    assert cancelled["result"] is True and cancelled["tasklist"][0]["status"] == "task_cancel"
    again = server.post("/v1/Task/Cancel", json={"taskid": second["taskid"]}).json()
    assert again["result"] is False and again["errors"][0]["code"] == 1

    old_pid = server.workers()[0]["pid"]
    assert psutil.Process(old_pid).is_running()  # the model process (its RSS holding the pipeline: test_metrics)
    killed = server.post("/v1/Task/Kill", json={"socketaccesstoken": first["socketaccesstoken"]}).json()
    assert killed["result"] is True and killed["tasklist"][0]["status"] == "task_cancel"
    assert killed["tasklist"][0]["pexit"] == "137"
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    # While the new model process loads, /healthz says why the worker is away, not the killed task.
    restarting = server.workers()[0]
    assert restarting["state"] == "restarting after a kill" and restarting["tasks"] == [], restarting

    third = server.run({"prompt": "after the kill", "size": "64x64"})
    task = server.wait(third["taskid"])
    assert task["pexit"] == "0" and len(task["outputs"]) == 1
    assert server.workers()[0]["pid"] not in (None, old_pid)
    assert server.detail(second["taskid"])["starttime"] == "0", "a cancelled task never ran"

    # The log: the model process's own records reach it, and the kill is logged as one, not as a lost lease.
    log = server.log()
    assert "dreamserve.worker.child: model loaded in" in log, log[-3000:]
    tag = f"[task {first['taskid']}]"
    assert f"{tag}: kill requested" in log and f"{tag}: killed as requested" in log
    assert "lease lost" not in log


def test_cancel_running_stops_at_next_step_and_keeps_the_model(scripted_slow: App) -> None:
    server = scripted_slow
    run = server.run({"prompt": "to be cancelled", "size": "1K"})
    server.wait_progress(run["taskid"])
    pid = server.workers()[0]["pid"]
    body = server.post("/v1/Task/Cancel", json={"taskid": run["taskid"]}).json()
    task = body["tasklist"][0]
    assert task["status"] == "task_cancel" and task["pexit"] == "130"
    assert server.workers()[0]["pid"] == pid, "cooperative cancel keeps the loaded model process"


def test_restart_loses_no_task(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real server (it is SIGKILLed) with the scripted model process: 10 steps of 0.1 s a task.
    monkeypatch.setenv("DREAMSERVE_SCRIPTED_STEP_SECONDS", "0.1")
    server = make_server(model={"engine": SCRIPTED, "max_pixels": 256 * 256, "steps": 10})
    runs = [server.run({"prompt": f"task {i}", "size": "1K"}) for i in range(3)]
    server.wait_progress(runs[0]["taskid"])
    assert server.process is not None
    # The whole server dies mid-task (the model child goes with it: its pipe closes).
    server.stop(signal.SIGKILL)
    server.start()
    tasks = [server.wait(r["taskid"]) for r in runs]
    assert [t["pexit"] for t in tasks] == ["0", "0", "0"]
    assert tasks[0]["attempts"] == "2", "the task that was running is re-queued once"
    assert "was lost" in tasks[0]["debugerror"]


def test_projects_never_see_each_other(tiny_server: LiveServer) -> None:
    from dreamserve.projects import create_project

    server = tiny_server
    other = create_project(server.settings, "other", signature=False)
    run = server.run({"prompt": "private", "size": "1K"})
    # Key-only project: x-api-key alone is enough for it.
    response = server.http.post("/v1/Task/Detail", headers={"x-api-key": other.api_key}, json={"taskid": run["taskid"]})
    body = response.json()
    assert body["result"] is False and body["errors"][0]["code"] == 1
    mine = server.post("/v1/Task/List", json={}).json()
    theirs = server.http.post("/v1/Task/List", headers={"x-api-key": other.api_key}, json={}).json()
    assert mine["total"] == "1" and theirs["total"] == "0"


def test_callback_is_posted_signed_and_retried(tiny_server: LiveServer, receiver: Receiver) -> None:
    from dreamserve.signing import verify_webhook

    server = tiny_server
    receiver.fail_first = 1
    fields = {
        "prompt": "callback",
        "size": "1K",
        "callbackUrl": receiver.url("/hook"),
        "callbackEvents": "start,completed",
    }
    run = server.run(fields)
    server.wait(run["taskid"])
    deadline = time.monotonic() + 20
    while len(receiver.posts) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = [post["headers"]["x-dreamserve-event"] for post in receiver.posts]
    assert events == ["start", "start", "completed"], "the first delivery got a 500 and was retried"
    for post in receiver.posts:
        headers = post["headers"]
        assert verify_webhook(
            server.creds.webhook_secret,
            headers["x-dreamserve-timestamp"],
            post["raw"],
            headers["x-dreamserve-signature"],
        )
        assert not verify_webhook(
            "another secret", headers["x-dreamserve-timestamp"], post["raw"], headers["x-dreamserve-signature"]
        )
    body = receiver.posts[-1]["body"]
    assert body["id"] == run["taskid"] and body["status"] == "task_postprocess_end" and body["pexit"] == "0"
    assert body["outputs"][0]["url"].endswith("/0.png")
    log = server.post("/v1/Task/Webhooks", json={"taskid": run["taskid"]}).json()
    assert [(d["event"], d["state"], d["attempts"]) for d in log["deliveries"]] == [
        ("start", "delivered", "2"),
        ("completed", "delivered", "1"),
    ]
    assert log["deliveries"][0]["laststatus"] == "200"


def test_cli_generate_downloads_outputs(tiny_server: LiveServer, tmp_path: Any) -> None:
    import subprocess
    import sys

    server = tiny_server
    ref = tmp_path / "ref.png"
    ref.write_bytes(png_bytes(70, 70))
    creds = server.creds
    command = [
        *(sys.executable, "-m", "dreamserve", "generate", "a fox", "-i", str(ref), "--size", "1K", "-n", "2"),
        *("-o", str(tmp_path / "out"), "--server", server.url, "--key", creds.api_key, "--secret", creds.api_secret),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["0.png", "1.png"]
    with Image.open(paths[0]) as image:
        assert image.size == (1024, 1024)


def test_same_size_requests_share_pipeline_calls(scripted_slow: App) -> None:
    server = scripted_slow
    blocker = server.run({"prompt": "keeps the worker busy", "size": "1K"})
    server.wait_progress(blocker["taskid"])
    # Generated at 192x192 (under the 384x384 cap): long enough to cancel one of them, quicker to finish.
    batch = [server.run({"prompt": f"batched {i}", "size": "192x192"}) for i in range(3)]
    # All three wait behind the blocker; once it is cancelled, the worker takes them in one claim.
    stopped = server.post("/v1/Task/Cancel", json={"taskid": blocker["taskid"]}).json()["tasklist"][0]
    assert stopped["status"] == "task_cancel" and stopped["pexit"] == "130"
    server.wait_progress(batch[0]["taskid"])
    # One of the three is cancelled while they run together; the other two are not disturbed.
    cancelled = server.post("/v1/Task/Cancel", json={"taskid": batch[1]["taskid"]}).json()["tasklist"][0]
    assert cancelled["status"] == "task_cancel" and cancelled["pexit"] == "130"
    done = [server.wait(batch[i]["taskid"]) for i in (0, 2)]
    assert [t["pexit"] for t in done] == ["0", "0"]
    assert batch[2]["taskid"] in {str(i) for i in done[0]["details"]["batched_with"]}
    assert Image.open(io.BytesIO(server.http.get(done[1]["outputs"][0]["url"]).content)).size == (192, 192)


def test_literal_curl_commands_from_the_readme(tiny_server: LiveServer, receiver: Receiver, tmp_path: Any) -> None:
    """Wiro's sample as a shell runs it: openssl's whole output line in x-signature (``SHA2-256(stdin)= ...`` on
    OpenSSL 3), the page's placeholder callbackUrl, curl for Run and Detail; answers compared with the page's."""
    import shutil
    import subprocess

    if not (shutil.which("curl") and shutil.which("openssl")):
        raise AssertionError("curl and openssl are part of the test set-up")
    server = tiny_server
    for index in range(3):
        (tmp_path / f"in{index}.png").write_bytes(png_bytes(90, 60, (40 * index, 90, 200)))
    receiver.files["/style.png"] = png_bytes(64, 64)
    sign = f"""
        YOUR_API_KEY={server.creds.api_key}; YOUR_API_SECRET={server.creds.api_secret}; NONCE=$(date +%s)
        SIGNATURE="$(echo -n "${{YOUR_API_SECRET}}${{NONCE}}" | openssl dgst -sha256 -hmac "${{YOUR_API_KEY}}")"
        AUTH=(-H "x-api-key: ${{YOUR_API_KEY}}" -H "x-nonce: ${{NONCE}}" -H "x-signature: ${{SIGNATURE}}")
    """
    run_script = f"""
        set -e
        {sign}
        echo "$SIGNATURE" >&2
        curl -s -X POST "{server.url}/v1/Run/bytedance/seedream-v4" \
          -H "Content-Type: multipart/form-data" "${{AUTH[@]}}" \
          -F "prompt=Make a poster of these" -F "inputImage=@{tmp_path}/in0.png" -F "inputImage=@{tmp_path}/in1.png" \
          -F "inputImage=@{tmp_path}/in2.png" -F "inputImage={receiver.url("/style.png")}" \
          -F "size=2048x2048" -F "maxImages=1" -F "watermark=false" \
          -F "callbackUrl=Optional: Webhook URL for task completion notifications"
    """
    done = subprocess.run(["bash", "-c", run_script], capture_output=True, text=True, timeout=60, check=True)
    printed = done.stderr.strip()
    assert re.fullmatch(r"([A-Za-z0-9-]*)\(stdin\)= [0-9a-f]{64}", printed), f"openssl printed {printed!r}"
    run = json.loads(done.stdout)
    assert_like(run, wiro_samples.RUN)
    server.wait(run["taskid"])

    detail_script = f"""
        set -e
        {sign}
        curl -s -X POST "{server.url}/v1/Task/Detail" -H "Content-Type: application/json" "${{AUTH[@]}}" \
          -d '{{"tasktoken": "{run["socketaccesstoken"]}"}}'
    """
    done = subprocess.run(["bash", "-c", detail_script], capture_output=True, text=True, timeout=60, check=True)
    detail = json.loads(done.stdout)
    assert_like(detail, wiro_samples.DETAIL)
    task = detail["tasklist"][0]
    assert task["pexit"] == "0" and len(task["parameters"]["inputImage"]) == 4
    assert uuid.UUID(task["uuid"]) and task["outputs"][0]["uuid"] == task["uuid"]
    # The placeholder is no URL: the task ran, nothing was called, and both the task and its webhook log say so.
    assert task["callbackurl"] == "" and "is not an http(s) URL" in task["debugoutput"], task["debugoutput"]
    log = server.post("/v1/Task/Webhooks", json={"taskid": run["taskid"]}).json()["deliveries"]
    assert [(d["state"], d["url"]) for d in log] == [
        ("failed", "Optional: Webhook URL for task completion notifications")
    ]
    assert "no callback is sent" in log[0]["lasterror"] and receiver.posts == []
    png = subprocess.run(["curl", "-s", task["outputs"][0]["url"]], capture_output=True, timeout=60, check=True).stdout
    assert Image.open(io.BytesIO(png)).size == (2048, 2048)
