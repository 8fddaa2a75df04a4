"""dreamserve against its peers on one weights folder: raw diffusers one image at a time, raw diffusers in one
batched call (the throughput floor), dreamserve, and LitServe with and without batching.

    .venv/bin/python bench/peers.py                                   # random SD-Turbo, 512x512, 1 step, 3 rounds
    .venv/bin/python bench/peers.py --rounds 1 --images 1 --clients 2   # a short proof run
    .venv/bin/python bench/peers.py --model random:flux2-klein-4b-small-te --steps 1 --dtype bfloat16

The weights folder is built once (random weights, real architecture: ``engine/random_init.py``) and saved with
``save_pretrained``; every system loads that same folder with the same loader and pipeline call arguments.
Each system is started as its own process tree, measured, and stopped, one after the other; the rounds rotate
the order, so that no system always runs first (cold page cache) or last.

Per system and round: time-to-ready (process start to "ready"), time-to-first-image (process start to the first
image received; the request is sent the moment the system says it is ready), latency (one client, ``--images``
requests), throughput (``--clients`` concurrent clients, ``--images`` requests each), overhead per image (client
wall time minus the server's own stage timings, one-client run), the peak RSS of its process tree (sum of RSS,
polled), and the CPU seconds that *other* processes used during its run (a noise check: near 0 on a quiet
machine). The summary gives min/median/max over rounds and the ratios to the raw floors of the same round.
Needs ``dreamserve[bench]`` (litserve, psutil).

Every system's process tree runs with the same glibc allocator settings by default (``ALLOCATOR``: those that
dreamserve's model process sets for itself on a CPU, ``dreamserve/malloc.py``, as environment variables), so that
no system is ahead by its allocator alone; ``--glibc-defaults`` runs the peers with glibc's defaults instead
(dreamserve's model process still sets its own). dreamserve's loader puts the VAE's convolutions in
channels-last memory format (``ModelSpec.channels_last``, its default, a choice of its engine); the peers run
the pipeline as diffusers loads it unless ``--peers-channels-last`` gives them the same. The table says which of
each. For dreamserve, one task of the
throughput run (the first of its largest batch) is laid out as a timeline from the client's Run to its PNG on
disk: the client's clock, the task's event log and its ``details.timings`` (one machine, one clock).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from overhead import PROMPT, free_port, machine

SYSTEMS = ("raw", "raw-batched", "dreamserve", "litserve", "litserve-batched")
#: LitServe's batching as the issue measured it: collect up to ``--clients`` requests for at most 100 ms.
LITSERVE_BATCH_TIMEOUT = 0.1
#: What ``malloc.keep_freed_memory`` sets with ``mallopt``, as glibc's environment variables: every block from the
#: heap (no mmap), and a trim threshold no heap reaches (the variable takes no -1).
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 62)}


@dataclass
class Config:
    folder: str
    steps: int
    size: int
    dtype: str
    device: str
    images: int
    clients: int
    ready_timeout: float
    #: Every system's processes get ``ALLOCATOR`` (else the peers run with glibc's defaults).
    same_allocator: bool = True
    #: More ModelSpec fields for every system (``compile``, ``quantize``: bench/gpu.py).
    options: dict[str, Any] = field(default_factory=dict)
    #: The peers' convolutions in channels-last memory format too, as dreamserve's loader puts them by default
    #: (``ModelSpec.channels_last``); else they run as diffusers loads them (contiguous).
    peers_channels_last: bool = False
    #: dreamserve's own convolutions contiguous (``ModelSpec.channels_last`` off), as the peers load them.
    dreamserve_contiguous: bool = False


@dataclass
class Figures:
    system: str
    round: int
    ready_s: float = 0.0
    first_image_s: float = 0.0
    latency_s: float = 0.0
    throughput: float = 0.0
    #: Client wall time minus the server's stage timings, per image of the one-client run (None for raw).
    overhead_s: float | None = None
    peak_rss_gib: float = 0.0
    other_cpu_s: float = 0.0
    #: The machine's 1-minute load average when the system's run ended (a second noise check).
    load_average: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: dreamserve only: one batched task of the throughput run, moment by moment (``timeline``).
    timeline: list[tuple[float, str]] = field(default_factory=list)


# -- the model, as every system loads and calls it ---------------------------------------------------------------


def load(config: Config) -> tuple[Any, Callable[[int], list[Any]]]:
    """The pipeline from the folder and a ``generate(n)`` that makes n images in one call (engine arguments), for
    the peers: their convolutions are channels-last only with ``--peers-channels-last``."""
    from dreamserve.engine.loader import load_pipeline
    from dreamserve.engine.runner import call_kwargs
    from dreamserve.presets import resolve
    from dreamserve.settings import ModelSpec

    spec = ModelSpec(**{"channels_last": config.peers_channels_last, **model_spec(config)})
    pipeline, family = load_pipeline(spec)
    extra = call_kwargs(pipeline, family, resolve(spec, family))
    size, steps = config.size, config.steps

    def generate(n: int) -> list[Any]:
        prompts = [PROMPT] * n
        return list(pipeline(prompt=prompts, height=size, width=size, num_inference_steps=steps, **extra).images)

    return pipeline, generate


def model_spec(config: Config) -> dict[str, Any]:
    return {
        "source": config.folder,
        "steps": config.steps,
        "max_pixels": config.size * config.size,
        "dtype": config.dtype,
        "device": config.device,
        "max_batch": max(1, config.clients),
        **config.options,
    }


def build_folder(model: str, dtype: str, device: str, folder: Path) -> None:
    """Random weights of ``model``'s architecture, saved as a diffusers folder (a separate process: the parent
    never imports torch, so its own memory and CPU stay out of the figures)."""
    if (folder / "model_index.json").exists():
        return
    code = (
        "import sys; from dreamserve.engine.loader import load_pipeline; from dreamserve.settings import ModelSpec;"
        "p, _ = load_pipeline(ModelSpec(source=sys.argv[1], dtype=sys.argv[2], device=sys.argv[3]));"
        "p.save_pretrained(sys.argv[4])"
    )
    print(f"building {model} ({dtype}) into {folder} ...", flush=True)
    started = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    subprocess.run([sys.executable, "-c", code, model, dtype, device, str(partial)], check=True)
    partial.rename(folder)
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)


# -- child processes: raw diffusers, and a LitServe server -------------------------------------------------------


def raw_child(config: Config, batched: bool) -> None:
    """Load, report ready, make the first image, then the latency and throughput runs; one JSON line each."""
    _, generate = load(config)
    print(json.dumps({"ready": True}), flush=True)
    generate(1)
    print(json.dumps({"first_image": True}), flush=True)
    started = time.perf_counter()
    for _ in range(config.images):
        generate(1)
    latency = (time.perf_counter() - started) / config.images
    started = time.perf_counter()
    for _ in range(config.images):
        if batched:
            generate(config.clients)
        else:
            for _ in range(config.clients):
                generate(1)
    throughput = config.images * config.clients / (time.perf_counter() - started)
    print(json.dumps({"latency": latency, "throughput": throughput}), flush=True)


def litserve_child(config: Config, port: int, batched: bool) -> None:
    import litserve as ls

    from litserve_app import ImageAPI

    api = ImageAPI(
        asdict(config),
        max_batch_size=config.clients if batched else 1,
        batch_timeout=LITSERVE_BATCH_TIMEOUT if batched else 0.0,
    )
    accelerator = "cuda" if config.device.startswith("cuda") else "cpu"
    # timeout=False: LitServe's default gives up on a request after 30 s, shorter than one CPU image.
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


# -- measuring one system ----------------------------------------------------------------------------------------


class Tree:
    """A started process tree: its peak RSS (polled) and its CPU time."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.started = time.perf_counter()
        self.log = log
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, bufsize=1
        )
        self.root = psutil.Process(self.process.pid)
        self.peak_rss = 0
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._cpu: dict[int, float] = {}
        self._done = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def members(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _poll(self) -> None:
        while not self._done.is_set():
            rss = 0
            for proc in self.members():
                try:
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    self._cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self._done.wait(0.2)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.lines.append((time.perf_counter() - self.started, json.loads(line)))

    def cpu_seconds(self) -> float:
        """CPU time of every process seen in the tree (last poll of each)."""
        for proc in self.members():
            try:
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        return sum(self._cpu.values())

    def wait_line(self, key: str, timeout: float) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seconds, line in self.lines:
                if key in line:
                    return seconds, line
            if self.process.poll() is not None and not any(key in line for _, line in self.lines):
                raise RuntimeError(f"the process exited before {key!r}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"no {key!r} in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.cpu_seconds()  # the last CPU times, while the processes still exist
        self._done.set()
        for proc in reversed(self.members()):
            with suppress(psutil.Error):
                proc.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            for proc in self.members():
                with suppress(psutil.Error):
                    proc.kill()
            self.process.wait(10)


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine (all cores, not idle or iowait), from /proc/stat."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@contextmanager
def noise_check(figures: Figures) -> Iterator[Callable[[Tree], None]]:
    """Fill ``other_cpu_s``: the machine's busy CPU time minus this bench's and the system's own."""
    me = psutil.Process()
    own_start = sum(me.cpu_times()[:2])
    busy_start = busy_cpu_seconds()
    trees: list[Tree] = []
    yield trees.append
    ours = sum(me.cpu_times()[:2]) - own_start + sum(tree.cpu_seconds() for tree in trees)
    figures.other_cpu_s = max(0.0, busy_cpu_seconds() - busy_start - ours)


def environment(config: Config, **more: str) -> dict[str, str]:
    """This process's environment for a system's tree, with ``ALLOCATOR`` on a CPU unless ``--glibc-defaults`` (on
    a GPU the model process gives host memory back: ``malloc.py``)."""
    return {**os.environ, **(ALLOCATOR if same_allocator(config) else {}), **more}


def same_allocator(config: Config) -> bool:
    return config.same_allocator and config.device == "cpu"


def measure_raw(config: Config, figures: Figures, batched: bool, scratch: Path) -> None:
    command = [sys.executable, __file__, "_raw", json.dumps(asdict(config)), "1" if batched else "0"]
    with noise_check(figures) as watch:
        tree = Tree(command, scratch / "raw.log", environment(config))
        watch(tree)
        try:
            figures.ready_s, _ = tree.wait_line("ready", config.ready_timeout)
            figures.first_image_s, _ = tree.wait_line("first_image", config.ready_timeout)
            _, result = tree.wait_line("latency", 24 * 3600)
            figures.latency_s, figures.throughput = result["latency"], result["throughput"]
        finally:
            figures.peak_rss_gib = tree.peak_rss / 2**30
            tree.stop()


def measure_dreamserve(config: Config, figures: Figures, scratch: Path) -> None:
    from dreamserve.client import Client

    port = free_port()
    env = environment(
        config,
        DREAMSERVE_DATA_DIR=str(scratch / "data"),
        DREAMSERVE_MIN_PIXELS=str(min(config.size * config.size, 1280 * 720)),
        DREAMSERVE_MODELS=json.dumps(
            {
                "bytedance/seedream-v4": {
                    **model_spec(config),
                    **({"channels_last": False} if config.dreamserve_contiguous else {}),
                }
            }
        ),
    )
    command = [sys.executable, "-m", "dreamserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with noise_check(figures) as watch:
        tree = Tree(command, scratch / "server.log", env)
        watch(tree)
        try:
            figures.ready_s = _wait_http(f"{url}/readyz", tree, config.ready_timeout)
            creds = json.loads((scratch / "data" / "credentials.json").read_text())

            def session() -> Client:
                return Client(url, creds["api_key"], creds["api_secret"])

            clocks: dict[str, dict[str, float]] = {}

            def one(client: Client, name: str) -> tuple[float, float]:
                started = time.perf_counter()
                sent = time.time()
                run = client.run(PROMPT, size=f"{config.size}x{config.size}")
                answered = time.time()
                task = client.wait(tasktoken=run.socketaccesstoken)
                if not task.succeeded:
                    raise RuntimeError(f"dreamserve task failed: {task.data.get('debugerror')}")
                seen = time.time()
                client.download(task.outputs[0], scratch / name)
                if name.startswith("tp"):  # the throughput run's
                    clocks[run.taskid] = {"run sent": sent, "run answered": answered, "final seen": seen}
                    clocks[run.taskid]["png on disk"] = time.time()
                timings = (task.data.get("details") or {}).get("timings", {})
                # The model's own work (encode, denoise, decode, upscale, PNG save); the rest is the service's.
                stages = sum(v for k, v in timings.items() if k not in ("queue", "preprocess", "load"))
                return time.perf_counter() - started, stages

            _measure_client_side(config, figures, tree, session, one)
            figures.timeline = timeline(scratch / "data" / "dreamserve.db", clocks)
        finally:
            figures.peak_rss_gib = tree.peak_rss / 2**30
            tree.stop()


def timeline(database: Path, clocks: dict[str, dict[str, float]]) -> list[tuple[float, str]]:
    """The first task of the largest batch of the throughput run, as (seconds since its Run was sent, what):
    the client's moments, the task's events and the stages its ``details.timings`` reports, in order."""
    with sqlite3.connect(database) as db:
        tasks = {str(id_): json.loads(details or "{}") for id_, details in db.execute("SELECT id, details FROM tasks")}
        taskid = max(clocks, key=lambda t: (len(tasks.get(t, {}).get("batched_with") or []), -int(t)))
        events = db.execute("SELECT type, created FROM task_events WHERE task_id = ? ORDER BY id", (int(taskid),))
        moments = [(created, f"event {kind}") for kind, created in events]
    moments += [(at, f"client: {what}") for what, at in clocks[taskid].items()]
    start = clocks[taskid]["run sent"]
    lines = sorted((at - start, what) for at, what in moments)
    details = tasks.get(taskid, {})
    stages = ", ".join(f"{name} {seconds:.3f}" for name, seconds in (details.get("timings") or {}).items())
    batch = len(details.get("batched_with") or []) + 1
    return [*lines, (lines[-1][0], f"task {taskid}, batch of {batch}; details.timings (s): {stages}")]


def measure_litserve(config: Config, figures: Figures, batched: bool, scratch: Path) -> None:
    port = free_port()
    command = [sys.executable, __file__, "_litserve", json.dumps(asdict(config)), str(port), "1" if batched else "0"]
    url = f"http://127.0.0.1:{port}"
    with noise_check(figures) as watch:
        tree = Tree(command, scratch / "litserve.log", environment(config))
        watch(tree)
        try:
            figures.ready_s = _wait_http(f"{url}/health", tree, config.ready_timeout)

            def session() -> httpx.Client:
                return httpx.Client(timeout=None)

            def one(http: httpx.Client, _name: str) -> tuple[float, float]:
                started = time.perf_counter()
                response = http.post(f"{url}/predict", json={"prompt": PROMPT})
                response.raise_for_status()
                body = response.json()
                base64.b64decode(body["image"])
                return time.perf_counter() - started, float(body["seconds"])

            _measure_client_side(config, figures, tree, session, one)
        finally:
            figures.peak_rss_gib = tree.peak_rss / 2**30
            tree.stop()


def _measure_client_side(
    config: Config,
    figures: Figures,
    tree: Tree,
    session: Callable[[], Any],
    one: Callable[[Any, str], tuple[float, float]],
) -> None:
    """First image, latency and overhead (one client), then throughput (``--clients`` threads, each making
    ``--images`` requests one after another). ``one`` returns (client wall time, server stage seconds)."""
    with session() as client:
        one(client, "first")
        figures.first_image_s = time.perf_counter() - tree.started
        walls = [one(client, f"lat{number}") for number in range(config.images)]
    figures.latency_s = sum(wall for wall, _ in walls) / config.images
    figures.overhead_s = sum(wall - stages for wall, stages in walls) / config.images

    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with session() as client:
                for number in range(config.images):
                    one(client, f"tp{index}-{number}")
        except BaseException as exc:  # re-raised after the join
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(config.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    figures.throughput = config.images * config.clients / seconds


def _wait_http(url: str, tree: Tree, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tree.process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{tree.log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - tree.started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} was not ready in {timeout} s:\n{tree.log.read_text()[-3000:]}")


def measure(system: str, config: Config, round_: int) -> Figures:
    figures = Figures(system, round_)
    scratch = Path(tempfile.mkdtemp(prefix=f"dreamserve-peers-{system}-"))
    started = time.perf_counter()
    if system in ("raw", "raw-batched"):
        measure_raw(config, figures, system == "raw-batched", scratch)
    elif system == "dreamserve":
        measure_dreamserve(config, figures, scratch)
    else:
        measure_litserve(config, figures, system == "litserve-batched", scratch)
    figures.wall_s = time.perf_counter() - started
    figures.load_average = os.getloadavg()[0]
    return figures


# -- the report --------------------------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 3) -> str:
    """min/median/max (one value alone when there is one round)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return "/".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def summary(results: list[Figures], systems: list[str], allocator: str) -> None:
    by_round: dict[int, dict[str, Figures]] = {}
    for figures in results:
        by_round.setdefault(figures.round, {})[figures.system] = figures

    def ratios(system: str, metric: Callable[[Figures, dict[str, Figures]], float | None]) -> list[float]:
        values = []
        for row in by_round.values():
            if system in row:
                value = metric(row[system], row)
                if value is not None:
                    values.append(value)
        return values

    def over(floor: str, attr: str) -> Callable[[Figures, dict[str, Figures]], float | None]:
        def metric(f: Figures, row: dict[str, Figures]) -> float | None:
            base = getattr(row[floor], attr) if floor in row else 0.0
            return getattr(f, attr) / base if base else None

        return metric

    def minus_raw(f: Figures, row: dict[str, Figures]) -> float | None:
        return f.first_image_s - row["raw"].first_image_s if "raw" in row else None

    print("\nmin/median/max over rounds; ratios are to the raw floors of the same round; allocator: " + allocator)
    head = (
        "| system | throughput / raw batched | throughput / raw 1-by-1 | latency / raw | overhead s/image | "
        "images/s | latency s | ready s | first image s | first image - raw s | peak RSS GiB | other CPU s |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for system in systems:
        rows = [f for f in results if f.system == system]
        overheads = [f.overhead_s for f in rows if f.overhead_s is not None]
        cells = [
            spread(ratios(system, over("raw-batched", "throughput"))),
            spread(ratios(system, over("raw", "throughput"))),
            spread(ratios(system, over("raw", "latency_s"))),
            spread(overheads) if overheads else "-",
            spread([f.throughput for f in rows], 4),
            spread([f.latency_s for f in rows], 2),
            spread([f.ready_s for f in rows], 1),
            spread([f.first_image_s for f in rows], 1),
            spread(ratios(system, minus_raw), 1),
            spread([f.peak_rss_gib for f in rows], 2),
            spread([f.other_cpu_s for f in rows], 1),
        ]
        print(f"| {system} | " + " | ".join(cells) + " |")


#: Issue 28's targets for dreamserve, each against a peer of the same round: (what, peer, the figure, target).
TARGETS: tuple[tuple[str, str, Callable[[Figures, Figures], float], str], ...] = (
    ("throughput / LitServe batched's", "litserve-batched", lambda d, p: d.throughput / p.throughput, ">= 1.05"),
    ("latency / raw's", "raw", lambda d, p: d.latency_s / p.latency_s, "<= 1.02"),
    ("first image - LitServe batched's, s", "litserve-batched", lambda d, p: d.first_image_s - p.first_image_s, "<= 0"),
    ("first image - LitServe's, s", "litserve", lambda d, p: d.first_image_s - p.first_image_s, "<= 0"),
    ("peak RSS - raw's, GiB", "raw", lambda d, p: d.peak_rss_gib - p.peak_rss_gib, "<= 0.5"),
)


def targets(results: list[Figures]) -> None:
    """dreamserve against its peers, round by round, as issue 28 states its targets."""
    by_round: dict[int, dict[str, Figures]] = {}
    for figures in results:
        by_round.setdefault(figures.round, {})[figures.system] = figures
    print("\nissue 28's figures (dreamserve against a peer of the same round):")
    print("| figure | target | " + " | ".join(f"round {r}" for r in sorted(by_round)) + " |")
    print("|---|---|" + "---|" * len(by_round))
    for what, peer, figure, target in TARGETS:
        cells = []
        for round_ in sorted(by_round):
            row = by_round[round_]
            cells.append(f"{figure(row['dreamserve'], row[peer]):.3f}" if {"dreamserve", peer} <= set(row) else "-")
        print(f"| {what} | {target} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd-turbo", help="a random-weight builder (loader.BUILDERS)")
    parser.add_argument("--weights", type=Path, help="the weights folder (built there if missing)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2, help="requests per client (latency: one client)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, and the batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--ready-timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--peers-channels-last",
        action="store_true",
        help="give raw diffusers and LitServe dreamserve's channels-last convolutions too",
    )
    parser.add_argument(
        "--dreamserve-contiguous",
        action="store_true",
        help="dreamserve's convolutions contiguous too (ModelSpec.channels_last off), as the peers load them",
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="run the peers with glibc's default allocator, not dreamserve's CPU settings (ALLOCATOR)",
    )
    args = parser.parse_args()

    folder = args.weights or Path(tempfile.gettempdir()) / f"dreamserve-peers-{args.model.split(':')[-1]}-{args.dtype}"
    build_folder(args.model, args.dtype, args.device, folder)
    config = Config(
        str(folder),
        args.steps,
        args.size,
        args.dtype,
        args.device,
        args.images,
        args.clients,
        args.ready_timeout,
        same_allocator=not args.glibc_defaults,
        peers_channels_last=args.peers_channels_last,
        dreamserve_contiguous=args.dreamserve_contiguous,
    )
    allocator = (
        "glibc's defaults for the peers (dreamserve's model process sets its own on a CPU)"
        if not same_allocator(config)
        else "every system's processes with " + " ".join(f"{k}={v}" for k, v in ALLOCATOR.items())
    )
    print(
        f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model {args.model} "
        f"({folder}), {args.size}x{args.size}, {args.steps} step(s), {args.dtype} on {args.device}; "
        f"{args.images} image(s) for latency, {args.images * args.clients} for throughput with {args.clients} "
        f"clients; {args.rounds} round(s); allocator: {allocator}; convolutions: dreamserve channels-last (its "
        f"default), peers {'channels-last too' if args.peers_channels_last else 'as diffusers loads them'}",
        flush=True,
    )
    results: list[Figures] = []
    for round_ in range(args.rounds):
        shift = round_ % len(args.systems)
        for system in args.systems[shift:] + args.systems[:shift]:
            figures = measure(system, config, round_)
            results.append(figures)
            overhead = "-" if figures.overhead_s is None else f"{figures.overhead_s:.3f}"
            print(
                f"round {round_} {system}: latency {figures.latency_s:.2f} s, throughput {figures.throughput:.4f} "
                f"images/s, overhead {overhead}"
                f" s/image, ready {figures.ready_s:.1f} s, first image {figures.first_image_s:.1f} s, peak RSS "
                f"{figures.peak_rss_gib:.2f} GiB, other CPU {figures.other_cpu_s:.1f} s, load average "
                f"{figures.load_average:.2f} (wall {figures.wall_s:.0f} s)",
                flush=True,
            )
            for seconds, what in figures.timeline:
                print(f"  {seconds:8.3f} s  {what}", flush=True)
    summary(results, args.systems, allocator)
    targets(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in results], indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_raw":
        raw_child(Config(**json.loads(sys.argv[2])), batched=sys.argv[3] == "1")
    elif len(sys.argv) > 1 and sys.argv[1] == "_litserve":
        litserve_child(Config(**json.loads(sys.argv[2])), int(sys.argv[3]), batched=sys.argv[4] == "1")
    else:
        main()
