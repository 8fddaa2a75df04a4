"""The embedded HTTP server's own bounds (issue 30 item 8): request-head timeout and connection cap."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
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


def test_never_read_ark_stream_frees_its_sync_slot_after_the_write_stall(make_live: Any) -> None:
    model = {"max_pixels": 64 * 64, "max_batch": 1}
    server = make_live(model=model, sync_max_per_project=1, http_write_stall_seconds=2)
    creds = server.creds
    body = json.dumps(
        {
            "model": "seedream-4-0-250828",
            "prompt": "six posters",
            "size": "4096x4096",
            "sequential_image_generation": "auto",
            "response_format": "b64_json",
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /api/v3/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {creds.api_key}:{creds.api_secret}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    bearer = {"Authorization": f"Bearer {creds.api_key}:{creds.api_secret}"}
    one = {"model": "seedream-4-0-250828", "prompt": "one poster", "size": "1024x1024"}
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the server's buffer fills
    with reader:
        reader.connect(("127.0.0.1", server.settings.port))
        reader.sendall(head + body)  # and never reads the answer
        # The project's one slot is the stream's until the server cuts the reader off; then a request is served.
        deadline = time.monotonic() + 120
        status = 0
        while time.monotonic() < deadline:
            answer = server.http.post("/api/v3/images/generations", headers=bearer, json=one, timeout=120)
            status = answer.status_code
            if status != 429:
                break
            time.sleep(0.5)
        assert status == 200
