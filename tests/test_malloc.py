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


def faults(mode: str, **extra: str) -> tuple[bool, int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", FAULTS_SCRIPT, mode]
    answer = subprocess.run(command, env={**env, **extra}, capture_output=True, check=True, text=True)
    kept, count = answer.stdout.split()
    return kept == "True", int(count)


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
