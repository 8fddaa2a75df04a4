"""Server-side HTTP fetches (input image URLs, callbacks) that cannot be turned against the host.

Every connection goes through ``GuardedBackend``: it resolves the host itself, refuses the fetch if any
address is loopback, private, link-local (cloud metadata lives at 169.254.169.254), shared (CGNAT),
multicast, reserved or unspecified, or an IPv6 form of one of those (IPv4-mapped, NAT64, 6to4,
Teredo), and then connects to the address it checked. The address that was checked is the address
that is used, so a DNS answer that changes between check and connect (DNS rebinding) gains nothing;
the peer address of the open socket is checked once more. TLS still verifies and sends SNI for the
host name, and the Host header is the URL's, because only the TCP connect is pinned.

Redirects are followed by hand (each hop goes through the same backend), bodies are read raw with a
byte cap (any ``Content-Encoding`` but identity is refused: no decompression bomb), and every fetch has
an overall deadline. ``fetch_allow_private`` turns the address check off;
``fetch_allow_hosts`` lists host names and networks that are always allowed (an internal S3, say).
Environment proxies are ignored: a proxy would make the connect go somewhere the check never saw.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from dreamserve.errors import InvalidRequest

MAX_REDIRECTS = 5
#: Bytes read of a callback receiver's answer: only its status matters.
MAX_CALLBACK_ANSWER = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: NAT64 (RFC 6052) well-known prefix: the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: IANA special-purpose blocks refused outright, whatever this Python's ``is_global`` tables say (they have
#: changed between releases, and a few anycast exceptions inside 192.0.0.0/24 are not worth the risk).
_SPECIAL = tuple(
    ipaddress.ip_network(block)
    for block in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::/96",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)


class BlockedAddress(InvalidRequest):
    """A fetch would reach an address this server does not fetch from."""


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, Teredo client), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def blocked_reason(address: Address) -> str | None:
    """Why a server-side fetch must not reach ``address`` ("" never), or None when it is a public unicast address."""
    inner = embedded_ipv4(address)
    if inner is not None:
        why = blocked_reason(inner)
        return f"it embeds {inner}, {why}" if why else None
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_link_local, "a link-local address (cloud metadata lives there)"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "a site-local address"),
        (any(address in block for block in _SPECIAL if block.version == address.version), "a special-purpose address"),
        (not address.is_global, "not a public address"),
    )
    return next((why for hit, why in checks if hit), None)


@dataclass(frozen=True)
class FetchPolicy:
    """Where server-side fetches may connect."""

    allow_private: bool = False
    #: Host names (exact, case-insensitive, or ``*.example.com`` for subdomains) always allowed.
    hosts: frozenset[str] = frozenset()
    #: Networks whose addresses are always allowed (a single address is a /32 or /128).
    networks: tuple[Network, ...] = field(default_factory=tuple)

    @classmethod
    def build(cls, allow_private: bool, allow_hosts: Iterable[str] = ()) -> FetchPolicy:
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in allow_hosts:
            text = entry.strip().lower().strip("[]")
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                hosts.add(text.rstrip("."))
        return cls(allow_private, frozenset(hosts), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        name = host.lower().strip("[]").rstrip(".")
        if name in self.hosts:
            return True
        return any(entry.startswith("*.") and name.endswith(entry[1:]) for entry in self.hosts)

    def check(self, host: str, address: Address) -> None:
        """Raise ``BlockedAddress`` unless a connection for ``host`` may go to ``address``."""
        if self.allow_private or self.host_allowed(host):
            return
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A socket's peer may be reported in mapped form; judge it (and the allow-list) as IPv4.
            address = address.ipv4_mapped
        if any(address.version == net.version and address in net for net in self.networks):
            return
        why = blocked_reason(address)
        if why is not None:
            where = f"{host} is" if host.strip("[]").lower() == str(address) else f"{host} resolves to {address},"
            raise BlockedAddress(
                f"{where} {why}; this server does not fetch from private or local "
                "addresses. Use a public URL, or upload the file."
            )


def parse_address(text: str) -> Address:
    """An address as ``getaddrinfo`` or a socket reports it (IPv6 may carry a ``%zone``)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address (never re-resolving)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port)
        for address in addresses:
            self.policy.check(host, address)
        error: Exception | None = None
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            peer = stream.get_extra_info("server_addr")
            try:
                if not peer or parse_address(str(peer[0])) != address:
                    raise BlockedAddress(f"The connection to {host} reached {peer}, not the checked {address}.")
                self.policy.check(host, parse_address(str(peer[0])))
            except BaseException:
                await stream.aclose()
                raise
            return stream
        raise error or httpcore.ConnectError(f"{host} has no address to connect to")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("Server-side fetches do not use unix sockets.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def resolve(host: str, port: int) -> list[Address]:
    """Every address of ``host`` (a literal address resolves to itself), in the resolver's order."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise InvalidRequest(f"The host {host[:80]!r} does not resolve.") from None
    addresses: list[Address] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidRequest(f"The host {host[:80]!r} does not resolve.")
    return addresses


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading the CA store costs ~0.5 s of CPU on the event loop, once per fetch otherwise, and 14
    # concurrent reference fetches then took 8 s of one core before the first byte was asked for.
    return ssl.create_default_context()


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on ``GuardedBackend``."""

    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=4,
            max_keepalive_connections=0,
            network_backend=GuardedBackend(policy),
        )


def guarded_client(policy: FetchPolicy, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=GuardedTransport(policy), follow_redirects=False, timeout=timeout, trust_env=False
    )


def fetch_failed(doing: str, url: str, exc: BaseException, *, timeout: float, asked: str = "") -> InvalidRequest:
    """Any other failure of a fetch (its deadline, a URL httpx refuses, such as ``http://0177.0.0.3/`` or port
    99999, a refused connection, a TLS error), said as the input's problem: the task fails with pexit 2, never as a
    worker error. The deadline names the URL ``asked`` for (before redirects), the rest the one that failed."""
    if isinstance(exc, TimeoutError):
        return InvalidRequest(f"{doing} {(asked or url)[:80]!r} took longer than {timeout:.0f} s.")
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, httpx.InvalidURL | ValueError | UnicodeError | OverflowError):
        why = f"the URL is not one this server can fetch ({str(exc)[:80]})"
    elif isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | OSError):
        why = "the connection could not be made"
    else:
        why = exc.__class__.__name__
    return InvalidRequest(f"{doing} {url[:80]!r} failed: {why}. Use a public http(s) URL, or upload the file.")


def check_scheme(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed "[" of an IPv6 host, say
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{url[:80]!r} is not an http(s) URL.")


async def check_url(url: str, policy: FetchPolicy, timeout: float) -> None:
    """What a fetch of ``url`` would refuse before connecting (scheme, resolution, address policy), checked
    when a task is submitted so that its client is told at once; the fetch checks every hop again."""
    check_scheme(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest(f"{url[:80]!r} has an invalid port.") from None
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve(host, port)
    except TimeoutError:
        raise InvalidRequest(f"The host {host[:80]!r} did not resolve within {timeout:.0f} s.") from None
    for address in addresses:
        policy.check(host, address)


def _check_answer(response: httpx.Response, url: str, max_bytes: int) -> None:
    """Refuse an answer that is not the image before its body is read: a status, an encoding, a length."""
    if response.status_code != 200:
        raise InvalidRequest(f"Fetching {url[:80]!r} answered HTTP {response.status_code}.")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity. Decoding would let a few kB expand to gigabytes (gzip of gzip) before any cap
        # could see it, so the body is refused unread.
        raise InvalidRequest(
            f"{url[:80]!r} was sent with Content-Encoding {encoding[:40]!r}; this server asks for and accepts only "
            "uncompressed (identity) bodies. Serve the image file as it is."
        )
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"{url[:80]!r} is {int(declared):,} bytes; the limit is {max_bytes:,}.")


async def fetch(
    url: str, *, max_bytes: int, timeout: float, allow_private: bool, allow_hosts: Sequence[str] = ()
) -> bytes:
    """GET ``url`` with every hop checked; raises ``InvalidRequest`` saying what went wrong."""
    policy = FetchPolicy.build(allow_private, allow_hosts)
    first = url
    try:
        async with asyncio.timeout(timeout), guarded_client(policy, timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                check_scheme(url)
                async with client.stream("GET", url, headers={"accept-encoding": "identity"}) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    _check_answer(response, url, max_bytes)
                    data = bytearray()
                    # Raw bytes, never decoded: what is counted is what arrived.
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > max_bytes:
                            raise InvalidRequest(f"{url[:80]!r} is larger than {max_bytes:,} bytes.")
                    return bytes(data)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise fetch_failed("Fetching", url, exc, timeout=timeout, asked=first) from None
    raise InvalidRequest(f"{first[:80]!r} redirected more than {MAX_REDIRECTS} times.")


async def post_json(
    url: str,
    payload: bytes,
    *,
    headers: dict[str, str],
    timeout: float,
    allow_private: bool,
    allow_hosts: Sequence[str] = (),
) -> int:
    """POST a JSON body to a checked URL (no redirects followed); returns the status code.

    Only the first ``MAX_CALLBACK_ANSWER`` bytes of the answer are read, within the same deadline.
    """
    check_scheme(url)
    policy = FetchPolicy.build(allow_private, allow_hosts)
    try:
        async with asyncio.timeout(timeout), guarded_client(policy, timeout) as client:
            request_headers = {"content-type": "application/json", **headers}
            async with client.stream("POST", url, content=payload, headers=request_headers) as response:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > MAX_CALLBACK_ANSWER:
                        break
                return response.status_code
    except InvalidRequest:
        raise
    except Exception as exc:
        raise fetch_failed("Posting to", url, exc, timeout=timeout) from None
