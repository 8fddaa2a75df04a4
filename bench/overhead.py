"""Service overhead: the same model run as a raw diffusers pipeline call in a loop, then through the
whole service (HTTP submit -> socket events -> output file download), side by side in one run.

    .venv/bin/python bench/overhead.py --model random:sd-turbo --images 2 --clients 4

Prints latency (one request at a time) and throughput (``--clients`` concurrent clients) for both,
and the ratios service/raw. Random weights with the real architecture have the real speed.
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
from pathlib import Path

import httpx

from dreamserve.client import Client

SIZE = 512


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw(model: str, steps: int, images: int, clients: int) -> tuple[float, float]:
    """A plain diffusers call per image: the floor any service sits on."""
    from dreamserve.engine.loader import load_pipeline
    from dreamserve.models import resolve
    from dreamserve.settings import ModelSpec

    pipeline, family = load_pipeline(resolve(ModelSpec(source=model, steps=steps)))
    extra = {"guidance_scale": 0.0} if family == "sd" else {}

    def one() -> None:
        pipeline(prompt="a red fox in the snow", height=SIZE, width=SIZE, num_inference_steps=steps, **extra)

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


def service(model: str, steps: int, images: int, clients: int) -> tuple[float, float]:
    data = Path(tempfile.mkdtemp(prefix="dreamserve-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "DREAMSERVE_DATA_DIR": str(data),
        "DREAMSERVE_MIN_PIXELS": str(SIZE * SIZE),
        "DREAMSERVE_MODELS": json.dumps(
            {"bytedance/seedream-v4": {"source": model, "steps": steps, "max_pixels": SIZE * SIZE}}
        ),
    }
    command = [sys.executable, "-m", "dreamserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=(data / "server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server)
        creds = json.loads((data / "credentials.json").read_text())

        def one(client: Client, out: Path) -> None:
            run = client.run("a red fox in the snow", size=f"{SIZE}x{SIZE}")
            task = client.wait(tasktoken=run.socketaccesstoken)
            assert task.succeeded, task.data.get("debugerror")
            client.download(task.outputs[0], out)

        with Client(url, creds["api_key"], creds["api_secret"]) as client:
            one(client, data / "warm")
            started = time.perf_counter()
            for number in range(images):
                one(client, data / f"lat{number}")
            latency = (time.perf_counter() - started) / images

        def worker(index: int) -> None:
            with Client(url, creds["api_key"], creds["api_secret"]) as client:
                for number in range(images):
                    one(client, data / f"tp{index}-{number}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        throughput = images * clients / (time.perf_counter() - started)
        return latency, throughput
    finally:
        server.terminate()
        server.wait(30)


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited; see its log in the data folder")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd-turbo")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--images", type=int, default=2, help="images per client")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}; model {args.model}, {SIZE}x{SIZE}, {args.steps} step(s)")
    raw_latency, raw_throughput = raw(args.model, args.steps, args.images, args.clients)
    gc.collect()  # the raw pipeline is gone before the service loads its own copy
    print(f"raw diffusers: latency {raw_latency:.2f} s/image, throughput {raw_throughput:.3f} images/s")
    svc_latency, svc_throughput = service(args.model, args.steps, args.images, args.clients)
    print(
        f"service:       latency {svc_latency:.2f} s/image, throughput {svc_throughput:.3f} images/s "
        f"({args.clients} clients)"
    )
    print(
        f"ratio service/raw: latency {svc_latency / raw_latency:.3f} (target <= 1.05), "
        f"throughput {svc_throughput / raw_throughput:.3f} (target >= 1.0)"
    )


if __name__ == "__main__":
    main()
