"""The server secret, and the capabilities derived from it so that the database alone grants nothing.

Task tokens (``socketaccesstoken``) and file access keys are not stored: a row keeps a random salt and
the sha256 of its capability (for lookups), and the capability itself is ``HMAC(server secret, purpose,
row id, salt)``, recomputed whenever it is shown. Webhook secrets, which the server must use without
the client, are stored sealed with a pad derived from the server secret. The secret lives in a 0600
file (``<data_dir>/server.key``, or ``server_key_file``) or comes from ``server_secret``; every API
replica and worker of one deployment must share it.

Rows written before this scheme had a clear ``token``/``accesskey``: at start-up it is sealed like a
webhook secret (``token_sealed``/``accesskey_sealed``, ``queue/sealing.py``) and the clear column emptied,
so old tokens and file URLs stay valid and nothing clear stays at rest; new rows leave all four NULL.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

from dreamserve.queue.db import File, Task
from dreamserve.settings import Settings

_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 30


def digest(capability: str) -> str:
    """What a row stores of its capability: enough to find it, useless to present."""
    # surrogatepass: a presented value is client text, and hashing it must not fail on odd code points.
    return hashlib.sha256(capability.encode("utf-8", "surrogatepass")).hexdigest()


def new_salt() -> str:
    return secrets.token_hex(16)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by this user only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty if missing, and make it 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class ServerKey:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("The server secret must be at least 16 bytes.")
        self._secret = secret

    @classmethod
    def load(cls, settings: Settings) -> ServerKey:
        """``server_secret`` if set, else the key file, created (0600, in a 0700 folder) on first use."""
        if settings.server_secret is not None:
            return cls(settings.server_secret.get_secret_value().encode())
        path = settings.key_path
        private_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            os.chmod(path, 0o600)
            return cls(bytes.fromhex(path.read_text().strip()))
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        return cls(bytes.fromhex(path.read_text().strip()))

    def _mac(self, purpose: str, row_id: int, salt: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}\0{row_id}\0{salt}".encode(), hashlib.sha256).digest()

    def token(self, task: Task) -> str:
        """The task's ``socketaccesstoken``: 30 letters and digits (Wiro's shape), about 178 bits."""
        if task.token_sealed:
            return self.unseal(f"task-token:{task.id}", task.token_sealed)  # legacy row, sealed
        if task.token:
            return task.token  # legacy row, until the start-up upgrade seals it
        number = int.from_bytes(self._mac("task-token", task.id, task.token_salt or ""), "big")
        chars = []
        for _ in range(TOKEN_LENGTH):
            number, index = divmod(number, len(_ALPHABET))
            chars.append(_ALPHABET[index])
        return "".join(chars)

    def accesskey(self, file: File) -> str:
        """The file's access key: eight groups of eight hex digits (256 bits), like Wiro's CDN folders."""
        if file.accesskey_sealed:
            return self.unseal(f"file-key:{file.id}", file.accesskey_sealed)  # legacy row, sealed
        if file.accesskey:
            return file.accesskey  # legacy row, until the start-up upgrade seals it
        raw = self._mac("file-key", file.id, file.key_salt or "").hex()
        return "-".join(raw[i : i + 8] for i in range(0, 64, 8))

    def _pad(self, label: str, length: int) -> bytes:
        blocks = b""
        counter = 0
        while len(blocks) < length:
            blocks += hmac.new(self._secret, f"{label}\0{counter}".encode(), hashlib.sha256).digest()
            counter += 1
        return blocks[:length]

    def seal(self, label: str, secret: str) -> str:
        """``secret`` XOR a pad derived from the server secret and ``label`` (unique per row), as hex."""
        data = secret.encode()
        return bytes(a ^ b for a, b in zip(data, self._pad(label, len(data)), strict=True)).hex()

    def unseal(self, label: str, sealed: str) -> str:
        data = bytes.fromhex(sealed)
        # "replace": under another server secret the result is noise, which must fail to verify, not crash.
        return bytes(a ^ b for a, b in zip(data, self._pad(label, len(data)), strict=True)).decode(errors="replace")

    def webhook_secret(self, project_id: int, sealed: str) -> str:
        return self.unseal(f"webhook-secret:{project_id}", sealed) if sealed else ""
