"""Service overhead: the same model run as a raw diffusers pipeline call in a loop, then through the
whole service (HTTP submit -> socket events -> output file download), side by side in one run.

    .venv/bin/python bench/overhead.py --model random:sd-turbo --images 2 --clients 4
    .venv/bin/python bench/overhead.py --model random:flux2-klein-4b-small-te --steps 1 --images 1 --clients 2 \\
        --dtype bfloat16

Prints latency (one request at a time) and throughput (``--clients`` concurrent clients) for both, and the
ratios service/raw. Random weights with the real architecture have the real speed (the images are noise).
The raw side is the floor: the pipeline call with the arguments the engine passes, in one process, returning
PIL images; the service adds HTTP, the queue, a model process, events, a PNG file and its download.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from dreamserve.client import Client

PROMPT = "a red fox in the snow"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores, {cpu}"


def model_spec(model: str, steps: int, size: int, dtype: str) -> dict[str, Any]:
    return {"source": model, "steps": steps, "max_pixels": size * size, "dtype": dtype}


def raw(
    model: str, steps: int, images: int, clients: int, size: int, dtype: str = "auto", sync: Callable[[], None] = int
) -> tuple[float, float]:
    """A plain diffusers call per image (the engine's call arguments, no callback): the floor any service sits on."""
    from dreamserve.engine.loader import load_pipeline
    from dreamserve.engine.runner import call_kwargs
    from dreamserve.presets import resolve
    from dreamserve.settings import ModelSpec

    spec = ModelSpec(**model_spec(model, steps, size, dtype))
    pipeline, family = load_pipeline(spec)
    extra = call_kwargs(pipeline, family, resolve(spec, family))

    def one() -> None:
        pipeline(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, **extra)
        sync()

    one()  # warm-up
    started = time.perf_counter()
    for _ in range(images):
        one()
    latency = (time.perf_counter() - started) / images
    started = time.perf_counter()
    for _ in range(images * clients):
        one()
    throughput = images * clients / (time.perf_counter() - started)
    return latency, throughput


def service(
    model: str, steps: int, images: int, clients: int, size: int, dtype: str = "auto", ready_timeout: float = 1800
) -> tuple[float, float]:
    """The same model behind ``dreamserve serve`` on 127.0.0.1: submit, follow the socket, download the PNG."""
    data = Path(tempfile.mkdtemp(prefix="dreamserve-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "DREAMSERVE_DATA_DIR": str(data),
        "DREAMSERVE_MIN_PIXELS": str(min(size * size, 1280 * 720)),
        "DREAMSERVE_MODELS": json.dumps({"bytedance/seedream-v4": model_spec(model, steps, size, dtype)}),
    }
    command = [sys.executable, "-m", "dreamserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=(data / "server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server, ready_timeout, data / "server.log")
        creds = json.loads((data / "credentials.json").read_text())

        stages: list[dict[str, float]] = []

        def one(client: Client, out: Path) -> None:
            run = client.run(PROMPT, size=f"{size}x{size}")
            task = client.wait(tasktoken=run.socketaccesstoken)
            assert task.succeeded, task.data.get("debugerror")
            client.download(task.outputs[0], out)
            stages.append((task.data.get("details") or {}).get("timings", {}))

        with Client(url, creds["api_key"], creds["api_secret"]) as client:
            one(client, data / "warm")
            started = time.perf_counter()
            for number in range(images):
                one(client, data / f"lat{number}")
            latency = (time.perf_counter() - started) / images
        print(f"service stages of the last latency request (s): {stages[-1]}", flush=True)

        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                with Client(url, creds["api_key"], creds["api_secret"]) as client:
                    for number in range(images):
                        one(client, data / f"tp{index}-{number}")
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        throughput = images * clients / (time.perf_counter() - started)
        if errors:
            raise errors[0]
        return latency, throughput
    finally:
        server.terminate()
        server.wait(60)


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become ready in {timeout} s:\n{log.read_text()[-3000:]}")


def report(label: str, raw_figures: tuple[float, float], svc_figures: tuple[float, float], clients: int) -> None:
    (raw_latency, raw_throughput), (svc_latency, svc_throughput) = raw_figures, svc_figures
    print(
        f"{label}service:       latency {svc_latency:.2f} s/image, throughput {svc_throughput:.3f} images/s "
        f"({clients} clients)"
    )
    print(
        f"{label}ratio service/raw: latency {svc_latency / raw_latency:.3f} (target <= 1.05), "
        f"throughput {svc_throughput / raw_throughput:.3f} (target >= 1.0)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd-turbo")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--images", type=int, default=2, help="images per client")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    print(
        f"machine: {machine()}; model {args.model}, {args.size}x{args.size}, {args.steps} step(s), dtype {args.dtype}; "
        f"{args.images} image(s) for latency, {args.images * args.clients} for throughput, after one warm-up",
        flush=True,
    )
    raw_figures = raw(args.model, args.steps, args.images, args.clients, args.size, args.dtype)
    gc.collect()  # the raw pipeline is gone before the service loads its own copy
    print(f"raw diffusers: latency {raw_figures[0]:.2f} s/image, throughput {raw_figures[1]:.3f} images/s", flush=True)
    svc_figures = service(args.model, args.steps, args.images, args.clients, args.size, args.dtype)
    report("", raw_figures, svc_figures, args.clients)


if __name__ == "__main__":
    main()
