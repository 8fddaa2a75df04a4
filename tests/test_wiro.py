"""Wiro compatibility held to the published page and Wiro's own clients (issue 12), through the in-process app.

One app with no model worker is shared by the tests that only need queued tasks (shapes of Cancel and Kill,
Tool/*, Task/List, checks at Run); the file tests run a task to the end (on the scripted model process) on an app
that refuses private fetches.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dreamserve.services import Services
from dreamserve.settings import ModelSpec
from dreamserve.signing import sign, signature_hex
from tests import wiro_samples
from tests.conftest import MODEL, App, open_app, png_bytes
from tests.wiro_samples import assert_like

OTHER = "acme/sketch-v1"


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Two served models, no worker: every task stays queued until it is cancelled."""
    models = {MODEL: ModelSpec(workers=0), OTHER: ModelSpec(workers=0, max_references=3)}
    app = open_app(tmp_path_factory.mktemp("queued"), allow_private=False, models=models, min_pixels=64 * 64)
    yield app
    app.close()


def _error(body: dict[str, Any]) -> tuple[int, str]:
    assert body["result"] is False and list(body) == ["result", "errors"], body
    return body["errors"][0]["code"], body["errors"][0]["message"]


# -- 1: the page's signature recipe ------------------------------------------------------------------------------


def test_openssl_output_lines_are_accepted_by_their_hex() -> None:
    digest = sign("api", "secret", "nonce-1")
    assert digest == "d453af9a65c4ddd1ff17d5b03d3224b906899f3445dc4b4aadb5580260c60586"  # WiroKit's test vector
    for line in (f"SHA2-256(stdin)= {digest}", f"(stdin)= {digest}", f"HMAC-SHA256(stdin)= {digest.upper()}", digest):
        assert signature_hex(line) == digest, line
    for wrong in (f"SHA2-256(stdin)= {digest[:-1]}", f"x {digest}", f"(stdin)={digest}0", f"(file)= {digest}"):
        assert signature_hex(wrong) != digest, wrong


def test_signature_lines_through_the_server(queued: App) -> None:
    creds = queued.creds
    assert creds is not None and creds.api_secret is not None
    nonce = str(int(time.time()))
    line = f"SHA2-256(stdin)= {sign(creds.api_key, creds.api_secret, nonce)}"
    headers = {"x-api-key": creds.api_key, "x-nonce": nonce, "x-signature": line}
    assert queued.http.post("/v1/Task/List", headers=headers, json={}).json()["result"] is True
    bad = {**headers, "x-signature": f"SHA2-256(stdin)= {'0' * 64}"}
    response = queued.http.post("/v1/Task/List", headers=bad, json={})
    assert response.status_code == 401
    code, message = _error(response.json())
    assert code == 0 and "lowercase hex of HMAC-SHA256 keyed with the API key" in message
    assert creds.api_secret not in message and creds.api_key not in message and "0" * 64 not in message


# -- 3: shapes in the page's order --------------------------------------------------------------------------------


def test_run_detail_cancel_kill_answer_like_the_page(queued: App) -> None:
    upload = png_bytes(80, 80)
    first = queued.run({"prompt": "one", "size": "64x64"}, files=[("inputImage", ("a.png", upload, "image/png"))])
    second = queued.run({"prompt": "two", "size": "64x64", "maxImages": "0"})
    assert_like(first, wiro_samples.RUN)
    detail = queued.post("/v1/Task/Detail", json={"tasktoken": first["socketaccesstoken"]}).json()
    assert_like(detail, wiro_samples.DETAIL)
    task = detail["tasklist"][0]
    assert task["status"] == "task_queue" and uuid.UUID(task["uuid"]).version == 5
    input_url = task["parameters"]["inputImage"]
    assert isinstance(input_url, str) and queued.http.get(input_url).status_code == 200, "one input is a string"

    cancelled = queued.post("/v1/Task/Cancel", json={"taskid": first["taskid"]}).json()
    killed = queued.post("/v1/Task/Kill", json={"socketaccesstoken": second["socketaccesstoken"]}).json()
    for answer in (cancelled, killed):
        assert_like(answer, wiro_samples.STOPPED)
        assert answer["tasklist"][0]["status"] == "task_cancel"
    # 9: maxImages 0 is the default, 1.
    assert killed["tasklist"][0]["parameters"]["maxImages"] == "1"
    # 11: a cancelled task's inputs are deleted when it ends.
    assert queued.http.get(input_url).status_code == 404
    assert cancelled["tasklist"][0]["uuid"] == task["uuid"]


def test_cancel_and_kill_echo_the_input_urls_detail_showed(queued: App) -> None:
    """A task's inputs are facts: Cancel and Kill answer with the URLs of its uploaded inputs that Detail showed
    while it was queued, and so does Detail afterwards, though the files themselves are deleted as it ends."""
    uploads = [("inputImage", (f"{n}.png", png_bytes(64 + n, 64), "image/png")) for n in range(3)]
    tasks = [queued.run({"prompt": "three inputs", "size": "64x64"}, files=uploads) for _ in range(2)]
    shown = []
    for task in tasks:
        (detail,) = queued.post("/v1/Task/Detail", json={"taskid": task["taskid"]}).json()["tasklist"]
        urls = detail["parameters"]["inputImage"]
        assert isinstance(urls, list) and len(set(urls)) == 3 and all(url.startswith("http") for url in urls), urls
        assert [queued.http.get(url).status_code for url in urls] == [200, 200, 200]
        shown.append(urls)
    cancelled = queued.post("/v1/Task/Cancel", json={"taskid": tasks[0]["taskid"]}).json()["tasklist"][0]
    killed = queued.post("/v1/Task/Kill", json={"taskid": tasks[1]["taskid"]}).json()["tasklist"][0]
    for answer, urls in zip((cancelled, killed), shown, strict=True):
        assert answer["status"] == "task_cancel" and answer["parameters"]["inputImage"] == urls
        (detail,) = queued.post("/v1/Task/Detail", json={"taskid": answer["id"]}).json()["tasklist"]
        assert detail["parameters"]["inputImage"] == urls and detail["details"] == {}, "what keeps them is private"
        assert [queued.http.get(url).status_code for url in urls] == [404, 404, 404], "deleted when the task ended"


def test_detail_without_a_body_names_tasktoken(queued: App) -> None:
    code, message = _error(queued.post("/v1/Task/Detail").json())
    assert code == 0 and '"tasktoken"' in message and "taskid" in message


# -- 4: model discovery -------------------------------------------------------------------------------------------

LIST_BODY = {
    "start": "0",
    "limit": "20",
    "search": "",
    "sort": "id",
    "order": "ASC",
    "categories": [],
    "tags": [],
    "slugowner": "",
    "hideworkflows": True,
    "summary": True,
}


def _tool_list(server: App, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = server.post("/v1/Tool/List", json={**LIST_BODY, **changes}).json()
    assert body["result"] is True, body
    assert_like(body, wiro_samples.TOOL_LIST)
    return body


def _slugs(body: dict[str, Any]) -> list[str]:
    return [f"{t['slugowner']}/{t['slugproject']}" for t in body["tool"]]


def test_tool_list_filters_over_the_served_models(queued: App) -> None:
    everything = _tool_list(queued)
    assert everything["total"] == "2" and _slugs(everything) == [OTHER, MODEL]
    seed = next(tool for tool in everything["tool"] if tool["slugproject"] == "seedream-v4")
    assert seed["categories"] == ["tool", "text-to-image", "image-to-image", "image-editing"]
    assert isinstance(seed["dynamicprice"], str) and isinstance(json.loads(seed["dynamicprice"]), list)
    # Both serve the Seedream API (description, tags); only one is named so.
    assert _tool_list(queued, search="SEEDREAM")["total"] == "2"
    assert _slugs(_tool_list(queued, search="Seedream-V4")) == [MODEL]
    assert _slugs(_tool_list(queued, search="sketch", sort="relevance")) == [OTHER]
    assert _tool_list(queued, search="no such model")["total"] == "0"
    assert _slugs(_tool_list(queued, slugowner="ByteDance")) == [MODEL]
    assert _tool_list(queued, slugowner="someone")["tool"] == []
    assert _tool_list(queued, categories=["text-to-image"])["total"] == "2"
    assert _tool_list(queued, categories=["text-to-video"])["total"] == "0"
    assert _tool_list(queued, tags=["no-such-tag"])["total"] == "0"
    assert _slugs(_tool_list(queued, order="DESC")) == [MODEL, OTHER]
    page = _tool_list(queued, start="1", limit="1")
    assert page["total"] == "2" and _slugs(page) == [MODEL]
    assert _tool_list(queued, start=5)["tool"] == []
    code, message = _error(queued.post("/v1/Tool/List", json={"sort": "newest"}).json())
    assert code == 0 and "relevance" in message


def test_tool_detail_has_the_seedream_schema(queued: App) -> None:
    runs_before = int(_tool_list(queued, search="seedream-v4")["tool"][0]["taskstat"]["runcount"])
    queued.run({"prompt": "counted", "size": "64x64"})
    body = queued.post("/v1/Tool/Detail", json={"slugowner": "bytedance", "slugproject": "seedream-v4"}).json()
    assert_like(body, wiro_samples.TOOL_DETAIL)
    item = body["tool"][0]
    assert int(item["taskstat"]["runcount"]) == runs_before + 1
    items = {p["id"]: p for group in item["parameters"] for p in group["items"]}
    assert list(items) == ["prompt", "inputImage", "size", "maxImages", "watermark"]
    assert (items["prompt"]["type"], items["prompt"]["required"]) == ("textarea", True)
    assert items["inputImage"]["type"] == "combinefileinput" and items["inputImage"]["required"] is False
    size = items["size"]
    assert size["type"] == "select" and size["default"] == "2048x2048"
    assert [o["value"] for o in size["options"]] == [
        "2048x2048",
        "2304x1728",
        "1728x2304",
        "2560x1440",
        "1440x2560",
        "2496x1664",
        "1664x2496",
        "3024x1296",
    ]
    assert [items["maxImages"][k] for k in ("type", "min", "max", "default")] == ["number", "1", "15", "1"]
    watermark = items["watermark"]
    assert watermark["default"] == "false" and [o["value"] for o in watermark["options"]] == ["false", "true"]
    # The other model takes 3 references: its schema says so.
    other = queued.post("/v1/Tool/Detail", json={"slugowner": "acme", "slugproject": "sketch-v1", "summary": True})
    notes = {p["id"]: p["note"] for g in other.json()["tool"][0]["parameters"] for p in g["items"]}
    assert "first 3" in notes["inputImage"]

    code, message = _error(queued.post("/v1/Tool/Detail", json={"slugowner": "x", "slugproject": "y"}).json())
    assert code == 1 and message.startswith("slug-owner-project-not-exist")


def test_tool_explore(queued: App) -> None:
    body = queued.post("/v1/Tool/Explore", json={}).json()
    assert_like(body, wiro_samples.TOOL_EXPLORE)
    assert sorted(f"{t['slugowner']}/{t['slugproject']}" for t in body["explore"][0]["tools"]) == [OTHER, MODEL]


# -- 2, 6: what is checked at Run ---------------------------------------------------------------------------------


def test_placeholder_callback_runs_without_one_and_urls_are_checked_at_run(queued: App) -> None:
    placeholder = "Optional: Webhook URL for task completion notifications"
    run = queued.run({"prompt": "x", "size": "64x64", "callbackUrl": placeholder})
    assert run["result"] is True, run
    task = queued.detail(run["taskid"])
    assert task["callbackurl"] == "" and "is not an http(s) URL" in task["debugoutput"]
    log = queued.post("/v1/Task/Webhooks", json={"taskid": run["taskid"]}).json()["deliveries"]
    assert [(d["state"], d["url"], d["attempts"]) for d in log] == [("failed", placeholder, "0")]
    assert "no callback is sent" in log[0]["lasterror"]
    code, message = _error(queued.run({"prompt": "x", "size": "64x64", "callbackUrl": "ftp://example.com/hook"}))
    assert "http:// or https://" in message, "a URL of another scheme is still refused"

    total = queued.post("/v1/Task/List", json={}).json()["total"]
    refused = {
        "http://127.0.0.1:9/ref.png": "127.0.0.1 is a loopback address",
        "http://localhost:9/ref.png": "resolves to",
        "http://169.254.169.254/latest/meta-data/": "link-local",
        "http://no-such-host.invalid/ref.png": "does not resolve",
        "http://[::1/ref.png": "is not an http(s) URL",
        # This server's own file route with an access key it does not know.
        f"{queued.url}/v1/File/{'0' * 8}/x.png": "names no file on this server",
    }
    for url, why in refused.items():
        code, message = _error(queued.run({"prompt": "x", "size": "64x64", "inputImage": [url]}))
        assert code == 0 and why in message, (url, message)
        if "File" not in url and "[::1/" not in url:
            assert "does not fetch from private" in message or "does not resolve" in message, message
    assert queued.post("/v1/Task/List", json={}).json()["total"] == total, "nothing was stored"


# -- 7: Task/List ------------------------------------------------------------------------------------------------


def test_task_list_filters(queued: App) -> None:
    mine = [queued.post(f"/v1/Run/{slug}", json={"prompt": slug, "size": "64x64"}).json() for slug in (OTHER, MODEL)]
    ids = [int(run["taskid"]) for run in mine]

    def listed(**body: Any) -> tuple[int, list[dict[str, Any]]]:
        answer = queued.post("/v1/Task/List", json={"type": "model", **body}).json()
        assert answer["result"] is True and list(answer) == ["total", "errors", "tasklist", "result"], answer
        return int(answer["total"]), answer["tasklist"]

    total, newest = listed(sort="id", order="DESC", start="0", limit="2")
    assert [int(t["id"]) for t in newest] == ids[::-1] and total >= 2
    acme_total, acme = listed(modelName="ACME")
    assert acme_total == 1 and acme[0]["modelslugowner"] == "acme"
    seed_total, seed = listed(modelName="seedream-V4", order="ASC", limit=100)
    assert seed_total == total - 1 and all(t["modelslugproject"] == "seedream-v4" for t in seed)
    assert [int(t["id"]) for t in seed] == sorted(int(t["id"]) for t in seed)
    assert listed(modelName="100%_")[0] == 0, "LIKE wildcards are matched literally"
    _, second = listed(start="1", limit="1")
    assert int(second[0]["id"]) == ids[0]
    assert listed(type="agent") == (0, [])
    code, message = _error(queued.post("/v1/Task/List", json={"order": "sideways"}).json())
    assert '"ASC" or "DESC"' in message
    for run in mine:
        queued.post("/v1/Task/Cancel", json={"taskid": run["taskid"]})


# -- 10: InputOutputDelete on tasks that have not ended ----------------------------------------------------------


def test_input_output_delete_refuses_unfinished_and_unknown_tasks(queued: App) -> None:
    run = queued.run({"prompt": "x", "size": "64x64"})
    token = {"tasktoken": run["socketaccesstoken"]}
    code, message = _error(queued.post("/v1/Task/InputOutputDelete", json=token).json())
    assert code == 1 and message.startswith("Task must be completed or cancelled before deleting files")
    code, message = _error(queued.post("/v1/Task/InputOutputDelete", json={"tasktoken": "nope"}).json())
    assert (code, message) == (1, "task-not-exist")
    queued.post("/v1/Task/Cancel", json={"taskid": run["taskid"]})
    done = queued.post("/v1/Task/InputOutputDelete", json=token).json()
    assert done == {"errors": [], "result": True}


# -- 5, 10, 11: the server's own file URLs as inputs, deleting files, retention ------------------------------------


def test_uploaded_url_as_input_then_delete_and_retention(scripted: Any) -> None:
    """On an app that refuses private fetches, File/Upload's URL (on 127.0.0.1) is a working input."""
    server = scripted(allow_private=False, model={"max_pixels": 64 * 64}, min_pixels=64 * 64, retention_seconds=3600)
    uploaded = server.post("/v1/File/Upload", files={"file": ("mine.png", png_bytes(80, 80), "image/png")}).json()
    upload_url = uploaded["list"][0]["url"]
    assert upload_url.startswith("http://127.0.0.1:")
    assert int(uploaded["list"][0]["expiretime"]) == int(uploaded["list"][0]["addedtime"]) + 3600
    # Another spelling of this host, as a client behind a proxy might send it: the path and key decide.
    aliased = upload_url.replace("127.0.0.1", "localhost")
    runs = [
        server.run({"prompt": "from my upload", "size": "64x64", "inputImage": url}) for url in (upload_url, aliased)
    ]
    tasks = [server.wait(run["taskid"]) for run in runs]
    for task in tasks:
        assert task["pexit"] == "0", task["debugerror"]
        assert task["details"]["timings"].get("preprocess") is not None
    detail = server.post("/v1/Task/Detail", json={"taskid": runs[0]["taskid"]}).json()
    assert_like(detail, wiro_samples.DETAIL)
    output = detail["tasklist"][0]["outputs"][0]
    assert int(output["expiretime"]) == int(output["addedtime"]) + 3600
    assert output["uuid"] == detail["tasklist"][0]["uuid"]

    # InputOutputDelete: rows and bytes of inputs and outputs; again is fine; the upload itself stays.
    token = runs[0]["socketaccesstoken"]
    input_url = tasks[0]["parameters"]["inputImage"]
    assert server.http.get(output["url"]).status_code == 200 and server.http.get(input_url).status_code == 200
    for _ in range(2):
        assert server.post("/v1/Task/InputOutputDelete", json={"tasktoken": token}).json() == {
            "errors": [],
            "result": True,
        }
    assert server.detail(runs[0]["taskid"])["outputs"] == []
    assert server.http.get(output["url"]).status_code == 404 and server.http.get(input_url).status_code == 404
    assert server.http.get(upload_url).status_code == 200

    # Retention, with the clock moved past expiry instead of waiting: the reaper's own step, on the same database.
    kept = tasks[1]["outputs"][0]["url"]

    async def expire(now: float) -> int:
        services = Services(server.settings, workers="none")
        try:
            return await services.expire(now=now)
        finally:
            await services.engine.dispose()

    assert asyncio.run(expire(time.time() + 60)) == 0, "nothing expires early"
    assert server.http.get(kept).status_code == 200
    assert asyncio.run(expire(time.time() + 3601)) == 3, "the second task's input and output, and the upload"
    assert server.detail(runs[1]["taskid"])["outputs"] == [] and server.http.get(kept).status_code == 404
    assert server.http.get(upload_url).status_code == 404, "uploads are counted by retention too"
    assert [p for p in server.settings.blob_dir.rglob("*") if p.is_file()] == []
