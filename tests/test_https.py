"""HTTPS served by ``dreamserve serve`` itself (``ssl_certfile``/``ssl_keyfile``): a certificate from a CA made for
the session (trustme), a live server (uvicorn as ``serve`` configures it), httpx and websockets trusting only that
CA."""

from __future__ import annotations

import io
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from dreamserve.cli.server import _tls_files
from dreamserve.client import Client
from dreamserve.settings import Settings
from tests.conftest import MODEL, SCRIPTED, LiveServer, certificates

#: The session's HTTPS server, and a short head timeout for the guard's test below. Its model process runs the
#: scripted engine (real PNGs of the asked size, no torch): what is proven here is TLS, not the pipeline, and the
#: tiny pipeline cost a model process start of its own and seconds of CPU per 1K reference.
HTTPS: dict[str, Any] = {
    "model": {"max_pixels": 64 * 64, "engine": SCRIPTED},
    "tls": True,
    "http_header_timeout_seconds": 2,
}


def test_settings_say_https_once_a_certificate_is_set(tmp_path: Path) -> None:
    plain = Settings(data_dir=tmp_path, port=8443)
    assert plain.base_url == "http://127.0.0.1:8443"
    tls = Settings(data_dir=tmp_path, port=8443, ssl_certfile=tmp_path / "c.pem", ssl_keyfile=tmp_path / "k.pem")
    assert tls.base_url == "https://127.0.0.1:8443"
    public = Settings(ssl_certfile=tmp_path / "c.pem", public_url="https://img.example/")
    assert public.base_url == "https://img.example"
    with pytest.raises(ValueError, match="ssl_keyfile is set without ssl_certfile"):
        Settings(data_dir=tmp_path, ssl_keyfile=tmp_path / "k.pem")


def test_the_environment_sets_the_certificate(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DREAMSERVE_SSL_CERTFILE", str(tmp_path / "c.pem"))
    monkeypatch.setenv("DREAMSERVE_SSL_KEYFILE", str(tmp_path / "k.pem"))
    settings = Settings(data_dir=tmp_path, port=8443)
    assert (settings.ssl_certfile, settings.ssl_keyfile) == (tmp_path / "c.pem", tmp_path / "k.pem")
    assert settings.base_url == "https://127.0.0.1:8443"


def test_serve_refuses_a_certificate_it_cannot_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    certs = certificates(tmp_path_factory.getbasetemp() / "tls")
    assert _tls_files(Settings(ssl_certfile=certs.certfile, ssl_keyfile=certs.keyfile)) == (
        str(certs.certfile),
        str(certs.keyfile),
    )
    both = tmp_path_factory.mktemp("combined") / "server.pem"  # the key and the chain in one file
    both.write_bytes(certs.keyfile.read_bytes() + certs.certfile.read_bytes())
    assert _tls_files(Settings(ssl_certfile=both)) == (str(both), str(both))
    missing = tmp_path_factory.mktemp("missing") / "server.pem"
    with pytest.raises(click.UsageError, match=f"Cannot load the TLS certificate {missing}"):
        _tls_files(Settings(ssl_certfile=missing, ssl_keyfile=certs.keyfile))
    with pytest.raises(click.UsageError, match="with the key"):  # the CA's certificate is not the key's
        _tls_files(Settings(ssl_certfile=certs.ca_file, ssl_keyfile=certs.keyfile))


def socket_frames(server: LiveServer, token: str) -> list[dict[str, Any]]:
    """The task's frames over wss, up to the final one."""
    assert isinstance(server.verify, ssl.SSLContext)
    frames: list[dict[str, Any]] = []
    url = server.url.replace("https://", "wss://") + "/v1"
    with connect(url, ssl=server.verify, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        while not frames or frames[-1]["type"] not in ("task_postprocess_end", "task_cancel", "task_error_full"):
            frames.append(json.loads(ws.recv(timeout=120)))
    return frames


def test_https_api_wss_socket_and_https_file_urls(shared_server: Any) -> None:
    server: LiveServer = shared_server(**HTTPS)
    assert server.url.startswith("https://127.0.0.1:")
    run = server.run({"prompt": "a lighthouse at dusk", "size": "1K"})
    assert run["result"] is True, run
    frames = socket_frames(server, run["socketaccesstoken"])
    assert frames[-1]["type"] == "task_postprocess_end", frames[-1]
    url = frames[-1]["message"][0]["url"]
    assert url.startswith(f"{server.url}/v1/File/") and url.endswith("/0.png")

    task = server.wait(run["taskid"])
    assert [output["url"] for output in task["outputs"]] == [url]
    image = server.http.get(url)  # the file URL, over https, checked against the session's CA
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)

    # The https file URL as a reference: linked as this server's own file. A fetch could not have read it (the
    # server's fetcher does not trust the session's CA), so success means it was not fetched.
    edit = server.run({"prompt": "the same at night", "size": "1K", "inputImage": url})
    edited = server.wait(edit["taskid"])
    assert edited["pexit"] == "0", edited["debugerror"]
    assert edited["parameters"]["inputImage"].startswith(f"{server.url}/v1/File/")


def test_https_refuses_plain_http_and_an_unknown_ca(shared_server: Any) -> None:
    server: LiveServer = shared_server(**HTTPS)
    with pytest.raises(httpx.TransportError):  # the port speaks TLS only
        httpx.get(server.url.replace("https://", "http://") + "/readyz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # certifi's roots do not sign it
        httpx.get(f"{server.url}/readyz", timeout=10)
    assert server.http.get("/readyz").status_code == 200


def test_the_sdk_over_https_and_wss_with_ssl_cert_file(
    shared_server: Any, monkeypatch: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The SDK as users run it: its httpx client and websockets both read the CA from ``SSL_CERT_FILE``."""
    server: LiveServer = shared_server(**HTTPS)
    certs = certificates(tmp_path_factory.getbasetemp() / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    assert server.creds is not None
    with Client(server.url, server.creds.api_key, server.creds.api_secret) as client:
        assert client.socket_url == server.url.replace("https://", "wss://") + "/v1"
        run = client.run("a red fox in the snow", model=MODEL, size="1K")
        events = [event.type for event in client.events(run.socketaccesstoken, timeout=120)]
        assert events[-1] == "task_postprocess_end", events
        task = client.detail(run.taskid)
        [saved] = [client.download(output, tmp_path) for output in task.outputs]
    with Image.open(saved) as image:
        assert image.size == (1024, 1024)


def test_the_head_timeout_holds_after_the_handshake(shared_server: Any) -> None:
    """The guarded protocol runs inside the TLS transport: a connection that completes the handshake and sends no
    request head is closed after ``http_header_timeout_seconds`` (2 s here), one that sends its head is served."""
    server: LiveServer = shared_server(**HTTPS)
    assert isinstance(server.verify, ssl.SSLContext)
    address = ("127.0.0.1", server.settings.port)
    with server.verify.wrap_socket(socket.create_connection(address, timeout=30), server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")
    with server.verify.wrap_socket(socket.create_connection(address, timeout=30), server_hostname="127.0.0.1") as tls:
        try:
            closed = tls.recv(1) == b""  # waits for the server's close (or fails the test after 30 s)
        except (ConnectionResetError, ssl.SSLEOFError):
            closed = True
        assert closed


def test_replicate_client_over_https_reads_file_outputs(
    shared_server: Any, monkeypatch: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Replicate's own client wraps outputs in ``FileOutput`` only for https URLs, and reads them with its token and
    no redirects: the real client against the HTTPS server, trusting the session's CA through ``SSL_CERT_FILE``."""
    import replicate
    from replicate.helpers import FileOutput

    server: LiveServer = shared_server(**HTTPS)
    certs = certificates(tmp_path_factory.getbasetemp() / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    assert server.creds is not None
    client = replicate.Client(api_token=f"{server.creds.api_key}:{server.creds.api_secret}", base_url=server.url)
    try:
        output = client.run("bytedance/seedream-4", input={"prompt": "a lighthouse at dusk", "size": "1K"})
        [image] = output
        assert isinstance(image, FileOutput) and image.url.startswith("https://127.0.0.1:")
        with Image.open(io.BytesIO(image.read())) as picture:
            assert picture.size == (1024, 1024)
    finally:
        client._client.close()  # the client keeps its connection pool open
