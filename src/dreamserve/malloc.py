"""glibc malloc tuning for dreamserve's two kinds of process, set at their entry points. Elsewhere than glibc, and
where the operator has set glibc's own variables, these do nothing.

* The API process (``serve``): at most two malloc arenas. Its threads (the database connections', the
  executor's) come and go, and by default glibc gives new threads new arenas, up to 8 per core, each keeping the
  memory it once held. The API's RSS then kept rising slowly under load while its Python heap stayed flat
  (bench/soak.py, bench/traced.py).
* The API process (``serve``): blocks of 64 KiB and more mapped on their own, and every
  ``release_memory_seconds`` the free memory inside its heap given back (``malloc_trim``): glibc's ``free`` only
  ever returns the heap's top, so what a burst (large uploads, a flood of sockets) left free in the middle stayed
  resident. Under steady load neither changed the slow rise of the API's RSS (docs/reliability.md, section 7).
* The model process on a CPU: freed memory is kept for the next tensors. PyTorch's CPU allocator has no cache,
  and glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
  free, so each large activation's pages are faulted in and zeroed by the kernel again on every call. A batch of
  four 256x256 SD-Turbo images took 2.2 million page faults and 5.4 s of system time out of 44 s of CPU; with
  mmap off and no trimming, none after the first call, and the call ran 15-20 % faster (bench/RESULTS.md). The
  price: the process holds on to its peak memory instead of giving it back between calls. On a GPU the tensors
  live in PyTorch's CUDA caching allocator already, and host memory is mostly the weights on their way to the
  device, which must be given back: this is for the CPU only.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: Arenas of the API process.
API_ARENAS = 2
#: Blocks the API process maps on their own (``map_large_blocks``).
API_MMAP_THRESHOLD = 64 << 10
#: M_TRIM_THRESHOLD's "never trim" (mallopt(3)).
NEVER = -1


def limit_arenas(arenas: int = API_ARENAS) -> bool:
    """At most ``arenas`` malloc arenas for the threads started from now on; True when set. An operator's
    ``MALLOC_ARENA_MAX`` wins."""
    if not _left_to_us(("arena_max", "MALLOC_ARENA_MAX")):
        return False
    return _mallopt(M_ARENA_MAX, arenas)


def map_large_blocks(threshold: int = API_MMAP_THRESHOLD) -> bool:
    """Give blocks of ``threshold`` bytes and more a mapping of their own, unmapped on free; True when set. By
    default glibc raises this threshold, up to 32 MiB, each time such a block is freed, so later large buffers
    come from the heap, where they leave holes and push its top up. An operator's ``MALLOC_MMAP_THRESHOLD_``
    wins."""
    if not _left_to_us(("mmap_threshold", "MALLOC_MMAP_THRESHOLD_")):
        return False
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap (no mmap) and never trim it, so freed memory is reused without page
    faults; True when set. An operator's ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` wins."""
    if not _left_to_us(("mmap_max", "MALLOC_MMAP_MAX_"), ("trim_threshold", "MALLOC_TRIM_THRESHOLD_")):
        return False
    return _mallopt(M_MMAP_MAX, 0) and _mallopt(M_TRIM_THRESHOLD, NEVER)


def release_free_memory() -> bool:
    """Give the pages of every free chunk of every arena back to the system (``malloc_trim(0)``), not only the
    heap's top as ``free`` does; True when some were. A walk of the free chunks under each arena's lock: about a
    millisecond for the API's heap."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(libc.malloc_trim(0))


def _left_to_us(*settings: tuple[str, str]) -> bool:
    """Whether glibc's malloc is in use and the operator set none of these (tunable, environment variable) pairs:
    neither ``glibc.malloc.<tunable>`` in ``GLIBC_TUNABLES`` nor the variable."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return platform.libc_ver()[0] == "glibc" and not any(
        f"glibc.malloc.{tunable}" in tunables or variable in os.environ for tunable, variable in settings
    )


def _mallopt(parameter: int, value: int) -> bool:
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(parameter, value))
