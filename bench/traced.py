"""Run ``dreamserve serve`` under tracemalloc, keeping snapshots of the API process (issue 11). Not a test.

    python bench/traced.py OUT_DIR -- serve --host 127.0.0.1 --port 8000
    python bench/traced.py --compare OUT_DIR/snap-02.pickle OUT_DIR/snap-08.pickle [--top 30]

Every ``DREAMSERVE_TRACE_SECONDS`` (30) a thread appends to ``OUT_DIR/totals.jsonl`` the traced bytes
(current and peak), the RSS, and the numbers of objects the collector tracks and of threads, and dumps a
snapshot to ``OUT_DIR/snap-<n>.pickle``. Comparing is left to ``--compare``, in another process: grouping
a few hundred thousand tracebacks takes minutes, and done in the server it would hold the GIL that long.
The model process is spawned (a fresh interpreter) and is not traced. ``load.start_server(trace=...)``
runs the server this way.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import psutil

FRAMES = 15


def _watch(out: Path, every: float) -> None:
    process = psutil.Process()
    started = time.monotonic()
    number = 0
    while True:
        current, peak = tracemalloc.get_traced_memory()
        record = {
            "n": number,
            "t": round(time.monotonic() - started),
            "traced_mb": round(current / 2**20, 2),
            "peak_mb": round(peak / 2**20, 2),
            "rss_mb": round(process.memory_info().rss / 2**20, 1),
            "objects": len(gc.get_objects()),
            "threads": threading.active_count(),
        }
        tracemalloc.take_snapshot().dump(str(out / f"snap-{number:02d}.pickle"))
        with (out / "totals.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")
        number += 1
        time.sleep(every)


def compare(before: Path, after: Path, top: int) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<unknown>")]
    old = tracemalloc.Snapshot.load(str(before)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(after)).filter_traces(ignore)
    total = sum(stat.size for stat in new.statistics("filename")) - sum(s.size for s in old.statistics("filename"))
    print(f"{before.name} -> {after.name}: {total / 1024:+.1f} KiB traced")
    for stat in new.compare_to(old, "traceback")[:top]:
        print(f"\n{stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks (now {stat.size / 1024:.1f} KiB)")
        print("\n".join(f"    {line}" for line in stat.traceback.format(limit=FRAMES, most_recent_first=True)))


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--compare", nargs=2, type=Path, required=True)
        parser.add_argument("--top", type=int, default=30)
        args = parser.parse_args()
        compare(*args.compare, args.top)
        return
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    serve = sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]
    tracemalloc.start(FRAMES)
    every = float(os.environ.get("DREAMSERVE_TRACE_SECONDS", "30"))
    threading.Thread(target=_watch, args=(out, every), daemon=True, name="tracemalloc").start()
    from dreamserve.cli import main as dreamserve

    dreamserve(args=serve, prog_name="dreamserve")


if __name__ == "__main__":
    main()
