"""Request authentication, Wiro style: ``x-api-key`` plus, for signature projects, ``x-nonce`` and ``x-signature``.

The signature does not cover the method, path or body (that is Wiro's design), so the nonce is
what limits replay: timestamp-like nonces (unix seconds or milliseconds) must be near the server
clock, and with ``unique_nonces`` each nonce is accepted once per project. Revoked projects are
unknown to ``find_project``, so their keys fail like keys that never existed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.db import Nonce, Project
from dreamserve.errors import AuthError
from dreamserve.projects import find_project, unseal_secret
from dreamserve.settings import Settings
from dreamserve.signing import verify

NOT_FOUND = "Project authorization is not founded."
NEEDS_SIGNATURE = "Project requires signature authentication. x-signature and x-nonce headers are required."
NOT_VALID = "Project authorization is not valid."
BAD_SIGNATURE = (
    f"{NOT_VALID} x-signature must be the lowercase hex of HMAC-SHA256 keyed with the API key over the API "
    "secret followed by x-nonce (openssl's whole output line is accepted too)."
)
#: ``seen`` of a nonce that is never purged (1 January 2100).
REMEMBER_FOREVER = 4_102_444_800.0


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


async def authenticate(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, headers: Mapping[str, str]
) -> Project:
    api_key = headers.get("x-api-key", "").strip()
    if not api_key:
        raise AuthError(NOT_FOUND)
    project = await find_project(sessions, api_key)
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
    await _check_nonce(sessions, settings, project.id, nonce)
    return project


async def _check_nonce(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, project_id: int, nonce: str
) -> None:
    now = time.time()
    stamp = nonce_time(nonce)
    if stamp is not None and abs(now - stamp) > settings.nonce_skew_seconds:
        raise AuthError(
            f"{NOT_VALID} x-nonce {nonce} is {abs(now - stamp):.0f} s away from the server clock (allowed: "
            f"{settings.nonce_skew_seconds} s). Send the current unix time as the nonce and check the client's clock."
        )
    if not settings.unique_nonces:
        return
    # A timestamp nonce can be forgotten once the clock check refuses it anyway (2 x skew after use); any other
    # nonce ("random integer") is remembered for good, or it could be replayed once forgotten.
    seen = now if stamp is not None else REMEMBER_FOREVER
    try:
        async with sessions.begin() as session:
            await session.execute(delete(Nonce).where(Nonce.seen < now - 2 * settings.nonce_skew_seconds))
            session.add(Nonce(project_id=project_id, nonce=nonce, seen=seen))
    except IntegrityError:
        raise AuthError(f"{NOT_VALID} x-nonce {nonce} was already used; send a new nonce with every request.") from None
