"""Request authentication, Wiro style: ``x-api-key`` plus, for signature projects, ``x-nonce`` and ``x-signature``.

The signature does not cover the method, path or body (that is Wiro's design), so the nonce is
what limits replay, and HTTPS is what keeps the headers from being captured. A timestamp nonce (unix
seconds or milliseconds) may be reused until it is ``nonce_max_age_seconds`` old (Wiro's clients sign
once and poll with it) and must not be ahead of the server clock by more than
``nonce_max_future_seconds``; any other nonce ("random integer") is accepted once per project and
remembered for ``nonce_remember_seconds``, after which the row is pruned; a project has at most
``nonce_max_remembered`` remembered, past which new ones are refused until the oldest is pruned. ``unique_nonces`` makes
timestamp nonces single-use too. Revoked projects are unknown to ``find_project``, so their keys fail
like keys that never existed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.errors import AuthError, QuotaExceeded
from dreamserve.projects import find_project, hash_key, unseal_secret
from dreamserve.queue.base import UNANSWERED, direct
from dreamserve.queue.db import Nonce, Project
from dreamserve.queue.reads import Reads
from dreamserve.settings import Settings
from dreamserve.signing import verify

NOT_FOUND = "Project authorization is not founded."
NEEDS_SIGNATURE = "Project requires signature authentication. x-signature and x-nonce headers are required."
NOT_VALID = "Project authorization is not valid."
BAD_SIGNATURE = (
    f"{NOT_VALID} x-signature must be the lowercase hex of HMAC-SHA256 keyed with the API key over the API "
    "secret followed by x-nonce (openssl's whole output line is accepted too)."
)


def nonce_time(nonce: str) -> float | None:
    """The unix time a nonce stands for, if it looks like a timestamp in seconds or milliseconds."""
    # ASCII digits only: str.isdigit() is also true of "²" and other digits that int() refuses.
    if not (nonce.isascii() and nonce.isdigit()) or len(nonce) > 16:
        return None
    value = int(nonce)
    if 10**9 <= value < 10**11:
        return float(value)
    if 10**12 <= value < 10**14:
        return value / 1000
    return None


async def lookup_project(
    sessions: async_sessionmaker[AsyncSession], reads: Reads | None, api_key: str
) -> Project | None:
    """The unrevoked project of an API key: read directly where the store can (every request asks), else
    through a session. Never cached, so that a revocation holds from the next request on."""
    found = direct(reads, lambda store_reads: store_reads.project(hash_key(api_key)))
    if found is not UNANSWERED:
        return found
    return await find_project(sessions, api_key)


async def authenticate(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    headers: Mapping[str, str],
    clock: Callable[[], float] = time.time,
    reads: Reads | None = None,
) -> Project:
    api_key = headers.get("x-api-key", "").strip()
    if not api_key:
        raise AuthError(NOT_FOUND)
    project = await lookup_project(sessions, reads, api_key)
    if project is None:
        raise AuthError(NOT_FOUND)
    nonce = headers.get("x-nonce", "").strip()
    signature = headers.get("x-signature", "").strip().lower()
    if not project.signature_required and not signature:
        return project
    if not nonce or not signature:
        raise AuthError(NEEDS_SIGNATURE)
    secret = unseal_secret(api_key, project.secret_sealed or "")
    if len(nonce) > 64 or not verify(api_key, secret, nonce, signature):
        raise AuthError(BAD_SIGNATURE)
    await _check_nonce(sessions, settings, project.id, nonce, clock())
    return project


async def _check_nonce(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, project_id: int, nonce: str, now: float
) -> None:
    stamp = nonce_time(nonce)
    if stamp is not None:
        age = now - stamp
        if age > settings.nonce_max_age_seconds:
            raise AuthError(
                f"{NOT_VALID} x-nonce {nonce} is {age:.0f} s old (allowed: {settings.nonce_max_age_seconds} s). "
                "Sign with the current unix time as the nonce, and check the client's clock."
            )
        if -age > settings.nonce_max_future_seconds:
            raise AuthError(
                f"{NOT_VALID} x-nonce {nonce} is {-age:.0f} s ahead of the server clock (allowed: "
                f"{settings.nonce_max_future_seconds} s). Check the client's clock."
            )
        if not settings.unique_nonces:
            return
    try:
        async with sessions.begin() as session:
            # Pruned as it grows: a timestamp row is useless once its window has passed, a random one is kept
            # for nonce_remember_seconds (a timestamp row is kept that long too: the same bound, one rule).
            await session.execute(delete(Nonce).where(Nonce.seen < now - settings.nonce_remember_seconds))
            # A replay is told as one (401) even when the project has no room for new nonces (429).
            if await session.get(Nonce, (project_id, nonce)) is not None:
                raise _used(nonce)
            await _check_room(session, settings, project_id, now)
            session.add(Nonce(project_id=project_id, nonce=nonce, seen=now))
    except IntegrityError:  # remembered by a concurrent request in the meantime
        raise _used(nonce) from None


def _used(nonce: str) -> AuthError:
    return AuthError(f"{NOT_VALID} x-nonce {nonce} was already used; send a new nonce with every request.")


async def _check_room(session: AsyncSession, settings: Settings, project_id: int, now: float) -> None:
    """Refuse a nonce the project has no room to remember: forgetting an older one would let its replay in."""
    cap = settings.nonce_max_remembered
    # Counted up to the cap only: a project far below it pays for its own rows, never for the table.
    rows = select(Nonce.nonce).where(Nonce.project_id == project_id).limit(cap).subquery()  # the key: index only
    if (await session.execute(select(func.count()).select_from(rows))).scalar_one() < cap:
        return
    oldest = (await session.execute(select(func.min(Nonce.seen)).where(Nonce.project_id == project_id))).scalar_one()
    wait = max(1, int((oldest or now) + settings.nonce_remember_seconds - now) + 1)
    raise QuotaExceeded(
        f"This project has {cap} single-use nonces remembered, the most it may have; the oldest is forgotten in "
        f"{wait} s. Send the current unix time (seconds or milliseconds) as x-nonce: such nonces are not remembered.",
        retry_after=wait,
    )
