"""Memory of the API process under Runs with many large references (issue 30, item 1).

Starts its own server (the tiny model) in a fresh data folder, makes a PNG (``--side`` px square; ``--noise``
makes it incompressible, ~27 MiB at 3072 px, else it is flat: few bytes, many pixels), then fires ``--runs``
concurrent Runs of ``--references`` references each, ``--rounds`` times over, while two threads sample the API
process's RSS (``bench/load.py``'s ``memory``: VmRSS and anonymous RSS) and ``/healthz``'s latency every
``--every`` seconds. With ``--send own`` the references are this server's file URLs (``File/Upload`` first,
one upload per reference, in a JSON Run); with ``--send multipart`` the PNG itself, that many times, in a
multipart Run. Reports the RSS before and at its peak, /healthz p50/p99/max, and every Run's answer (HTTP
status, and Wiro's error code when ``result`` is false). Not a test: run it by hand, e.g.

    .venv/bin/python bench/references.py --noise --side 3072 --send own
    .venv/bin/python bench/references.py --side 6000 --send multipart
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from dreamserve.signing import auth_headers
from load import MODEL, memory, start_server


def make_png(side: int, noise: bool) -> bytes:
    if noise:
        image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    else:
        image = Image.new("RGB", (side, side), (120, 80, 200))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


class Sampler:
    """RSS of the API process and /healthz latency, each in its own thread, until ``stop``."""

    def __init__(self, url: str, pid: int, every: float) -> None:
        self.url, self.pid, self.every = url, pid, every
        self.rss: list[dict[str, Any]] = []
        self.healthz: list[float] = []
        self.healthz_failed = 0
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._memory), threading.Thread(target=self._health)]

    def __enter__(self) -> Sampler:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join()

    def _memory(self) -> None:
        while not self.done.wait(self.every):
            self.rss.append(memory(self.pid))

    def _health(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.done.wait(self.every):
                started = time.monotonic()
                try:
                    ok = http.get(f"{self.url}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.healthz.append(time.monotonic() - started)
                self.healthz_failed += not ok


async def upload(http: httpx.AsyncClient, url: str, creds: Any, png: bytes) -> str:
    files = {"file": ("reference.png", png, "image/png")}
    response = await http.post(
        f"{url}/v1/File/Upload", headers=auth_headers(creds.api_key, creds.api_secret), files=files
    )
    answer = response.json()
    if not answer.get("result"):
        raise SystemExit(f"upload failed: {answer}")
    return str(answer["list"][0]["url"])


async def one_run(http: httpx.AsyncClient, url: str, creds: Any, args: argparse.Namespace, refs: Any) -> str:
    headers = auth_headers(creds.api_key, creds.api_secret)
    body = {"prompt": "references", "size": "64x64", "maxImages": "1"}
    if args.send == "own":
        response = await http.post(f"{url}/v1/Run/{MODEL}", headers=headers, json={**body, "inputImage": refs})
    else:
        files = [("inputImage", (f"r{n}.png", refs, "image/png")) for n in range(args.references)]
        response = await http.post(f"{url}/v1/Run/{MODEL}", headers=headers, data=body, files=files)
    answer = response.json()
    if answer.get("result"):
        return f"HTTP {response.status_code} result true"
    return f"HTTP {response.status_code} code {answer['errors'][0]['code']}: {answer['errors'][0]['message'][:70]}"


async def fire(url: str, creds: Any, args: argparse.Namespace, png: bytes, sampler_args: tuple[int, float]) -> Any:
    async with httpx.AsyncClient(timeout=300) as http:
        refs: Any = png
        if args.send == "own":
            refs = [await upload(http, url, creds, png) for _ in range(args.references)]
        await asyncio.sleep(1.0)
        before = memory(sampler_args[0])
        answers: dict[str, int] = {}
        with Sampler(url, *sampler_args) as sampler:
            started = time.monotonic()
            for _ in range(args.rounds):
                for answer in await asyncio.gather(*(one_run(http, url, creds, args, refs) for _ in range(args.runs))):
                    answers[answer] = answers.get(answer, 0) + 1
            took = time.monotonic() - started
        return before, sampler, answers, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=3072)
    parser.add_argument("--noise", action="store_true", help="An incompressible PNG (else a flat one).")
    parser.add_argument("--send", choices=("own", "multipart"), default="own")
    parser.add_argument("--runs", type=int, default=8, help="Concurrent Runs.")
    parser.add_argument("--references", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=float, default=0.05, help="Seconds between samples.")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    args = parser.parse_args()

    png = make_png(args.side, args.noise)
    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-references-"))
    port = 19000 + os.getpid() % 1000
    env = {"DREAMSERVE_RATE_LIMIT_PER_MINUTE": "0", "DREAMSERVE_MAX_QUEUED_TASKS": "0"}
    env["DREAMSERVE_MAX_QUEUED_MEGAPIXELS"] = "0"
    process, (creds,) = start_server(data_dir, port, ["references"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        before, sampler, answers, took = asyncio.run(fire(url, creds, args, png, (process.pid, args.every)))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    health = sorted(sampler.healthz)
    figures = {
        "png": f"{args.side}x{args.side}, {len(png) / 2**20:.1f} MiB",
        "send": args.send,
        "runs": f"{args.rounds} rounds of {args.runs} concurrent Runs x {args.references} references",
        "seconds": round(took, 1),
        "api_mb_before": before.get("api_mb"),
        "api_anon_mb_before": before.get("api_anon_mb"),
        "api_mb_peak": max(s.get("api_mb", 0) for s in sampler.rss),
        "api_anon_mb_peak": max(s.get("api_anon_mb", 0) for s in sampler.rss),
        "healthz_ms": {
            "samples": len(health),
            "failed": sampler.healthz_failed,
            "p50": round(1000 * statistics.median(health), 1),
            "p99": round(1000 * health[int(0.99 * (len(health) - 1))], 1),
            "max": round(1000 * health[-1], 1),
        },
        "answers": answers,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
