"""The LitServe side of ``peers.py``: the same pipeline call behind a ``LitAPI`` (a module of its own: LitServe
pickles the API into its worker process, so the class must be importable)."""

# No ``from __future__ import annotations``: LitServe builds its endpoint from these annotations at run time.
import base64
import io
import time
from typing import Any

import litserve as ls
from pydantic import BaseModel

from peers import Config, load


class ImageRequest(BaseModel):
    prompt: str


class ImageAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, config: dict[str, Any], **options: Any) -> None:
        super().__init__(**options)
        self.config = config  # a plain dict: it is pickled into LitServe's worker process

    def setup(self, device: str) -> None:
        self.generate = load(Config(**self.config))[1]

    def decode_request(self, request: ImageRequest) -> str:
        return request.prompt

    def predict(self, prompts: Any) -> Any:
        """One prompt, or a list of them when LitServe batches: one pipeline call either way."""
        started = time.perf_counter()
        many = isinstance(prompts, list)
        images = self.generate(len(prompts) if many else 1)
        seconds = time.perf_counter() - started
        pairs = [(image, seconds) for image in images]
        return pairs if many else pairs[0]

    def encode_response(self, output: tuple[Any, float]) -> dict[str, Any]:
        """The PNG, and the server's own seconds for it (the pipeline call and the PNG encoding)."""
        image, seconds = output
        started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        seconds += time.perf_counter() - started
        return {"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "seconds": seconds}
