"""The per-user credentials file: ``serve`` writes it, ``generate`` reads it from any folder.

It lives in the user's config folder (``$DREAMSERVE_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/dreamserve``, else
``~/.config/dreamserve``; ``%APPDATA%\\dreamserve`` on Windows), in a 0700 folder as a 0600 file: it holds the
API secret in clear. Only the client's dependencies are imported here, so a client-only install reads it too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

FILENAME = "credentials.json"


def config_dir() -> Path:
    given = os.environ.get("DREAMSERVE_CONFIG_DIR")
    if given:
        return Path(given).expanduser()
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "dreamserve"
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "dreamserve"


def credentials_path() -> Path:
    return config_dir() / FILENAME


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON readable by this user alone (0600, its folder 0700 when created here)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file: tighten one written before as well
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)


def read(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when there is no such file. Raises ``ValueError`` when unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}
