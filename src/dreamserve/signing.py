"""Wiro's request signature: ``hex(HMAC-SHA256(key=API_KEY, msg=API_SECRET + NONCE))``.

Stdlib only: the server imports this module too, and so does the client, which must stay light.
The signature covers neither method, path nor body (Wiro's design); the nonce is what limits replay.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

#: What ``openssl dgst -sha256 -hmac KEY`` prints, which Wiro's page puts whole in ``x-signature``:
#: ``(stdin)= <hex>`` (OpenSSL 1.1), ``SHA2-256(stdin)= <hex>`` (OpenSSL 3), ``HMAC-SHA256(stdin)= <hex>``.
_OPENSSL_LINE = re.compile(r"[A-Za-z0-9-]{0,32}\(stdin\)=\s*([0-9A-Fa-f]{64})")


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    """Lowercase hex HMAC-SHA256. Note the roles: the *key* is the HMAC key, secret + nonce the message."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def signature_hex(value: str) -> str:
    """The hex digest in an ``x-signature`` value: the value itself, or the hex part of openssl's output line."""
    value = value.strip()
    line = _OPENSSL_LINE.fullmatch(value)
    return (line.group(1) if line else value).lower()


def verify(api_key: str, api_secret: str, nonce: str, signature: str) -> bool:
    """Constant-time check; hex case is ignored. Bytes, because ``compare_digest`` rejects non-ASCII str."""
    expected = sign(api_key, api_secret, nonce).encode()
    return hmac.compare_digest(expected, signature_hex(signature).encode("utf-8", "replace"))


def auth_headers(api_key: str, api_secret: str | None, nonce: str | None = None) -> dict[str, str]:
    """Headers for one request. ``api_secret=None`` is Wiro's key-only mode; the nonce defaults to unix seconds."""
    if api_secret is None:
        return {"x-api-key": api_key}
    if nonce is None:
        nonce = str(int(time.time()))
    return {"x-api-key": api_key, "x-nonce": nonce, "x-signature": sign(api_key, api_secret, nonce)}


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """Signature of a callback delivery: ``hex(HMAC-SHA256(key=webhook_secret, msg=timestamp + "." + body))``."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_webhook(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0) -> bool:
    """For receivers: the delivery is ours, unaltered, and recent (replays of old deliveries fail)."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign_webhook(secret, timestamp, body), signature.lower())
