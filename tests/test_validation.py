"""Every invalid input gets Wiro's error envelope with a message that says what to do, and stores nothing.

In-process (``make_app``): none of these needs a model process."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from dreamserve.signing import auth_headers
from tests.conftest import MODEL, png_bytes


def _files(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("inputImage", (f"r{i}.png", png_bytes(64, 64), "image/png")) for i in range(count)]


CASES: list[tuple[str, dict[str, Any], Any, str]] = [
    ("15 references", {"prompt": "x", "maxImages": "1"}, _files(15), "at most 14 reference images"),
    ("maxImages 16", {"prompt": "x", "maxImages": "16"}, None, "[maxImages] must be between 1 and 15"),
    ("refs + outputs > 15", {"prompt": "x", "maxImages": "13"}, _files(3), "ask for at most 12 images"),
    ("size 0x0", {"prompt": "x", "size": "0x0"}, None, "positive width and height"),
    ("bad aspect", {"prompt": "x", "size": "4000x240"}, None, "beyond 16:1"),
    ("too few pixels", {"prompt": "x", "size": "800x800"}, None, "640,000 pixels"),
    ("not a size", {"prompt": "x", "size": "huge"}, None, "is not a size"),
    ("missing prompt", {"size": "2K"}, None, "[prompt] required"),
    ("blank prompt", {"prompt": "   "}, None, "[prompt] required"),
    ("maxImages text", {"prompt": "x", "maxImages": "two"}, None, "must be integer or float"),
    ("watermark", {"prompt": "x", "watermark": "maybe"}, None, '"true" or "false"'),
    ("callback scheme", {"prompt": "x", "callbackUrl": "ftp://example.com/hook"}, None, "http:// or https://"),
    ("url scheme", {"prompt": "x", "inputImage": "file:///etc/passwd"}, None, "http(s) URL"),
    (
        "non-image upload",
        {"prompt": "x"},
        [("inputImage", ("notes.txt", b"just some text, not pixels", "image/png"))],
        "not an image",
    ),
    (
        "one bad file among good ones",
        {"prompt": "x"},
        [*_files(2), ("inputImage", ("bad.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"))],
        "'bad.png'",
    ),
]


def test_invalid_inputs_store_nothing(make_app: Any) -> None:
    server = make_app(model={"max_pixels": 64 * 64, "workers": 0})
    for name, data, files, expected in CASES:
        if files is None:
            response = server.post(f"/v1/Run/{MODEL}", json=data)
        else:
            response = server.post(f"/v1/Run/{MODEL}", data=data, files=files)
        body = response.json()
        assert response.status_code == 200, name
        assert body["result"] is False, name
        item = body["errors"][0]
        assert item["code"] == 0 and item["type"] == "invalid_request", name
        assert expected in item["message"], (name, item["message"])
        # Beyond Wiro (its clients ignore extra keys): the field at fault, by name.
        field = re.search(r"\[(\w+)\]", item["message"])
        assert item.get("param") == (field.group(1) if field else None), (name, item)

    listing = server.post("/v1/Task/List", json={}).json()
    assert listing["result"] is True and listing["total"] == "0"
    stored = [p for p in Path(server.settings.blob_dir).rglob("*") if p.is_file()]
    assert stored == []


def test_unknown_model_and_route(make_app: Any) -> None:
    server = make_app(model={"workers": 0}, max_request_bytes=1024)
    body = server.post("/v1/Run/someone/else", json={"prompt": "x"}).json()
    assert body["result"] is False and body["errors"][0]["code"] == 1
    assert "bytedance/seedream-v4" in body["errors"][0]["message"]
    response = server.post("/v1/Nope", json={})
    assert response.status_code == 404 and response.json()["errors"][0]["message"] == "Error parsing url."
    assert response.json()["errors"][0]["type"] == "route_not_found"
    wrong_method = server.http.get("/v1/Task/Detail")
    assert wrong_method.status_code == 405 and wrong_method.json()["errors"][0]["type"] == "method_not_allowed"
    json_body = {**server.headers(), "content-type": "application/json"}
    too_large = server.http.post(f"/v1/Run/{MODEL}", content=b"x" * 2048, headers=json_body)
    assert too_large.status_code == 413 and too_large.json()["errors"][0]["type"] == "request_too_large"
    # Model slugs are case-insensitive, as on Wiro.
    ok = server.post("/v1/Run/ByteDance/Seedream-V4", json={"prompt": "x", "size": "1K"}).json()
    assert ok["result"] is True


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "Project authorization is not founded."),
        ({"x-api-key": "nope"}, 401, "Project authorization is not founded."),
        ("no-signature", 401, "requires signature authentication"),
        ("bad-signature", 401, "Project authorization is not valid."),
        ("expired-nonce", 401, "s old (allowed: 900 s)"),
    ],
)
def test_auth_failures(make_app: Any, headers: Any, status: int, message: str) -> None:
    server = make_app(model={"workers": 0})
    creds = server.creds
    if headers == "no-signature":
        headers = {"x-api-key": creds.api_key}
    elif headers == "bad-signature":
        headers = {**auth_headers(creds.api_key, creds.api_secret, str(int(time.time()))), "x-signature": "0" * 64}
    elif headers == "expired-nonce":
        headers = auth_headers(creds.api_key, creds.api_secret, str(int(time.time()) - 3600))
    response = server.http.post(f"/v1/Run/{MODEL}", headers=headers, json={"prompt": "x"})
    assert response.status_code == status
    body = response.json()
    assert body["result"] is False and message in body["errors"][0]["message"]


def test_ark_and_replicate_name_the_served_model_or_answer_their_404(tmp_path: Path) -> None:
    from dreamserve.dialects.ark.decode import served as ark_served
    from dreamserve.dialects.replicate.decode import served as replicate_served
    from dreamserve.errors import NotFound
    from dreamserve.settings import Settings

    settings = Settings(data_dir=tmp_path)
    assert ark_served(settings, "Doubao-Seedream-4-0-250828") == "bytedance/seedream-v4"
    assert ark_served(settings, "BYTEDANCE/seedream-v4") == "bytedance/seedream-v4"
    assert replicate_served(settings, "ByteDance/Seedream-4") == "bytedance/seedream-v4"
    with pytest.raises(NotFound) as ark:
        ark_served(settings, "x" * 120)
    assert str(ark.value) == (
        f"The model or endpoint {'x' * 100} does not exist or you do not have access to it. Use one of: "
        "bytedance/seedream-v4, doubao-seedream-4-0-250828, seedream-4-0-250828."
    )
    with pytest.raises(NotFound) as replicate:
        replicate_served(settings, "{model}/{known}")
    assert str(replicate.value) == (
        "The model {model}/{known} does not exist here. Use one of: bytedance/seedream-4, bytedance/seedream-v4."
    )
