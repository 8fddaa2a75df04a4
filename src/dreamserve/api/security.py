"""HTTP hardening at the edge: browser security headers, the optional Host allow-list, and the ops token.

* The playground (``/``, ``/static/*``) gets a CSP that allows only this origin's scripts and styles and
  forbids framing (``frame-ancestors 'none'``: no clickjacking of a page that holds API secrets).
  User files get their headers where they are served (``files.USER_FILE_HEADERS``).
* ``allowed_hosts`` (Starlette's ``TrustedHostMiddleware``) refuses requests whose Host header is not the
  server's: a DNS-rebinding page that points its own name at 127.0.0.1 is answered 400.
* ``ops_token`` puts ``/metrics``, ``/healthz``, ``/docs``, ``/redoc`` and ``/openapi.json`` behind
  ``Authorization: Bearer <token>`` (``/readyz`` keeps answering probes, without details).
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreamserve.api.asgi import HTTPMiddleware
from dreamserve.dialects.wiro.errors import envelope_of
from dreamserve.errors import AuthError
from dreamserve.settings import Settings

PLAYGROUND_CSP = (
    "default-src 'self'; img-src * data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": PLAYGROUND_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
OPS_PATHS = frozenset({"/metrics", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPS_REFUSED = "This endpoint needs the operator's token: send Authorization: Bearer <ops_token>."


def ops_authorized(settings: Settings, headers: Headers) -> bool:
    """Whether a request may see operational detail (always, when no ``ops_token`` is set)."""
    if settings.ops_token is None:
        return True
    scheme, _, presented = headers.get("authorization", "").partition(" ")
    expected = settings.ops_token.get_secret_value()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected.encode())


class EdgeGuard(HTTPMiddleware):
    """The ops token first, then the playground's headers on the way out."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in OPS_PATHS and not ops_authorized(self.settings, Headers(scope=scope)):
            error = AuthError(OPS_REFUSED)
            body = json.dumps(envelope_of(error)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if path != "/" and not path.startswith("/static/"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in PLAYGROUND_HEADERS.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(EdgeGuard, settings=settings)
    if settings.allowed_hosts:
        # Added last, so it runs first: a request for a foreign Host reaches nothing else.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
