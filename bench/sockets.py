"""Memory a task socket costs the API, with permessage-deflate on and off, side by side in one run.

Each side starts a server (no model workers), then opens and closes ``--sockets`` task sockets ``--cycles``
times from this process, and records the API's anonymous RSS with the sockets held and after they closed.
A steady server returns to the same figure every cycle; one that creeps up is fragmenting its heap.

    .venv/bin/python bench/sockets.py --sockets 500 --cycles 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).parent))
from load import memory, start_server


def anon_mb(pid: int) -> float:
    return float(memory(pid)["api_anon_mb"])


async def cycles(pid: int, port: int, sockets: int, count: int) -> list[tuple[float, float]]:
    figures = []
    for _ in range(count):
        held = [await connect(f"ws://127.0.0.1:{port}/v1") for _ in range(sockets)]
        await asyncio.sleep(1)
        during = anon_mb(pid)
        for socket in held:
            await socket.close()
        await asyncio.sleep(3)
        figures.append((during, anon_mb(pid)))
    return figures


def side(compression: bool, sockets: int, count: int) -> tuple[float, list[tuple[float, float]]]:
    data_dir = Path(tempfile.mkdtemp(prefix="dreamserve-sockets-"))
    port = 18000 + (os.getpid() + compression) % 1000
    env = {
        "DREAMSERVE_SOCKET_MAX_PER_ADDRESS": str(sockets + 10),
        "DREAMSERVE_RUN_WORKERS": "false",
        "DREAMSERVE_WS_COMPRESSION": str(compression).lower(),
    }
    process, _ = start_server(data_dir, port, ["bench"], env)
    try:
        start = anon_mb(process.pid)
        return start, asyncio.run(cycles(process.pid, port, sockets, count))
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for compression in (False, True):
        start, figures = side(compression, args.sockets, args.cycles)
        results[compression] = (start, figures)
        per_socket = (figures[0][0] - start) * 1024 / args.sockets
        rounds = " | ".join(f"held {held:.1f} closed {closed:.1f}" for held, closed in figures)
        label = "permessage-deflate on " if compression else "permessage-deflate off"
        print(f"{label}: start {start:.1f} MB, {per_socket:.0f} KiB a socket; {rounds}")
    (off_start, off), (on_start, on) = results[False], results[True]
    print(
        f"ratio on/off: memory a socket {(on[0][0] - on_start) / (off[0][0] - off_start):.2f}x, "
        f"growth from first to last cycle {on[-1][1] - on[0][1]:.1f} MB vs {off[-1][1] - off[0][1]:.1f} MB"
    )


if __name__ == "__main__":
    main()
