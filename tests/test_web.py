"""The playground page gets the server's vocabulary and limits inlined (no copy of them in app.js)."""

from __future__ import annotations

import json
import re
from typing import Any

from dreamserve.api.web import STATIC
from dreamserve.request import MAX_REFERENCES, MAX_TOTAL_IMAGES
from dreamserve.status import Pexit, TaskStatus


def test_the_page_carries_the_servers_vocabulary_and_limits(make_app: Any) -> None:
    app = make_app(model={"workers": 0})
    page = app.http.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
    block = re.search(r'<script id="dreamserve-config" type="application/json">(.*?)</script>', page.text)
    assert block is not None, page.text[:500]
    config = json.loads(block.group(1))
    assert config["status"] == {status.name: status.value for status in TaskStatus}
    assert config["pexit"]["KILLED"] == Pexit.KILLED == "137"
    assert config["terminal"] == ["task_cancel", "task_postprocess_end"]
    assert (config["maxReferences"], config["maxImages"]) == (MAX_REFERENCES, MAX_TOTAL_IMAGES)
    assert config["statusText"]["task_assign"] == "loading model"


def test_app_js_declares_no_status_of_its_own() -> None:
    script = (STATIC / "app.js").read_text()
    assert re.findall(r'"task_[a-z_]+"', script) == [], "statuses come from CONFIG (status.py), not literals"
    assert "MAX_REFERENCES = 14" not in script
