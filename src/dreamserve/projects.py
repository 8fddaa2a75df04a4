"""Projects and their credentials.

The API key is stored only as a sha256 hash. Wiro's signature is HMAC(key=API_KEY,
msg=API_SECRET+NONCE), so the server must recover the secret; it is stored sealed with a pad
derived from the API key, which the database never holds: a stolen database yields neither.
The webhook secret is sealed the same way with the server secret (``keyring.py``), since the
server signs deliveries when no client is there to present a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve import userconfig
from dreamserve.queue.db import Project, make_engine, make_sessionmaker
from dreamserve.queue.keyring import ServerKey, private_dir
from dreamserve.queue.migrate import upgrade
from dreamserve.settings import Settings


@dataclass
class Credentials:
    api_key: str
    api_secret: str | None
    project_id: int
    server: str = ""
    #: Verifies callback deliveries (``signing.verify_webhook``).
    webhook_secret: str = ""


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _pad(api_key: str, length: int) -> bytes:
    blocks = b""
    counter = 0
    while len(blocks) < length:
        blocks += hmac.new(api_key.encode(), b"dreamserve-secret-seal-%d" % counter, hashlib.sha256).digest()
        counter += 1
    return blocks[:length]


def seal_secret(api_key: str, secret: str) -> str:
    data = secret.encode()
    return bytes(a ^ b for a, b in zip(data, _pad(api_key, len(data)), strict=True)).hex()


def unseal_secret(api_key: str, sealed: str) -> str:
    data = bytes.fromhex(sealed)
    return bytes(a ^ b for a, b in zip(data, _pad(api_key, len(data)), strict=True)).decode()


async def add_project(
    sessions: async_sessionmaker[AsyncSession],
    keys: ServerKey,
    name: str,
    signature: bool,
    max_priority: int | None = None,
) -> Credentials:
    """``max_priority`` caps the priority of the project's requests (None: the server's ``max_priority``)."""
    api_key = secrets.token_hex(16)
    api_secret = secrets.token_hex(16)
    webhook_secret = secrets.token_hex(32)
    project = Project(
        name=name,
        api_key_hash=hash_key(api_key),
        api_key_prefix=api_key[:8],
        secret_sealed=seal_secret(api_key, api_secret),
        signature_required=signature,
        created=time.time(),
        max_priority=max_priority,
    )
    async with sessions.begin() as session:
        session.add(project)
        await session.flush()
        project_id = project.id
        project.webhook_secret_sealed = keys.seal(f"webhook-secret:{project_id}", webhook_secret)
    return Credentials(
        api_key=api_key,
        api_secret=api_secret if signature else None,
        project_id=project_id,
        webhook_secret=webhook_secret,
    )


async def seal_webhook_secrets(sessions: async_sessionmaker[AsyncSession], keys: ServerKey) -> int:
    """Seal the clear webhook secrets of projects made before sealing (once, at start-up); returns how many."""
    async with sessions.begin() as session:
        rows = (
            await session.execute(select(Project.id, Project.webhook_secret).where(Project.webhook_secret != ""))
        ).all()
        for project_id, secret in rows:
            sealed = keys.seal(f"webhook-secret:{project_id}", secret)
            stmt = (
                update(Project).where(Project.id == project_id).values(webhook_secret_sealed=sealed, webhook_secret="")
            )
            await session.execute(stmt)
    return len(rows)


async def find_project(sessions: async_sessionmaker[AsyncSession], api_key: str) -> Project | None:
    async with sessions() as session:
        query = select(Project).where(Project.api_key_hash == hash_key(api_key), Project.revoked.is_(False))
        return (await session.execute(query)).scalar_one_or_none()


async def revoke(sessions: async_sessionmaker[AsyncSession], which: str) -> list[tuple[int, str, str]]:
    """Revoke the project named by ``which``: its id, its whole API key, or the key's first 8 characters.

    Returns (id, name, key prefix) of what was revoked; raises ``ValueError`` when ``which`` names no
    project, or more than one (a prefix shared by two keys: give the id or the whole key).
    """
    which = which.strip()
    if which.isascii() and which.isdigit() and len(which) < 8:
        condition = Project.id == int(which)
    elif len(which) == 32:
        condition = Project.api_key_hash == hash_key(which)
    elif len(which) >= 8:
        condition = Project.api_key_prefix == which[:8]
    else:
        raise ValueError("Give a project id, an API key, or at least its first 8 characters.")
    async with sessions.begin() as session:
        projects = list((await session.execute(select(Project).where(condition))).scalars())
        if not projects:
            raise ValueError(f"No project matches {which[:12]!r}.")
        if len(projects) > 1:
            ids = ", ".join(str(p.id) for p in projects)
            raise ValueError(f"{which[:12]!r} matches projects {ids}: give the project id or the whole API key.")
        for project in projects:
            project.revoked = True
        return [(p.id, p.name, p.api_key_prefix) for p in projects]


async def _revoke(settings: Settings, which: str) -> list[tuple[int, str, str]]:
    engine = make_engine(settings.db_url, settings.database_pool_size)
    try:
        await upgrade(engine)
        return await revoke(make_sessionmaker(engine), which)
    finally:
        await engine.dispose()


def revoke_project(settings: Settings, which: str) -> list[tuple[int, str, str]]:
    """``dreamserve keys revoke``: a running server refuses the key from its next request on."""
    return asyncio.run(_revoke(settings, which))


async def _create(settings: Settings, name: str, signature: bool, max_priority: int | None) -> Credentials:
    private_dir(settings.data_dir)
    engine = make_engine(settings.db_url, settings.database_pool_size)
    try:
        await upgrade(engine)
        return await add_project(make_sessionmaker(engine), ServerKey.load(settings), name, signature, max_priority)
    finally:
        await engine.dispose()


def create_project(
    settings: Settings, name: str, signature: bool = True, max_priority: int | None = None
) -> Credentials:
    """Create a project from the command line (``dreamserve keys create``)."""
    creds = asyncio.run(_create(settings, name, signature, max_priority))
    creds.server = settings.base_url
    return creds


def ensure_default_credentials(settings: Settings) -> tuple[Credentials, bool]:
    """The local project that ``serve`` prints and ``generate`` uses, and whether it was created just now.

    Kept in ``<data_dir>/credentials.json`` and copied, with this server's URL, to the user's config folder
    (``userconfig.credentials_path()``), where ``generate`` finds it from any folder.
    """
    path = settings.data_dir / "credentials.json"
    if path.exists():
        creds = Credentials(**json.loads(path.read_text()))
        if asyncio.run(_exists(settings, creds.api_key)):
            creds.server = settings.base_url
            _save(path, creds)
            return creds, False
    creds = create_project(settings, "default", signature=True)
    _save(path, creds)
    return creds, True


async def _exists(settings: Settings, api_key: str) -> bool:
    engine = make_engine(settings.db_url, settings.database_pool_size)
    try:
        await upgrade(engine)
        return await find_project(make_sessionmaker(engine), api_key) is not None
    finally:
        await engine.dispose()


def _save(path: Path, creds: Credentials) -> None:
    for where in (path, userconfig.credentials_path()):
        userconfig.write_private(where, asdict(creds))
