"""Request shapes of the SDK (MockTransport), and the signature against api-spec.md's test vectors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from dreamserve.client import Client, RunResult
from dreamserve.errors import AuthError, InvalidRequest, InvalidState, NotFound, RateLimited
from dreamserve.signing import auth_headers, sign, verify


@pytest.mark.parametrize(
    ("key", "secret", "nonce", "signature"),
    [
        (
            "test-api-key",
            "test-secret",
            "1700000000000",
            "2d99fa1b6934f66a712785d1b402997e1b13d9d7cd5e0085211dac133ae4a8ef",
        ),
        ("api", "secret", "nonce-1", "d453af9a65c4ddd1ff17d5b03d3224b906899f3445dc4b4aadb5580260c60586"),
    ],
)
def test_wiro_signature_vectors(key: str, secret: str, nonce: str, signature: str) -> None:
    assert sign(key, secret, nonce) == signature
    assert verify(key, secret, nonce, signature.upper())
    assert not verify(key, secret, nonce + "0", signature)
    assert auth_headers(key, secret, nonce) == {"x-api-key": key, "x-nonce": nonce, "x-signature": signature}
    assert auth_headers(key, None) == {"x-api-key": key}


def _client(handler: object) -> Client:
    return Client("http://server", "key", "secret", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def test_run_sends_files_and_urls_in_one_repeated_field(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"errors": [], "taskid": "7", "socketaccesstoken": "tok", "result": True})

    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake")
    with _client(handler) as client:
        result = client.run("a cat", images=[image, "https://example.com/hat.jpg"], size="2K", max_images=2)
    assert result == RunResult("7", "tok")
    request = seen[0]
    assert request.url.path == "/v1/Run/bytedance/seedream-v4"
    assert verify("key", "secret", request.headers["x-nonce"], request.headers["x-signature"])
    body = request.content.decode("latin-1")
    assert body.count('name="inputImage"') == 2 and 'filename="cat.png"' in body
    assert "https://example.com/hat.jpg" in body and 'name="maxImages"' in body


def test_run_without_files_is_json() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"errors": [], "taskid": "1", "socketaccesstoken": "t", "result": True})

    with _client(handler) as client:
        client.run("x", images=["https://e.com/a.png"], watermark=True, seed=5)
    assert seen[0] == {
        "prompt": "x",
        "maxImages": "1",
        "watermark": "true",
        "seed": "5",
        "inputImage": ["https://e.com/a.png"],
    }


@pytest.mark.parametrize(
    ("status", "code", "message", "error"),
    [
        (401, 0, "Project authorization is not valid.", AuthError),
        (200, 0, "Request parameter [size] is not a size", InvalidRequest),
        (200, 1, "There is no task yet.", NotFound),
        (200, 1, "Task is not in a cancellable state.", InvalidState),
        (429, 96, "Slow down.", RateLimited),
    ],
)
def test_error_envelope_raises_the_matching_class(status: int, code: int, message: str, error: type) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"result": False, "errors": [{"code": code, "message": message}]}
        return httpx.Response(status, json=body, headers={"retry-after": "3"})

    with _client(handler) as client, pytest.raises(error) as info:
        client.detail(taskid="1")
    assert info.value.message == message
