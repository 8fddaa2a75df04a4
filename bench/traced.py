"""Run ``dreamserve serve`` with its API process's memory accounted for from inside (issue 11). Not a test.

    python bench/traced.py OUT_DIR -- serve --host 127.0.0.1 --port 8000
    python bench/traced.py --compare OUT_DIR/snap-02.pickle OUT_DIR/snap-08.pickle [--top 30]

Every ``DREAMSERVE_TRACE_SECONDS`` (30) a thread appends to ``OUT_DIR/totals.jsonl`` where the RSS is:
anonymous and file-backed pages, what glibc's malloc holds (from the system, in use, free, mmapped:
``mallinfo2``), what SQLite has allocated (``sqlite3_memory_used``) and its connections hold (page
caches, schemas, prepared statements), the numbers of objects the collector tracks, of blocks Python's
allocators hold and of threads, and, under tracemalloc, the traced bytes (current and peak); to
``OUT_DIR/census.jsonl`` the counts of the 300 commonest types the collector tracks; glibc's
``malloc_info`` to ``OUT_DIR/malloc-<n>.xml``; and under
tracemalloc a snapshot to ``OUT_DIR/snap-<n>.pickle``. ``DREAMSERVE_TRACE_FRAMES=0`` leaves tracemalloc
off (its own bookkeeping is tens of MB), so that the RSS is the server's own. Comparing snapshots is
left to ``--compare``, in another process: grouping a few hundred thousand tracebacks takes minutes,
and done in the server it would hold the GIL that long. The model process is spawned (a fresh
interpreter) and is not accounted for. ``load.start_server(trace=...)`` runs the server this way.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import sqlite3
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import psutil

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33+): totals over every arena.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL | None]:
    """This process's C library and the SQLite the sqlite3 module loaded (dlopen hands back the same one), with the
    prototypes used here. Once: ``find_library`` runs ``ldconfig`` in a subprocess, forked from the server."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    libc.fopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    if hasattr(libc, "malloc_info"):
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    name = ctypes.util.find_library("sqlite3")
    if not name:
        return libc, None
    sqlite = ctypes.CDLL(name)
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    sqlite.sqlite3_memory_highwater.restype = ctypes.c_int64
    return libc, sqlite


LIBC, SQLITE = _load_libraries()


def _connections(objects: list[object]) -> dict[str, float]:
    """The open SQLite connections and what they hold (``sqlite3_db_status``: page cache, schema, prepared
    statements), in MiB. The handle is read from the connection object (CPython's ``pysqlite_Connection``
    keeps it first); a bench's shortcut, safe while the pool closes nothing."""
    if SQLITE is None:
        return {}
    handles = [
        ctypes.c_void_p.from_address(id(o) + object.__basicsize__).value
        for o in objects
        if type(o) is sqlite3.Connection
    ]
    totals = {"cache": 0, "schema": 0, "statements": 0}
    current, highest = ctypes.c_int(), ctypes.c_int()
    for handle in filter(None, handles):
        for op, what in ((1, "cache"), (2, "schema"), (3, "statements")):
            status = SQLITE.sqlite3_db_status(
                ctypes.c_void_p(handle), op, ctypes.byref(current), ctypes.byref(highest), 0
            )
            if status == 0:
                totals[what] += current.value
    return {
        "sqlite_connections": len(handles),
        **{f"sqlite_{what}_mb": round(n / MIB, 2) for what, n in totals.items()},
    }


def _malloc_info(path: Path) -> None:
    """glibc's own account of each arena (``malloc_info``): its free chunks by size, fast bins, top."""
    if not hasattr(LIBC, "malloc_info"):
        return
    file = LIBC.fopen(str(path).encode(), b"w")
    if file:
        LIBC.malloc_info(0, file)
        LIBC.fclose(file)


def _native() -> dict[str, float]:
    """What glibc's malloc and SQLite hold, in MiB; empty where this libc or SQLite does not say."""
    figures: dict[str, float] = {}
    if hasattr(LIBC, "mallinfo2"):
        info = LIBC.mallinfo2()
        figures |= {
            "malloc_system_mb": round(info.arena / MIB, 1),
            "malloc_used_mb": round(info.uordblks / MIB, 1),
            "malloc_free_mb": round(info.fordblks / MIB, 1),
            "malloc_mmapped_mb": round(info.hblkhd / MIB, 1),
        }
    if SQLITE is not None:
        figures["sqlite_mb"] = round(SQLITE.sqlite3_memory_used() / MIB, 1)
        figures["sqlite_peak_mb"] = round(SQLITE.sqlite3_memory_highwater(0) / MIB, 1)
    return figures


def _watch(out: Path, every: float) -> None:
    process = psutil.Process()
    started = time.monotonic()
    number = 0
    while True:
        memory = process.memory_info()
        objects = gc.get_objects()
        record: dict[str, float] = {
            "n": number,
            "t": round(time.monotonic() - started),
            "rss_mb": round(memory.rss / MIB, 1),
            "anon_mb": round((memory.rss - memory.shared) / MIB, 1),
            "file_mb": round(memory.shared / MIB, 1),
            **_native(),
            **_connections(objects),
            "objects": len(objects),
            "python_blocks": sys.getallocatedblocks(),
            "threads": threading.active_count(),
        }
        kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
        del objects  # held through the sleep, the list would keep what the server freed meanwhile
        _malloc_info(out / f"malloc-{number:02d}.xml")
        with (out / "census.jsonl").open("a") as file:
            file.write(json.dumps({"n": number, "t": record["t"], "types": dict(kinds.most_common(300))}) + "\n")
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            record |= {"traced_mb": round(current / MIB, 2), "peak_mb": round(peak / MIB, 2)}
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
        print("\n".join(f"    {line}" for line in stat.traceback.format(limit=15, most_recent_first=True)))


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
    frames = int(os.environ.get("DREAMSERVE_TRACE_FRAMES", "15"))
    if frames:
        tracemalloc.start(frames)
    every = float(os.environ.get("DREAMSERVE_TRACE_SECONDS", "30"))
    threading.Thread(target=_watch, args=(out, every), daemon=True, name="memory-accounting").start()
    from dreamserve.cli import main as dreamserve

    dreamserve(args=serve, prog_name="dreamserve")


if __name__ == "__main__":
    main()
