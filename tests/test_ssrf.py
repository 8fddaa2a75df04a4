"""Server-side fetches (inputImage URLs, callbackUrl) never reach loopback, private, link-local or metadata
addresses, whatever the spelling, after DNS, on every redirect hop, and within size and time limits."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dreamserve import fetch as fetch_module
from dreamserve.errors import InvalidRequest
from dreamserve.fetch import BlockedAddress, FetchPolicy, blocked_reason, fetch, post_json
from tests.conftest import SCRIPTED, Receiver, free_port, png_bytes

#: Networks no server-side fetch may reach (IANA special-purpose registries), whatever Python's tables say.
BLOCKED_V4 = [
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
]
BLOCKED_V6 = [
    "::/96",
    "::1/128",
    "fe80::/10",
    "fec0::/10",
    "fc00::/7",
    "ff00::/8",
    "2001::/23",
    "2001:db8::/32",
    "100::/64",
]
BLOCKED = [ipaddress.ip_network(n) for n in BLOCKED_V4 + BLOCKED_V6]


def in_network(network: str) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    net = ipaddress.ip_network(network)
    low, high = int(net.network_address), int(net.broadcast_address)
    make = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    return st.integers(low, high).map(make)


def blocked_v4() -> st.SearchStrategy[ipaddress.IPv4Address]:
    return st.one_of(*(in_network(n) for n in BLOCKED_V4))  # type: ignore[arg-type]


def blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address.version == net.version and address in net for net in BLOCKED)


# -- the address checker ---------------------------------------------------------------------------------------


@given(st.one_of(*(in_network(n) for n in BLOCKED_V4 + BLOCKED_V6)))
def test_every_special_purpose_address_is_refused(address: Any) -> None:
    assert blocked_reason(address) is not None
    with pytest.raises(BlockedAddress):
        FetchPolicy().check("example.com", address)


@given(st.ip_addresses(v=4))
def test_ipv4_checker_agrees_with_the_registry(address: ipaddress.IPv4Address) -> None:
    """Whatever the checker lets through is outside every blocked network (it may refuse more, never less)."""
    if blocked_reason(address) is None:
        assert not blocked(address), address
    else:
        assert blocked(address) or not address.is_global, address


@given(blocked_v4())
def test_ipv6_spellings_of_blocked_ipv4_are_refused(inner: ipaddress.IPv4Address) -> None:
    """IPv4-mapped, NAT64 (64:ff9b::/96), 6to4 (2002::/16) and Teredo forms of a private address are private."""
    value = int(inner)
    spellings = [
        ipaddress.IPv6Address(0xFFFF << 32 | value),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value),
        ipaddress.IPv6Address(0x2002 << 112 | value << 80),
    ]
    for address in spellings:
        assert blocked_reason(address) is not None, address


@given(st.ip_addresses(v=4))
def test_mapped_addresses_are_judged_as_their_ipv4(inner: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(0xFFFF << 32 | int(inner))
    assert (blocked_reason(mapped) is None) == (blocked_reason(inner) is None)


@given(st.ip_addresses(v=6))
def test_ipv6_checker_agrees_with_the_registry(address: ipaddress.IPv6Address) -> None:
    if blocked_reason(address) is None:
        assert not blocked(address) and address.is_global, address


@given(st.one_of(in_network("10.20.0.0/16"), in_network("fd00:1::/64")))
def test_allow_list_networks_and_hosts(address: Any) -> None:
    policy = FetchPolicy.build(False, ["10.20.0.0/16", "fd00:1::/64", "minio.internal", "*.corp.example"])
    policy.check("anything.example", address)  # inside an allowed network
    policy.check("minio.internal", ipaddress.ip_address("127.0.0.1"))  # an allowed host, wherever it points
    policy.check("s3.corp.example", ipaddress.ip_address("192.168.1.1"))
    with pytest.raises(BlockedAddress):
        policy.check("corp.example.attacker.com", ipaddress.ip_address("192.168.1.1"))
    with pytest.raises(BlockedAddress):
        policy.check("anything.example", ipaddress.ip_address("10.21.0.1"))


def test_allow_private_allows_everything() -> None:
    for text in ("127.0.0.1", "169.254.169.254", "::1", "10.0.0.1"):
        FetchPolicy.build(True).check("x", ipaddress.ip_address(text))


# -- fetches in this process against local HTTP servers --------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Any] = {}
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "host": self.headers.get("host", "")})
        route = self.routes.get(self.path)
        if route is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        kind, value = route
        if kind == "redirect":
            self.send_response(302)
            self.send_header("location", value)
            self.send_header("content-length", "0")
            self.end_headers()
        elif kind == "slow":
            time.sleep(value)
            self.send_response(200)
            self.send_header("content-length", "1")
            self.end_headers()
            self.wfile.write(b"x")
        elif kind == "chunked":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for _ in range(value):
                self.wfile.write(b"400\r\n" + b"a" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_response(200)
            self.send_header("content-length", str(len(value)))
            self.end_headers()
            self.wfile.write(value)

    def do_POST(self) -> None:
        self.seen.append({"path": self.path, "host": self.headers.get("host", "")})
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[tuple[str, int, dict[str, Any], list[dict[str, str]]]]:
    """Two HTTP servers on one port number: 127.0.0.1 (the 'internal' one) and 127.0.0.2 (an allow-listed host)."""
    port = free_port()
    routes: dict[str, Any] = {}
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_Handler,), {"routes": routes, "seen": seen})
    servers = [ThreadingHTTPServer((host, port), handler) for host in ("127.0.0.1", "127.0.0.2")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "127.0.0.1", port, routes, seen
    for server in servers:
        server.shutdown()
        server.server_close()


def _fetch(url: str, **kwargs: Any) -> bytes:
    options = {"max_bytes": 1 << 20, "timeout": 5.0, "allow_private": False, **kwargs}
    return asyncio.run(fetch(url, **options))


def test_fetch_refuses_loopback_in_every_spelling(origin: Any) -> None:
    _, port, routes, seen = origin
    routes["/ref.png"] = ("body", png_bytes())
    urls = [
        f"http://127.0.0.1:{port}/ref.png",
        f"http://127.0.0.2:{port}/ref.png",
        f"http://localhost:{port}/ref.png",
        f"http://2130706433:{port}/ref.png",  # 127.0.0.1 as one decimal number
        f"http://0x7f.1:{port}/ref.png",
        f"http://[::1]:{port}/ref.png",
        f"http://[::ffff:127.0.0.1]:{port}/ref.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/x",
        "http://0.0.0.0/x",
    ]
    for url in urls:
        with pytest.raises(BlockedAddress) as error:
            _fetch(url)
        assert "does not fetch from private or local addresses" in error.value.message, url
    assert seen == [], "no request reached the internal servers"
    with pytest.raises(InvalidRequest, match="does not resolve"):
        _fetch("http://no-such-host.invalid/x")


def test_allow_list_and_allow_private_let_fetches_through(origin: Any) -> None:
    _, port, routes, _ = origin
    routes["/ref.png"] = ("body", png_bytes())
    assert _fetch(f"http://127.0.0.1:{port}/ref.png", allow_hosts=["127.0.0.1"]) == png_bytes()
    assert _fetch(f"http://127.0.0.1:{port}/ref.png", allow_hosts=["127.0.0.0/8"]) == png_bytes()
    assert _fetch(f"http://localhost:{port}/ref.png", allow_hosts=["localhost"]) == png_bytes()
    assert _fetch(f"http://127.0.0.1:{port}/ref.png", allow_private=True) == png_bytes()


def test_every_redirect_hop_is_checked(origin: Any) -> None:
    _, port, routes, seen = origin
    routes["/ref.png"] = ("body", png_bytes())
    routes["/hop"] = ("redirect", f"http://127.0.0.1:{port}/ref.png")
    routes["/relative"] = ("redirect", "/ref.png")
    routes["/loop"] = ("redirect", "/loop")
    routes["/file"] = ("redirect", "file:///etc/passwd")
    # 127.0.0.2 is allowed; the hop it redirects to (127.0.0.1) is not.
    with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1 is a loopback address"):
        _fetch(f"http://127.0.0.2:{port}/hop", allow_hosts=["127.0.0.2"])
    assert [s["path"] for s in seen] == ["/hop"], "the internal server was never asked"
    # A relative redirect stays on the allowed host.
    assert _fetch(f"http://127.0.0.2:{port}/relative", allow_hosts=["127.0.0.2"]) == png_bytes()
    with pytest.raises(InvalidRequest, match="redirected more than 5 times"):
        _fetch(f"http://127.0.0.2:{port}/loop", allow_hosts=["127.0.0.2"])
    with pytest.raises(InvalidRequest, match="not an http"):
        _fetch(f"http://127.0.0.2:{port}/file", allow_hosts=["127.0.0.2"])
    assert _fetch(f"http://127.0.0.2:{port}/hop", allow_private=True) == png_bytes()


def test_connection_goes_to_the_checked_address(origin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS is asked once per connection and the socket connects to that answer: no second lookup to rebind."""
    _, port, routes, seen = origin
    routes["/ref.png"] = ("body", b"pinned")
    lookups: list[str] = []
    real = fetch_module.resolve

    async def resolver(host: str, port: int) -> list[Any]:
        lookups.append(host)
        if host == "rebind.invalid":  # a name the system resolver cannot answer
            return [ipaddress.ip_address("127.0.0.2")]
        return await real(host, port)

    monkeypatch.setattr(fetch_module, "resolve", resolver)
    data = _fetch(f"http://rebind.invalid:{port}/ref.png", allow_hosts=["127.0.0.2/32"])
    assert data == b"pinned" and lookups == ["rebind.invalid"]
    assert seen[-1]["host"] == f"rebind.invalid:{port}", "the Host header names the URL's host"

    # The same name answering with a loopback address is refused before any connection.
    async def rebound(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch_module, "resolve", rebound)
    count = len(seen)
    with pytest.raises(BlockedAddress):
        _fetch(f"http://rebind.invalid:{port}/ref.png", allow_hosts=["127.0.0.2/32"])
    assert len(seen) == count


def test_size_and_time_limits(origin: Any) -> None:
    _, port, routes, _ = origin
    routes["/big"] = ("body", b"a" * 5000)
    routes["/chunked"] = ("chunked", 64)  # 64 KiB with no Content-Length
    routes["/slow"] = ("slow", 3.0)
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(InvalidRequest, match="the limit is 1,000"):
        _fetch(f"{base}/big", max_bytes=1000, allow_private=True)
    with pytest.raises(InvalidRequest, match="larger than 10,000 bytes"):
        _fetch(f"{base}/chunked", max_bytes=10_000, allow_private=True)
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="took longer than"):
        _fetch(f"{base}/slow", timeout=0.5, allow_private=True)
    assert time.monotonic() - started < 2.0


def test_callbacks_are_checked_too(origin: Any) -> None:
    _, port, _, seen = origin
    post = post_json(f"http://127.0.0.1:{port}/hook", b"{}", headers={}, timeout=5, allow_private=False)
    with pytest.raises(BlockedAddress):
        asyncio.run(post)
    assert seen == []
    allowed = post_json(f"http://127.0.0.2:{port}/hook", b"{}", headers={}, timeout=5, allow_private=True)
    assert asyncio.run(allowed) == 204


# -- end to end: a production app (fetch_allow_private off) --------------------------------------------------


#: One production app (fetch_allow_private off) for both tests: 127.0.0.2 is allow-listed, 127.0.0.1 is not. Its
#: model process runs the scripted engine: the tests need tasks to run, not a pipeline.
PRODUCTION = {
    "allow_private": False,
    "model": {"engine": SCRIPTED, "max_pixels": 64 * 64, "steps": 2},
    "min_pixels": 64 * 64,
    "fetch_allow_hosts": ["127.0.0.2"],
    "webhook_attempts": 2,
    "webhook_backoff_seconds": 0.2,
}


def test_server_refuses_internal_urls_and_callbacks(shared_app: Any, receiver: Receiver) -> None:
    server = shared_app(**PRODUCTION)
    receiver.files["/ref.png"] = png_bytes()
    port = receiver.port
    urls = {
        f"http://127.0.0.1:{port}/ref.png": "loopback",
        f"http://127.9.8.7:{port}/ref.png": "loopback",
        f"http://[::1]:{port}/ref.png": "loopback",
        f"http://localhost:{port}/ref.png": "loopback",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "link-local",
        "http://[::ffff:169.254.169.254]/latest/meta-data/": "link-local",
        "http://10.0.0.1/internal.png": "private",
    }
    # Refused at Run, with the message the fetch gives, so no client is told result:true for a doomed task.
    for url, why in urls.items():
        body = server.run({"prompt": "x", "size": "64x64", "inputImage": url})
        assert body["result"] is False, (url, body)
        message = body["errors"][0]["message"]
        assert why in message and "does not fetch from private or local" in message, (url, message)
    assert server.post("/v1/Task/List", json={}).json()["total"] == "0"
    # URLs that httpx itself refuses (octal IPv4, a port past 65535) ended as "Internal worker error" (pexit 1).
    for url in ("http://0177.0.0.3/", "http://1.2.3.4:99999/x.png"):
        body = server.run({"prompt": "x", "size": "64x64", "inputImage": url})
        assert body["result"] is False and "inputImage" in body["errors"][0]["message"], (url, body)

    run = server.run({"prompt": "x", "size": "64x64", "callbackUrl": receiver.url("/hook")})
    task = server.wait(run["taskid"])
    assert task["pexit"] == "0", "a refused callback does not fail the task"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log = server.post("/v1/Task/Webhooks", json={"taskid": run["taskid"]}).json()["deliveries"]
        if log and log[0]["state"] == "failed":
            break
        time.sleep(0.2)
    assert log[0]["state"] == "failed" and log[0]["attempts"] == "2", log
    assert "127.0.0.1 is a loopback address" in log[0]["lasterror"], log
    assert receiver.posts == [], "nothing was POSTed to the loopback receiver"


def test_server_follows_allow_list_but_not_a_redirect_to_loopback(shared_app: Any, origin: Any) -> None:
    _, port, routes, seen = origin
    routes["/ref.png"] = ("body", png_bytes())
    routes["/hop"] = ("redirect", f"http://127.0.0.1:{port}/ref.png")
    server = shared_app(**PRODUCTION)
    direct = server.run({"prompt": "x", "size": "64x64", "inputImage": f"http://127.0.0.2:{port}/ref.png"})
    hop = server.run({"prompt": "x", "size": "64x64", "inputImage": f"http://127.0.0.2:{port}/hop"})
    assert server.wait(direct["taskid"])["pexit"] == "0", "an allow-listed host is fetched"
    task = server.wait(hop["taskid"])
    assert task["pexit"] == "2" and "127.0.0.1 is a loopback address" in task["debugerror"], task["debugerror"]
    assert "/ref.png" not in [s["path"] for s in seen if s["host"].startswith("127.0.0.1")]
