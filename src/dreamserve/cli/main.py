"""The ``dreamserve`` command group and what its two sides share (console, messages, credentials files)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from dreamserve import __version__

#: Progress and errors go to stderr; stdout carries only results (paths, JSON), for scripts.
console = Console(stderr=True)
DEFAULT_DATA_DIR = "dreamserve-data"
DEFAULT_SERVER = "http://127.0.0.1:8000"


@click.group()
@click.version_option(__version__, prog_name="dreamserve")
def main() -> None:
    """dreamserve: a self-hosted, Wiro-compatible Seedream 4.0 image service."""


def command_path() -> str:
    """How to run this very ``dreamserve`` from any folder: the real path of the running executable."""
    script = Path(sys.argv[0])
    if script.name == "dreamserve" and script.is_file():
        return shlex.quote(str(script.resolve()))
    # ``python -m dreamserve``: the interpreter's own path (not resolved: a venv's python is a symlink).
    return f"{shlex.quote(os.path.abspath(sys.executable))} -m dreamserve"


def error(text: str) -> None:
    # Server messages are escaped by the callers: Wiro's "Request parameter [size] ..." is not markup.
    console.print(text, highlight=False, soft_wrap=True)


def read_credentials(path: Path) -> dict[str, Any]:
    from dreamserve import userconfig

    try:
        return userconfig.read(path)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
