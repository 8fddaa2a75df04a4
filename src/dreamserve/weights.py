"""Model weights on this machine: ``dreamserve pull`` downloads them, ``dreamserve models`` lists what is here.

Downloads go through ``huggingface_hub`` (a dependency of diffusers, so of the ``worker`` extra) into the
Hugging Face cache, where ``serve --model <preset or hub id>`` finds them without network, or into a folder
(``--local-dir``) that ``serve --model <folder>`` loads. ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_TOKEN`` apply
as for every Hugging Face tool. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dreamserve.presets import BUILT_IN, PRESETS


class PullError(RuntimeError):
    """A download that could not be done; the message says what to do instead."""


@dataclass(frozen=True)
class LocalModel:
    """One preset as this machine has it."""

    preset: str
    source: str
    licence: str
    built_in: bool
    #: The snapshot folder in the Hugging Face cache; None when the weights are not (completely) there.
    path: Path | None
    size_bytes: int


def repo_of(name: str) -> str:
    """The hub id behind a preset name, or ``name`` itself when it is a hub id (``owner/name``)."""
    preset = PRESETS.get(name)
    if preset is not None:
        if name in BUILT_IN:
            raise PullError(f"{name} is built in code (random weights): there is nothing to download.")
        return preset.source
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        downloadable = ", ".join(sorted(set(PRESETS) - BUILT_IN))
        raise PullError(f"{name!r} is neither a preset ({downloadable}) nor a hub id (owner/name).")
    return name


def pull(name: str, local_dir: Path | None = None) -> Path:
    """Download every file of a preset's or hub id's repository (with huggingface_hub's progress bars)."""
    repo = repo_of(name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        folder = snapshot_download(repo, local_dir=str(local_dir) if local_dir else None)
    except GatedRepoError as exc:
        raise PullError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo} while logged in, then "
            f"`hf auth login` (or set HF_TOKEN) and pull again. ({_first_line(exc)})"
        ) from None
    except RepositoryNotFoundError as exc:
        raise PullError(
            f"{endpoint} has no repository {repo} (or it is private: set HF_TOKEN). ({_first_line(exc)})"
        ) from None
    except LocalEntryNotFoundError as exc:
        # What huggingface_hub raises when the hub cannot be reached (or HF_HUB_OFFLINE is set) and nothing is cached.
        raise PullError(
            f"Cannot reach the Hugging Face hub at {endpoint} to download {repo}, and it is not in the cache "
            f"({constants.HF_HUB_CACHE}). Check the network (or HF_HUB_OFFLINE, HF_ENDPOINT); on a machine without "
            f"network, run `hf download {repo} --local-dir DIR` where there is one, copy DIR here and start "
            f"`dreamserve serve --model DIR`. ({_first_line(exc)})"
        ) from None
    except HfHubHTTPError as exc:
        raise PullError(f"The hub at {endpoint} refused the download of {repo}: {_first_line(exc)}") from None
    return Path(folder)


def local_models() -> list[LocalModel]:
    """Every preset, and whether (and how big) its weights are in the Hugging Face cache."""
    found = []
    for name, preset in PRESETS.items():
        built_in = name in BUILT_IN
        path = None if built_in else cached_snapshot(preset.source)
        size = size_on_disk(path) if path is not None else 0
        found.append(LocalModel(name, preset.source, preset.licence, built_in, path, size))
    return found


def cached_snapshot(repo: str) -> Path | None:
    """The complete snapshot of ``repo`` in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def size_on_disk(folder: Path) -> int:
    """Bytes of the files under ``folder``, each cache blob counted once (snapshots are symlinks to blobs)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                stat = (Path(root) / name).stat()
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
