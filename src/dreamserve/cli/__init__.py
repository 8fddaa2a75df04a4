"""The ``dreamserve`` command: ``main`` (the group, ``main.py``), the server commands (``server.py``: serve,
worker, keys, pull, models; they import the server inside the function body, so that a client-only install
still runs ``generate``) and ``generate`` (``generate.py``, a thin shell over the SDK).
"""

from dreamserve.cli import generate, server  # noqa: F401 -- each registers its commands on ``main``
from dreamserve.cli.main import main

__all__ = ["main"]
