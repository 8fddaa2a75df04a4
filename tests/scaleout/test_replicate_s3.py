"""Replicate's files and outputs on S3: read through the API with the token (the client follows no redirect)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import httpx
import pytest
import replicate
from replicate.helpers import FileOutput

from tests.conftest import App, png_bytes
from tests.test_replicate import AppTransport, picture

S3 = os.environ.get("DREAMSERVE_TEST_S3")

pytestmark = pytest.mark.skipif(not S3 and not os.environ.get("CI"), reason="S3 not running: use scripts/scaleout-env")


def test_a_file_on_s3_reads_through_with_the_token(make_app: Callable[..., App]) -> None:
    app = make_app(model={"workers": 0}, s3={"bucket": "dreamserve", "endpoint": S3}, public_url="https://testserver")
    assert app.creds is not None
    api = replicate.Client(
        api_token=f"{app.creds.api_key}:{app.creds.api_secret}", base_url=app.url, transport=AppTransport(app)
    )
    data = png_bytes(120, 80)
    file = api.files.create(io.BytesIO(data), filename="s3.png")
    assert app.client.app.state.services.blobs.local_path("uploads/any.png") is None  # S3: no file on disk
    assert FileOutput(file.urls["get"], api).read() == data
    assert api.files.delete(file.id) is True
    with pytest.raises(httpx.HTTPStatusError) as gone:
        FileOutput(file.urls["get"], api).read()  # raise_for_status
    assert gone.value.response.status_code == 404


def test_outputs_on_s3_read_as_file_outputs(scripted_app: Callable[..., App]) -> None:
    app = scripted_app(s3={"bucket": "dreamserve", "endpoint": S3})
    assert app.creds is not None
    api = replicate.Client(
        api_token=f"{app.creds.api_key}:{app.creds.api_secret}", base_url=app.url, transport=AppTransport(app)
    )
    output = api.run("bytedance/seedream-4", input={"prompt": "on s3", "size": "1K", "aspect_ratio": "3:2"})
    assert str(output[0]).startswith(f"{app.url}/v1/predictions/")
    assert picture(output[0].read()).size == (1248, 832)
    events = list(api.stream("bytedance/seedream-4", input={"prompt": "streamed", "size": "1K"}))
    streamed = [event.data for event in events if event.event.value == "output"]
    assert picture(streamed[0].read()).size == (1024, 1024)
    assert app.http.get(str(output[0])).status_code == 401  # the token is needed
