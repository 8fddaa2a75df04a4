"""The embedded HTTP server's own bounds (issue 30 item 8): request-head timeout and connection cap."""

from __future__ import annotations

import contextlib
import resource
import socket
from typing import Any

#: The server's open-file limit (soft and hard, so ``serve`` cannot raise it): far fewer than the connections.
SERVER_NOFILE = 1024


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))


def _half_open(port: int) -> socket.socket | None:
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    except OSError:
        return None  # refused or reset past the server's cap: what the cap is for
    return conn


def test_half_open_connections_past_the_fd_limit_do_not_deny_service(make_server: Any) -> None:
    server = make_server(start=False, run_workers=False, http_header_timeout_seconds=2)
    server.preexec = _low_nofile
    server.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    half_open = []
    try:
        for _ in range(2 * SERVER_NOFILE):
            if conn := _half_open(server.settings.port):
                half_open.append(conn)
        # Past the cap new connections are closed at once, so a signed request still has a descriptor.
        assert server.post("/v1/Task/List", json={}).status_code == 200
    finally:
        for conn in half_open:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Alone (nothing to evict it), a half-open connection is closed after the header timeout (2 s): recv sees the
    # end (or a reset), not socket.timeout.
    lone = _half_open(server.settings.port)
    assert lone is not None
    with lone, contextlib.suppress(ConnectionResetError):
        lone.settimeout(30)
        assert lone.recv(65536) == b""
