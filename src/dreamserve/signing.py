"""Wiro's request signature: ``hex(HMAC-SHA256(key=API_KEY, msg=API_SECRET + NONCE))``. Stdlib only."""

from __future__ import annotations

import hashlib
import hmac
import time


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def verify(api_key: str, api_secret: str, nonce: str, signature: str) -> bool:
    return hmac.compare_digest(sign(api_key, api_secret, nonce), signature.lower())


def auth_headers(api_key: str, api_secret: str | None, nonce: str | None = None) -> dict[str, str]:
    """Headers for one request; key-only mode when there is no secret."""
    if api_secret is None:
        return {"x-api-key": api_key}
    nonce = nonce or str(int(time.time()))
    return {"x-api-key": api_key, "x-nonce": nonce, "x-signature": sign(api_key, api_secret, nonce)}
