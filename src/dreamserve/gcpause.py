"""The API process's garbage collector, set once it has started (``serve``, from the app's start-up hook).

By then the heap holds a few hundred thousand objects that live as long as the process (modules, FastAPI's
routes and dependency trees, SQLAlchemy's mappers and compiled statements, pydantic's validators), and CPython's
collector walks all of them again on every collection of the oldest generation. ``gc.freeze()`` moves every
object alive then to a permanent generation that no collection scans. The young generation's threshold (700
allocations of container objects, net of frees, by default) is raised too: a Run allocates a few thousand, so it
paid for several young collections, each a fixed cost plus a walk of what survived. Cycles are still
collected, only in larger batches; nothing a client sees depends on when.
"""

from __future__ import annotations

import gc

#: Net allocations of container objects between two collections of the young generation (CPython: 700).
YOUNG_THRESHOLD = 20_000


def pause_after_startup(young: int = YOUNG_THRESHOLD) -> None:
    """Collect what start-up left, freeze the rest out of every later collection, raise the young threshold."""
    gc.collect()  # start-up's garbage first, so that none of it is frozen
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young, middle, oldest)
