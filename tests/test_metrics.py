"""``/metrics`` against a real server, read with Prometheus' own parsers (so the exposition formats are checked too)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from dreamserve.facts import WorkerStatus
from dreamserve.metrics import GpuMemory, Histogram, RequestStats, worker_families
from tests.conftest import MODEL, LiveServer, Receiver

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Any) -> tuple[Samples, dict[str, str]]:
    response = server.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        kinds[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, kinds


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Families:
    """Metric families as a collector, rendered as ``/metrics`` renders its own."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def exposition(families: Iterable[Metric]) -> str:
    return generate_latest(Families(families)).decode()


def test_finished_tasks_stage_histograms_workers_and_requests(tiny_server: LiveServer, receiver: Receiver) -> None:
    """On the session's shared server: what this test did is the difference between two scrapes."""
    server = tiny_server
    before, kinds = scrape(server)
    assert kinds["dreamserve_task_stage_seconds"] == "histogram"
    assert value(before, "dreamserve_queue_depth", model=MODEL) == 0
    worker = {"worker": server.workers()[0]["id"], "model": MODEL}
    assert value(before, "dreamserve_worker_up", **worker) == 1
    assert value(before, "dreamserve_worker_rss_bytes", **worker) > 50 * 2**20, "the child holds the pipeline"

    ok = server.run({"prompt": "counted", "size": "1K"})
    assert server.wait(ok["taskid"])["pexit"] == "0"
    # An input URL that answers 404 fails the task with pexit 2.
    bad = server.run({"prompt": "bad input", "size": "1K", "inputImage": receiver.url("/missing.png")})
    assert server.wait(bad["taskid"])["pexit"] == "2"
    assert server.http.post("/v1/Task/Detail", json={"taskid": "1"}).status_code == 401
    assert server.http.get("/no/such/path").status_code == 404

    after, _ = scrape(server)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert added("dreamserve_tasks_finished_total", model=MODEL, pexit="0") == 1
    assert added("dreamserve_tasks_finished_total", model=MODEL, pexit="2") == 1
    for stage in ("queue", "encode", "denoise", "decode", "save", "total"):
        assert added("dreamserve_task_stage_seconds_count", model=MODEL, stage=stage) == 1, stage
        assert added("dreamserve_task_stage_seconds_bucket", model=MODEL, stage=stage, le="+Inf") == 1
    assert added("dreamserve_task_stage_seconds_sum", model=MODEL, stage="denoise") > 0
    run_route = {"method": "POST", "route": "/v1/Run/{owner}/{model}"}
    assert added("dreamserve_http_requests_total", **run_route, status="200") == 2
    assert added("dreamserve_http_requests_total", method="POST", route="/v1/Task/Detail", status="401") == 1
    assert added("dreamserve_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert added("dreamserve_http_request_seconds_count", route="/v1/Run/{owner}/{model}") == 2

    again, _ = scrape(server)
    ok = {"model": MODEL, "pexit": "0"}
    assert value(again, "dreamserve_tasks_finished_total", **ok) == value(
        after, "dreamserve_tasks_finished_total", **ok
    ), "each task counts once"

    # A scraper that asks for OpenMetrics gets it (the parser insists on its rules: "# EOF", counter suffixes),
    # with the same counts as the text format.
    accept = {"accept": "application/openmetrics-text; version=1.0.0"}
    response = server.http.get("/metrics", headers=accept)
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    families = {family.name: family for family in openmetrics_families(response.text)}
    finished = {
        (s.labels["model"], s.labels["pexit"]): s.value
        for s in families["dreamserve_tasks_finished"].samples
        if s.name.endswith("_total")
    }
    in_text = {
        (dict(labels)["model"], dict(labels)["pexit"]): count
        for (name, labels), count in after.items()
        if name == "dreamserve_tasks_finished_total"
    }
    assert finished == in_text and {(MODEL, "0"), (MODEL, "2")} <= set(finished), (finished, in_text)


def test_queue_depth_positions_and_cancelled_tasks(make_live: Any) -> None:
    """The queue seen whole (metrics) and from each task (``queueposition`` in Detail, List and the CLI)."""
    server = make_live(model={"workers": 0})
    runs = [server.run({"prompt": f"waiting {i}", "size": "1K"}) for i in range(3)]
    samples, _ = scrape(server)
    assert value(samples, "dreamserve_queue_depth", model=MODEL) == 3
    assert value(samples, "dreamserve_tasks", model=MODEL, status="task_queue") == 3
    assert value(samples, "dreamserve_queue_oldest_seconds", model=MODEL) > 0
    assert [server.detail(run["taskid"])["queueposition"] for run in runs] == ["0", "1", "2"]
    assert server.post("/v1/Task/Cancel", json={"taskid": runs[0]["taskid"]}).json()["result"] is True
    samples, _ = scrape(server)
    assert value(samples, "dreamserve_queue_depth", model=MODEL) == 2
    assert value(samples, "dreamserve_tasks_finished_total", model=MODEL, pexit="130") == 1
    listed = server.post("/v1/Task/List", json={}).json()["tasklist"]
    assert [(t["status"], t["queueposition"]) for t in listed] == [
        ("task_queue", "1"),
        ("task_queue", "0"),
        ("task_cancel", ""),
    ]

    # generate's progress bar shows the position while the task waits; Ctrl-C then cancels it.
    creds = server.creds
    command = [
        *(sys.executable, "-m", "dreamserve", "generate", "queued behind two", "--size", "1K"),
        *("--server", server.url, "--key", creds.api_key, "--secret", creds.api_secret),
    ]
    terminal = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    shown = b""
    # Ctrl-C as a terminal sends it, also when this run was started in the background (where SIGINT is
    # ignored, and an ignored SIGINT is inherited: Python would then never raise KeyboardInterrupt).
    cli = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=terminal,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        assert cli.stderr is not None
        os.set_blocking(cli.stderr.fileno(), False)
        while b"(2 ahead)" not in shown and time.monotonic() < deadline and cli.poll() is None:
            shown += cli.stderr.read() or b""
            time.sleep(0.1)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(30) == 130
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
        cli.stderr.close()
    assert b"(2 ahead)" in shown, shown[-2000:]
    newest = server.post("/v1/Task/List", json={}).json()["tasklist"][0]
    assert newest["parameters"]["prompt"] == "queued behind two" and newest["status"] == "task_cancel"


def test_exposition_escapes_labels_and_accumulates_buckets() -> None:
    histogram = Histogram(["stage"], [1.0, 5.0])
    for seconds in (0.5, 3.0, 3.5, 9.0):
        histogram.observe(('de"noise\\',), seconds)
    families = list(text_string_to_metric_families(exposition([histogram.family("x_seconds", "help")])))
    buckets = {s.labels["le"]: s.value for s in families[0].samples if s.name == "x_seconds_bucket"}
    assert buckets == {"1.0": 1, "5.0": 3, "+Inf": 4}
    assert families[0].samples[0].labels["stage"] == 'de"noise\\'


def test_request_counts_keep_few_label_values_whatever_methods_clients_send() -> None:
    """The method is the client's text (h11 takes any token): each new one must not add a series for good."""
    stats = RequestStats()
    stats.record("GET", "unmatched", 404, 0.01)
    for number in range(1000):
        stats.record(f"X{number}", "unmatched", 405, 0.01)
    assert set(stats.counts) == {("GET", "unmatched", "404"), ("other", "unmatched", "405")}
    assert stats.counts[("other", "unmatched", "405")] == 1000


async def test_worker_memory_from_proc_and_nvidia_smi(tmp_path: Path) -> None:
    """Without a GPU here, a stand-in ``nvidia-smi`` prints what the real one prints for these two queries."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --query-compute-apps=*) echo "{os.getpid()}, 512"; echo "4194304, 10";;\n'
        '  --query-gpu=*) echo "0, 1024, 81559";;\n'
        "esac\n"
    )
    script.chmod(0o755)
    gpu = GpuMemory()
    gpu.binary = str(script)
    await gpu.refresh()
    worker = WorkerStatus(id="w0", model=MODEL, state="ready", pid=os.getpid(), tasks=[], load_seconds=1.5, error="")
    workers = [worker, dataclasses.replace(worker, id="w1", state="starting", pid=None)]
    text = exposition([*worker_families(workers, gpu), *gpu.families()])
    samples = {
        (s.name, s.labels.get("worker") or s.labels.get("gpu")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("dreamserve_worker_gpu_memory_bytes", "w0")] == 512 * 2**20
    assert samples[("dreamserve_worker_rss_bytes", "w0")] > 10 * 2**20
    assert (samples[("dreamserve_worker_up", "w0")], samples[("dreamserve_worker_up", "w1")]) == (1, 0)
    assert ("dreamserve_worker_rss_bytes", "w1") not in samples, "no process, no figure"
    assert samples[("dreamserve_gpu_memory_used_bytes", "0")] == 1024 * 2**20
    assert samples[("dreamserve_gpu_memory_total_bytes", "0")] == 81559 * 2**20
