"""Signed-request latency while a socket flood follows queued tasks from many loopback addresses.

Starts a server with no model workers (tasks stay queued), submits ``--tasks`` tasks, then opens ``--sockets``
task sockets spread over ``--addresses`` source addresses (127.0.0.2, 127.0.0.3, ...: a server bound to
127.0.0.1 accepts them all), each registering 4 of the tasks. While they are held, a thread sends signed
Task/Detail requests back to back for ``--seconds`` and reports their latency, and how many sockets the
server accepted, refused (1008, with the reasons) and how many follows it took.

    .venv/bin/python bench/socket_flood.py --sockets 667 --addresses 40
    .venv/bin/python bench/socket_flood.py --sockets 667 --addresses 40 --env DREAMSERVE_SOCKET_MAX_TOTAL=2000

``--env NAME=VALUE`` (repeatable) sets the server's settings, e.g. to raise a cap and measure the cost of the
sockets it then allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).parent))
from dreamserve.signing import auth_headers
from load import MODEL, percentiles, start_server

FOLLOWS_PER_SOCKET = 4


def submit(url: str, key: str, secret: str, count: int) -> tuple[list[str], list[str]]:
    """``count`` queued tasks: their ids and socket tokens."""
    ids, tokens = [], []
    with httpx.Client(timeout=30) as http:
        for number in range(count):
            body = {"prompt": f"flood {number}", "size": "64x64"}
            answer = http.post(f"{url}/v1/Run/{MODEL}", headers=auth_headers(key, secret), json=body).json()
            assert answer["result"], answer
            ids.append(answer["taskid"])
            tokens.append(answer["socketaccesstoken"])
    return ids, tokens


def probe(url: str, key: str, secret: str, taskid: str, seconds: float, took: list[float]) -> None:
    """Signed Task/Detail requests back to back for ``seconds``, each one's latency into ``took``."""
    with httpx.Client(timeout=120) as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = http.post(f"{url}/v1/Task/Detail", headers=auth_headers(key, secret), json={"taskid": taskid})
            took.append(time.monotonic() - started)
            assert response.status_code == 200, response.text


async def open_socket(port: int, address: str, tokens: list[str], outcome: Counter[str]) -> ClientConnection | None:
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/v1", local_addr=(address, 0), open_timeout=60)
        for token in tokens:
            await ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
    except (OSError, TimeoutError, ConnectionClosed) as exc:
        outcome[f"failed to open: {type(exc).__name__}"] += 1
        return None
    return ws


async def drain(ws: ClientConnection, frames: Counter[str], closes: Counter[str]) -> None:
    try:
        async for frame in ws:
            frames[json.loads(frame)["type"]] += 1
    except ConnectionClosed:
        pass
    if ws.protocol.close_rcvd is not None:
        closes[f"{ws.protocol.close_rcvd.code} {ws.protocol.close_rcvd.reason[:60]}"] += 1


async def flood(args: argparse.Namespace, port: int, tokens: list[str], probing: threading.Thread) -> dict[str, Any]:
    outcome: Counter[str] = Counter()
    frames: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    addresses = [f"127.0.{2 + n // 250}.{2 + n % 250}" for n in range(args.addresses)]
    started = time.monotonic()
    sockets = []
    for number in range(args.sockets):
        follows = [tokens[(number * FOLLOWS_PER_SOCKET + k) % len(tokens)] for k in range(FOLLOWS_PER_SOCKET)]
        ws = await open_socket(port, addresses[number % len(addresses)], follows, outcome)
        if ws is not None:
            sockets.append(ws)
    opened = time.monotonic() - started
    drains = [asyncio.create_task(drain(ws, frames, closes)) for ws in sockets]
    await asyncio.sleep(2)  # registrations answered, refusals closed
    probing.start()
    await asyncio.to_thread(probing.join)
    held = sum(ws.protocol.close_rcvd is None for ws in sockets)
    for ws in sockets:
        await ws.close()
    await asyncio.gather(*drains)
    return {
        "opened_s": round(opened, 1),
        "held_open": held,
        "frames": dict(frames),
        "closed_by_server": dict(closes),
        **outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=667)
    parser.add_argument("--addresses", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    env = {"DREAMSERVE_RUN_WORKERS": "false", **dict(item.split("=", 1) for item in args.env)}
    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-flood-"))
    port = 19000 + os.getpid() % 1000
    process, (creds,) = start_server(data_dir, port, ["flood"], env)
    try:
        url = f"http://127.0.0.1:{port}"
        ids, tokens = submit(url, creds.api_key, creds.api_secret or "", args.tasks)
        quiet: list[float] = []
        probe(url, creds.api_key, creds.api_secret or "", ids[0], 3.0, quiet)
        took: list[float] = []
        probing = threading.Thread(
            target=probe, args=(url, creds.api_key, creds.api_secret or "", ids[0], args.seconds, took)
        )
        figures = asyncio.run(flood(args, port, tokens, probing))
        print(json.dumps({"sockets": args.sockets, "addresses": args.addresses, "env": env, **figures}, indent=1))
        print(f"Task/Detail without sockets: {percentiles(quiet)}")
        print(f"Task/Detail under the flood: {percentiles(took)}")
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
