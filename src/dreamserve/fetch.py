"""Server-side HTTP fetches (input image URLs, callbacks) that cannot be turned against the host.

Every hop's host is resolved and refused if any address is loopback, private, link-local,
multicast, reserved or unspecified (cloud metadata lives at link-local 169.254.169.254), unless
``fetch_allow_private`` is set. Redirects are followed by hand so each hop is checked; bodies
are read with a byte cap and the whole fetch with a deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from dreamserve.errors import InvalidRequest

MAX_REDIRECTS = 5


async def check_url(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{url[:80]!r} is not an http(s) URL.")
    if allow_private:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidRequest(f"The host of {url[:80]!r} does not resolve.") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise InvalidRequest(
                f"{url[:80]!r} points to a private or local address ({address}); this server does not fetch those."
            )


async def fetch(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    """GET ``url`` with every hop checked; raises ``InvalidRequest`` saying what went wrong."""
    try:
        async with asyncio.timeout(timeout), httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                await check_url(url, allow_private)
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(f"Fetching {url[:80]!r} answered HTTP {response.status_code}.")
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise InvalidRequest(f"{url[:80]!r} is larger than {max_bytes:,} bytes.")
                    return bytes(data)
    except TimeoutError:
        raise InvalidRequest(f"Fetching {url[:80]!r} took longer than {timeout:.0f} s.") from None
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"Fetching {url[:80]!r} failed: {exc.__class__.__name__}.") from None
    raise InvalidRequest(f"{url[:80]!r} redirected more than {MAX_REDIRECTS} times.")


async def post_json(url: str, payload: bytes, *, headers: dict[str, str], timeout: float, allow_private: bool) -> int:
    """POST a JSON body to a checked URL (no redirects followed); returns the status code."""
    await check_url(url, allow_private)
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
        response = await client.post(url, content=payload, headers={"content-type": "application/json", **headers})
        return response.status_code
