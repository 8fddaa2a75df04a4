"""Bounded soak on 127.0.0.1: normal clients while a stranger and a hostile tenant attack (issue 11).

Starts its own server (the tiny model, 64x64 outputs) in a fresh data folder with ``fetch_allow_hosts``
naming 127.0.0.2, where an "attacker host" serves a double-gzipped bomb (``--bomb-mib`` of zeros), a
reference that answers after the fetch timeout, and a callback receiver that answers after the webhook
timeout. For ``--seconds``, all at once:

* ``--clients`` normal clients (one project): submit, poll ``Task/Detail`` every ``--poll`` s until the
  task ends, submit the next; at the deadline each follows its last task to its end (at most 120 s more);
* a socket flood (4 sockets sending junk registrations as fast as the server reads them: each frame waits
  for the server's answer to the previous one; reconnecting when closed), no credentials;
* a hostile tenant (its own project) submitting, every 2 s each, a task whose reference is the bomb, one
  whose reference is the slow URL, and one whose callback goes to the slow receiver.

Reported: p50/p95/p99/max of the normal submits and Details, errors, how the normal tasks ended (and
how many did not), the attack tasks' outcomes, and the server's RSS every 15 s. Not a test; e.g.

    .venv/bin/python bench/soak.py --seconds 600 --json bench/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).parent))
from dreamserve.signing import auth_headers
from load import (
    TERMINAL,
    Client,
    Stats,
    client,
    memory,
    percentiles,
    publish,
    run_header,
    sample_memory,
    start_server,
)

MODEL = "bytedance/seedream-v4"
ATTACKER = "127.0.0.2"
FETCH_TIMEOUT = 5.0
RATE_LIMIT = 12_000
WEBHOOK_TIMEOUT = 10.0


def double_gzip(mib: int) -> bytes:
    inner = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [inner.compress(zeros) for _ in range(mib)]
    parts.append(inner.flush())
    outer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return outer.compress(b"".join(parts)) + outer.flush()


def attacker_host(port: int, bomb: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/slow.png":
                time.sleep(FETCH_TIMEOUT + 1)
                body, extra = b"late", {}
            else:
                body, extra = bomb, {"content-encoding": "gzip, gzip"}
            self.send_response(200)
            for name, value in {"content-type": "image/png", "content-length": str(len(body)), **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(WEBHOOK_TIMEOUT + 5)
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer((ATTACKER, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


async def socket_flood(url: str, deadline: float, counts: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        try:
            async with connect(url, open_timeout=5, close_timeout=1) as ws:
                counts["connections"] += 1
                number = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        while True:
                            number += 1
                            await ws.send(json.dumps({"type": "task_info", "tasktoken": f"junk-{number}"}))
                            counts["frames"] += 1
                            # The server answers every frame that registers nothing (until it closes the
                            # socket): waiting for that answer floods exactly as fast as it reads. Sending
                            # without reading would only fill the kernel's buffers with frames it never
                            # reads, and spend this machine's CPU (shared with the server) on them.
                            await ws.recv()
        except ConnectionClosed:
            counts["closed"] += 1
        except OSError:
            await asyncio.sleep(0.1)


async def hostile_tenant(
    http: httpx.AsyncClient, url: str, creds: Any, port: int, deadline: float, taskids: list[str]
) -> None:
    kinds = [
        {"inputImage": f"http://{ATTACKER}:{port}/bomb.png"},
        {"inputImage": f"http://{ATTACKER}:{port}/slow.png"},
        {"callbackUrl": f"http://{ATTACKER}:{port}/hook"},
    ]
    while time.monotonic() < deadline:
        for extra in kinds:
            with contextlib.suppress(httpx.HTTPError):
                response = await http.post(
                    f"{url}/v1/Run/{MODEL}",
                    headers=auth_headers(creds.api_key, creds.api_secret),
                    json={"prompt": "hostile", "size": "64x64", **extra},
                )
                if response.json().get("result"):
                    taskids.append(response.json()["taskid"])
        await asyncio.sleep(2.0)


async def outcomes(http: httpx.AsyncClient, url: str, creds: Any, taskids: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for taskid in taskids:
        response = await http.post(
            f"{url}/v1/Task/Detail",
            headers=auth_headers(creds.api_key, creds.api_secret),
            json={"taskid": taskid},
        )
        task = response.json()["tasklist"][0]
        key = f"pexit {task['pexit']}" if task["status"] in TERMINAL else task["status"]
        found[key] = found.get(key, 0) + 1
    return found


async def run(args: argparse.Namespace, url: str, port: int, normal: Any, hostile: Any, pid: int) -> dict[str, Any]:
    stats = Stats()
    stats.rss.append({"t": 0, **memory(pid)})
    flood = {"connections": 0, "frames": 0, "closed": 0}
    hostile_ids: list[str] = []
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        deadline = time.monotonic() + args.seconds
        # Each normal task is followed to its end, even past the deadline (at most 120 s more): all must finish.
        who = Client(url, normal.api_key, normal.api_secret, prompt="soak")
        ws_url = url.replace("http://", "ws://") + "/v1"
        await asyncio.gather(
            sample_memory(pid, deadline, stats),
            *(client(http, who, args.poll, deadline, stats, follow_seconds=120) for _ in range(args.clients)),
            *(socket_flood(ws_url, deadline, flood) for _ in range(4)),
            hostile_tenant(http, url, hostile, port, deadline, hostile_ids),
        )
        stats.rss.append({"t": "end", **memory(pid)})
        hostile_outcomes = await outcomes(http, url, hostile, hostile_ids)
        ready = (await http.get(f"{url}/readyz")).json()
    return {
        "submit": percentiles(stats.submit),
        "detail": percentiles(stats.detail),
        "errors": stats.errors,
        "normal_tasks": stats.finished,
        "socket_flood": flood,
        "hostile_tasks": hostile_outcomes,
        "readyz_after": ready,
        "rss": stats.rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--poll", type=float, default=0.5, help="Seconds between a normal client's Detail calls.")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="MiB of zeros in the double-gzipped bomb.")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    parser.add_argument(
        "--trace",
        type=Path,
        help="Run the server under traced.py (tracemalloc unless DREAMSERVE_TRACE_FRAMES=0), its figures here.",
    )
    args = parser.parse_args()

    bomb = double_gzip(args.bomb_mib)
    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-soak-"))
    port = 19000 + os.getpid() % 1000
    attacker = attacker_host(port, bomb)
    env = {
        "DREAMSERVE_FETCH_ALLOW_HOSTS": json.dumps([ATTACKER]),
        "DREAMSERVE_CALLBACK_ALLOW_HOSTS": json.dumps([ATTACKER]),
        "DREAMSERVE_FETCH_TIMEOUT_SECONDS": str(FETCH_TIMEOUT),
        "DREAMSERVE_WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT),
        # 50 clients polling every 0.5 s make 6,000 requests a minute, five times the default per-project limit:
        # the operator of such a tenant raises it. With the default, most Details were the tenant's own 429s,
        # answered at once, which hid the latency (and spared the load) this soak is there to measure.
        "DREAMSERVE_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
    }
    process, (normal, hostile) = start_server(
        data_dir, port, ["normal", "hostile"], env, ready_seconds=300, trace=args.trace
    )
    try:
        figures = asyncio.run(run(args, f"http://127.0.0.1:{port}", port, normal, hostile, process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        attacker.shutdown()
    report = {
        **run_header(args),
        "load_average_end": os.getloadavg(),
        "bomb": f"{args.bomb_mib} MiB of zeros, gzip of gzip, {len(bomb):,} bytes on the wire",
        **figures,
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
