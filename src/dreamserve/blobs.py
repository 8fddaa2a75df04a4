"""Where file bytes live: ``LocalBlobStore`` (the data folder) or ``S3BlobStore`` (any S3 endpoint, via obstore).

Keys are relative paths like ``outputs/<folder>/0.png``. Local writes go to a temporary name
in the same folder and are renamed into place, so a reader (or a crash) never sees half a file;
an S3 PUT is atomic by itself. ``list_page`` lists keys in pages, resuming after the last one seen,
so the orphan sweep (``sweep.py``) holds one page at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Protocol

from dreamserve.settings import S3Settings, Settings


@dataclass(frozen=True)
class BlobEntry:
    """One stored object: its key and when it was last written (unix seconds)."""

    key: str
    modified: float


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def read(self, key: str) -> bytes: ...

    def download(self, key: str, path: Path) -> None: ...

    def copy(self, source: str, key: str) -> None:
        """Store ``source``'s bytes under ``key`` too, without reading them whole (``FileNotFoundError`` if gone)."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The file on this machine's disk, when the store is local (served and read in place)."""

    def presign(self, key: str) -> str | None:
        """A time-limited URL that reads the object directly, when the store has one."""

    def list_page(self, prefix: str, after: str | None, limit: int) -> list[BlobEntry]:
        """Up to ``limit`` objects under the folder ``prefix``, in the store's order, after the key ``after``.
        Fewer than ``limit`` means the listing reached its end."""


def make_blob_store(settings: Settings) -> BlobStore:
    if settings.s3 is not None:
        return S3BlobStore(settings.s3)
    return LocalBlobStore(settings.blob_dir)


#: Pieces a streamed copy moves at a time: the most of a file it holds in memory.
CHUNK_BYTES = 1024 * 1024


def _write_atomic(path: Path, data: bytes) -> None:
    _write_chunks(path, [data])


def _read_chunks(source: IO[bytes]) -> Iterable[bytes]:
    while chunk := source.read(CHUNK_BYTES):
        yield chunk


def _write_chunks(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"blob key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes) -> None:
        _write_atomic(self.path(key), data)

    def put_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        if target != path.resolve():
            with path.open("rb") as source:
                _write_chunks(target, _read_chunks(source))

    def copy(self, source: str, key: str) -> None:
        # A hard link moves no bytes; it is safe because every write here replaces the file (a new inode)
        # rather than changing it, and deleting either name leaves the other whole.
        source_path, target = self.path(source), self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{os.urandom(8).hex()}"
        try:
            os.link(source_path, tmp)
        except FileNotFoundError:
            raise
        except OSError:  # a file system without hard links: a streamed copy
            with source_path.open("rb") as handle:
                _write_chunks(target, _read_chunks(handle))
            return
        os.replace(tmp, target)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(key), path)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        # A task's files share a folder named by their access key: the last one out removes it.
        if path.parent != self.root:
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def presign(self, key: str) -> str | None:
        return None

    def list_page(self, prefix: str, after: str | None, limit: int) -> list[BlobEntry]:
        # Names sorted per folder, keys compared as tuples of parts: the walk's order, so "after" resumes it.
        cursor = tuple(after.split("/")) if after else ()
        page: list[BlobEntry] = []
        self._walk(self.path(prefix), tuple(prefix.strip("/").split("/")), cursor, limit, page)
        return page

    def _walk(
        self, folder: Path, parts: tuple[str, ...], cursor: tuple[str, ...], limit: int, page: list[BlobEntry]
    ) -> None:
        try:
            names = sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return  # removed meanwhile (the last file of a task deleted)
        for name in names:
            here = (*parts, name)
            path = folder / name
            if path.is_symlink():
                continue  # never written by the store
            if path.is_dir():
                if here >= cursor[: len(here)]:  # a folder wholly before the cursor is skipped unread
                    self._walk(path, here, cursor, limit, page)
            elif here > cursor:
                with contextlib.suppress(FileNotFoundError):
                    page.append(BlobEntry("/".join(here), path.stat().st_mtime))
            if len(page) >= limit:
                return


class S3BlobStore:
    def __init__(self, config: S3Settings) -> None:
        from obstore.store import S3Store

        self.config = config
        # Unset values are left out so obstore falls back to the AWS_* environment variables.
        options = {
            "endpoint": config.endpoint,
            "region": config.region,
            "access_key_id": config.access_key_id,
            "secret_access_key": config.secret_access_key,
        }
        self.store = S3Store(
            config.bucket,
            allow_http=bool(config.endpoint and config.endpoint.startswith("http://")),
            virtual_hosted_style_request=False,
            **{name: value for name, value in options.items() if value is not None},  # type: ignore[arg-type]
        )

    def put(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self.store, key, data)

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        obstore.put(self.store, key, path)

    def read(self, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store, key).bytes())

    def download(self, key: str, path: Path) -> None:
        import obstore

        _write_chunks(path, (memoryview(c) for c in obstore.get(self.store, key).stream(min_chunk_size=CHUNK_BYTES)))

    def copy(self, source: str, key: str) -> None:
        import obstore

        obstore.copy(self.store, source, key)  # server-side: the bytes never reach this process

    def exists(self, key: str) -> bool:
        import obstore

        try:
            obstore.head(self.store, key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self.store, key)

    def local_path(self, key: str) -> Path | None:
        return None

    def list_page(self, prefix: str, after: str | None, limit: int) -> list[BlobEntry]:
        import obstore

        page: list[BlobEntry] = []
        # S3 lists in key order from ``offset`` (StartAfter), a server-side page at a time.
        for chunk in obstore.list(self.store, prefix, offset=after, chunk_size=limit):
            page.extend(BlobEntry(meta["path"], meta["last_modified"].timestamp()) for meta in chunk)
            if len(page) >= limit:
                return page[:limit]
        return page

    def presign(self, key: str) -> str | None:
        import obstore

        return obstore.sign(self.store, "GET", key, timedelta(seconds=self.config.presign_seconds))
