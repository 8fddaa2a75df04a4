"""The OpenAI-compatible images API, driven by the official ``openai`` package against a real server."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import png_bytes


def _client(server: Any) -> openai.OpenAI:
    creds = server.creds
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=f"{creds.api_key}:{creds.api_secret}", max_retries=0)


def test_generate_url_and_b64(make_server: Any) -> None:
    server = make_server(model={"max_pixels": 64 * 64})
    client = _client(server)
    result = client.images.generate(model="seedream-4", prompt="a lighthouse at dusk", n=2, size="1024x1024")
    assert len(result.data) == 2 and all(item.url for item in result.data)
    image = Image.open(io.BytesIO(httpx.get(result.data[0].url or "").content))
    assert image.size == (1024, 1024)
    extra: dict[str, Any] = result.model_extra or {}
    # Beyond OpenAI: the task is an ordinary task of the project.
    task = server.detail(extra["task_id"])
    assert task["status"] == "task_postprocess_end" and task["parameters"]["maxImages"] == "2"

    encoded = client.images.generate(prompt="same, inline", size="1536x1024", response_format="b64_json")
    raw = base64.b64decode(encoded.data[0].b64_json or "")
    assert Image.open(io.BytesIO(raw)).size == (1536, 1024)


def test_edit_with_several_images(make_server: Any) -> None:
    server = make_server(model={"max_pixels": 64 * 64})
    client = _client(server)
    images = [("a.png", png_bytes(80, 80), "image/png"), ("b.png", png_bytes(96, 64, (0, 0, 200)), "image/png")]
    result = client.images.edit(image=images, prompt="put the blue thing on the red thing", size="1024x1024")
    assert len(result.data) == 1
    extra: dict[str, Any] = result.model_extra or {}
    task = server.detail(extra["task_id"])
    assert len(task["parameters"]["inputImage"]) == 2 and task["pexit"] == "0"


def test_errors_in_openai_shape(make_server: Any) -> None:
    server = make_server(model={"workers": 0})
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x")
    # A signature project refuses its key without the secret.
    keyonly = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.creds.api_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        keyonly.images.generate(prompt="x")
    assert "secret" in str(info.value)
    with pytest.raises(openai.BadRequestError) as bad:
        _client(server).images.generate(prompt="x", size="10x10")
    assert "[size]" in bad.value.body["message"]  # type: ignore[index]
