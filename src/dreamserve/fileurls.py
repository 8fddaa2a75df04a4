"""The server's own file URLs, which every dialect hands out: ``/v1/File/<accesskey>/<name>``.

The access key is the capability (derived from the server secret, never stored: ``queue/keyring.py``), so the
URL needs no credentials; retention says until when it answers.
"""

from __future__ import annotations

from dreamserve.queue.db import File
from dreamserve.queue.keyring import ServerKey
from dreamserve.status import FileRole

#: File roles that the retention setting applies to: all of them (``store.expire_files``).
EXPIRING_ROLES = frozenset(FileRole)


def file_url(base_url: str, file: File, keys: ServerKey) -> str:
    return f"{base_url}/v1/File/{keys.accesskey(file)}/{file.name}"


def expires(file: File, retention_seconds: float, role: str | None = None) -> float | None:
    """When the reaper deletes a task's input or output file (None: kept). ``role``: the file's role to be (a
    partial output, streamed before its task ends, becomes an output with its time)."""
    if retention_seconds <= 0 or (role or file.role) not in EXPIRING_ROLES:
        return None
    return file.created + retention_seconds
