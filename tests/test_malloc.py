"""glibc malloc tuning (``dreamserve/malloc.py``), each case in a fresh interpreter: the allocator's state is
per process and cannot be undone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap unless mmap is off
PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")

#: Prints ``keep_freed_memory``'s answer and the page faults of allocating (and zero-filling) BLOCK bytes again,
#: after the same allocation was freed: a large activation on the second pipeline call.
FAULTS_SCRIPT = f"""
import resource, sys
from dreamserve.malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
block = bytearray({BLOCK})
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray({BLOCK})
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


#: ``limit_arenas``'s answer and the process's malloc arenas after ``THREADS`` threads allocated at once
#: (``malloc_info`` writes one ``<heap nr=...>`` per arena): the API's threads (database connections', the
#: executor's) come and go.
ARENAS_SCRIPT = """
import ctypes, os, sys, tempfile, threading
from dreamserve.malloc import limit_arenas
limited = limit_arenas() if sys.argv[1] == "limit" else False
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier(THREADS)
def allocate():
    kept = [bytearray(100_000)]  # above pymalloc's size: from this thread's malloc arena
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(THREADS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
path = tempfile.mktemp()
file = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, file)
libc.fclose(file)
print(limited, open(path).read().count("<heap nr="))
os.unlink(path)
""".replace("THREADS", "12")


#: ``release_free_memory``'s answer and the MiB of RSS it gave back, after 48 MiB of heap blocks were freed below
#: one that is kept: the heap's top is pinned, so ``free`` alone gives nothing back.
RELEASE_SCRIPT = """
import os, sys
from dreamserve.malloc import release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [bytearray(4000) for _ in range(12_000)]  # above pymalloc's 512 bytes, below the mmap threshold
kept = blocks[-1]
del blocks
before = rss()
released = release_free_memory() if sys.argv[1] == "release" else False
print(released, (before - rss()) >> 20)
"""


#: ``map_large_blocks``'s answer and how many mappings malloc made for a 512 KiB buffer (``mallinfo2().hblks``), after
#: a 4 MiB one was freed.
MAPPED_SCRIPT = """
import ctypes, sys
from dreamserve.malloc import map_large_blocks
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
mapped = map_large_blocks() if sys.argv[1] == "map" else False
block = bytearray(4 << 20)
del block  # by default glibc raises its mmap threshold to 4 MiB here (if it was lower)
before = libc.mallinfo2().hblks
block = bytearray(512 << 10)
print(mapped, libc.mallinfo2().hblks - before)
"""


def run(script: str, mode: str, **extra: str) -> tuple[bool, int]:
    """``script``'s two answers, run with ``mode`` and ``extra`` as the only malloc settings in its environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", script, mode]
    answer = subprocess.run(command, env={**env, **extra}, capture_output=True, check=True, text=True)
    done, count = answer.stdout.split()
    return done == "True", int(count)


def faults(mode: str, **extra: str) -> tuple[bool, int]:
    return run(FAULTS_SCRIPT, mode, **extra)


def test_freed_memory_is_reused_without_page_faults() -> None:
    """A CPU model process's large tensors: by default each is a fresh mmap whose every page faults in again;
    with ``keep_freed_memory`` the freed block is reused as it is."""
    assert faults("default") == (False, pytest.approx(PAGES, rel=0.5))
    kept, count = faults("keep")
    assert kept is True
    assert count < PAGES // 20, count


def test_an_operators_malloc_settings_win() -> None:
    kept, count = faults("keep", MALLOC_MMAP_MAX_="65536")
    assert (kept, count) == (False, pytest.approx(PAGES, rel=0.5))
    assert faults("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] is False


def test_server_threads_share_two_malloc_arenas() -> None:
    """The API's RSS rose slowly under load while its Python heap stayed flat (issue 11): its threads come and go,
    and glibc gave them up to 8 arenas per core, each keeping what it once held. ``serve`` limits them to two,
    unless the operator's MALLOC_ARENA_MAX says otherwise."""
    limited, count = run(ARENAS_SCRIPT, "default")
    assert count > 2, f"without the limit, the threads got arenas of their own: {count}"
    assert run(ARENAS_SCRIPT, "limit") == (True, 2)
    limited, count = run(ARENAS_SCRIPT, "limit", MALLOC_ARENA_MAX="4")
    assert not limited and 2 < count <= 4, "the operator's MALLOC_ARENA_MAX is left as it is"


def test_free_memory_inside_the_heap_is_given_back() -> None:
    """The API's heap held more and more free chunks under steady load (issue 11); ``free`` returns only the top."""
    released, mib = run(RELEASE_SCRIPT, "default")
    assert released is False and abs(mib) <= 2, mib
    released, mib = run(RELEASE_SCRIPT, "release")
    assert released is True
    assert mib >= 30, f"{mib} MiB of about 46 given back"


def test_the_apis_large_buffers_are_mapped_on_their_own() -> None:
    """By default a freed 4 MiB buffer makes the next 512 KiB one come from the heap; in the API it is mapped and
    unmapped on its own, leaving no hole in the heap. An operator's MALLOC_MMAP_THRESHOLD_ wins."""
    assert run(MAPPED_SCRIPT, "default") == (False, 0)
    assert run(MAPPED_SCRIPT, "map") == (True, 1)
    assert run(MAPPED_SCRIPT, "map", MALLOC_MMAP_THRESHOLD_="2000000") == (False, 0)
