"""What both clients share: request shapes, envelope and frame parsing, the polling fallback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from websockets.exceptions import WebSocketException

from dreamserve import __version__
from dreamserve.client.errors import TransportError, error_from
from dreamserve.client.files import file_part, form_value, is_url
from dreamserve.client.records import Event, EventHandler, ImageInput, RunResult, Task, decode_message
from dreamserve.errors import DreamError, NotFound
from dreamserve.signing import auth_headers
from dreamserve.status import Frame

DEFAULT_MODEL = "bytedance/seedream-v4"
#: Run uploads up to 14 images and a busy server may take a while to answer: generous reads, quick connects.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: How long ``wait`` follows a task by default (queue time included).
DEFAULT_WAIT = 3600.0
#: Polling backoff when the socket is unavailable (Wiro's MCP client uses the same steps).
POLL_STEPS: tuple[float, ...] = (2.0, 5.0, 10.0)
#: Frames may carry preview images; WiroKit allows 8 MiB too.
MAX_FRAME_BYTES = 8 * 1024 * 1024

# What a failing socket can raise; ``wait`` then falls back to polling Task/Detail.
SOCKET_ERRORS = (OSError, WebSocketException, DreamError)


class BaseClient:
    """Everything but I/O: request shapes, envelope parsing, frame parsing. Shared by both clients."""

    def __init__(self, base_url: str, api_key: str, api_secret: str | None, socket_url: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret
        # Wiro's socket is on another host (wss://socket.wiro.ai/v1); ours is the API host's /v1.
        self.socket_url = socket_url or to_ws(self.base_url) + "/v1"
        self._last_nonce = 0
        self._nonce_lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        # Milliseconds, strictly increasing: a server that accepts each nonce once (unique_nonces)
        # must not see two equal ones when requests leave within the same second, or concurrently.
        with self._nonce_lock:
            self._last_nonce = max(time.time_ns() // 1_000_000, self._last_nonce + 1)
            nonce = str(self._last_nonce)
        return {"user-agent": f"dreamserve-python/{__version__}", **auth_headers(self.api_key, self.api_secret, nonce)}

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _run_request(
        self,
        prompt: str,
        *,
        model: str,
        images: Sequence[ImageInput],
        size: str | None,
        max_images: int,
        watermark: bool,
        callback_url: str | None,
        seed: int | None,
        extra: Mapping[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """The URL and httpx keyword arguments of a Run request."""
        # Wiro's canonical JSON body: maxImages a number, watermark the string "true"/"false".
        fields: dict[str, Any] = {"prompt": prompt, "maxImages": max_images, "watermark": str(watermark).lower()}
        if size:
            fields["size"] = size
        if callback_url:
            fields["callbackUrl"] = callback_url
        if seed is not None:
            fields["seed"] = seed
        fields.update(extra)
        url = self._url(f"/v1/Run/{model.strip('/')}")
        if all(is_url(image) for image in images):
            return url, {"json": {**fields, **({"inputImage": [str(i) for i in images]} if images else {})}}
        # Files and URLs go in one repeated multipart field (Wiro's combinefileinput), in the caller's
        # order: the order of references matters to the model. A (None, value) part is a plain field.
        parts: list[tuple[str, Any]] = [
            ("inputImage", (None, image) if is_url(image) else file_part(image, n)) for n, image in enumerate(images)
        ]
        return url, {"data": {k: form_value(v) for k, v in fields.items()}, "files": parts}

    @staticmethod
    def _parse(response: httpx.Response) -> dict[str, Any]:
        """The body of a ``result: true`` answer; otherwise raise the matching ``DreamError``."""
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("result") is True:
            return body
        if not isinstance(body, dict) or ("errors" not in body and "result" not in body):
            snippet = " ".join(response.text.split())[:200]
            raise TransportError(f"HTTP {status} from {response.url} is not a Wiro answer: {snippet!r}", status)
        raise error_from(body, response)

    @staticmethod
    def _task(body: Mapping[str, Any]) -> Task | None:
        tasks = body.get("tasklist") or []
        return Task(tasks[0]) if tasks and isinstance(tasks[0], dict) else None

    @staticmethod
    def _run_result(body: Mapping[str, Any]) -> RunResult:
        if not body.get("taskid") or not body.get("socketaccesstoken"):
            raise TransportError(f"Run answered without taskid/socketaccesstoken: {body}")
        return RunResult(str(body["taskid"]), str(body["socketaccesstoken"]))

    @staticmethod
    def _task_key(taskid: str | int | None, tasktoken: str | None) -> dict[str, str]:
        if taskid is not None and str(taskid):
            return {"taskid": str(taskid)}
        if tasktoken:
            return {"tasktoken": tasktoken}
        raise ValueError("Give taskid or tasktoken.")

    @staticmethod
    def _register(tasktoken: str) -> str:
        return json.dumps({"type": Frame.INFO.value, "tasktoken": tasktoken})

    @staticmethod
    def _event(raw: str | bytes) -> Event | None:
        """A frame as an Event; ``None`` for frames that are not task events (binary, non-JSON, hello)."""
        try:
            frame = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return None
        if frame["type"] == "error" or frame.get("result") is False:
            # Our server's answer to an unknown token or a malformed registration.
            raise NotFound(str(frame.get("message") or "The socket refused the task token."))
        if "id" not in frame and "tasktoken" not in frame:
            return None  # e.g. {"type": "connected"}
        return Event(
            type=frame["type"],
            taskid=str(frame.get("id") or ""),
            tasktoken=str(frame.get("tasktoken") or ""),
            message=decode_message(frame.get("message")),
            result=frame.get("result") is not False,
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "open_timeout": 10,
            "max_size": MAX_FRAME_BYTES,
            "user_agent_header": f"dreamserve-python/{__version__}",
        }


class Watch:
    """What ``wait`` has reported so far, so the polling fallback reports only changes, like the socket would."""

    def __init__(self, tasktoken: str, on_event: EventHandler | None) -> None:
        self.tasktoken = tasktoken
        self.on_event = on_event
        self.status = ""
        self.progress: Any = None

    def seen(self, event: Event) -> None:
        if event.type not in (Frame.OUTPUT, Frame.ERROR) and not event.type.endswith("_full"):
            self.status = event.type
        if self.on_event is not None:
            self.on_event(event)

    def polled(self, task: Task) -> None:
        if task.status and task.status != self.status:
            self.seen(Event(task.status, task.id, self.tasktoken, None))
        # dreamserve's Detail carries the latest progress object (an extension): report it as task_output.
        progress = task.data.get("progress")
        if progress and progress != self.progress and not task.is_terminal:
            self.progress = progress
            self.seen(Event(Frame.OUTPUT, task.id, self.tasktoken, decode_message(progress)))


def to_ws(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url.removeprefix("https://")
    return "ws://" + url.removeprefix("http://")


def pause(delay: float, deadline: float, tasktoken: str, watch: Watch) -> float:
    """How long to sleep before the next poll; raises ``TimeoutError`` once the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"Task {tasktoken} has not finished within the wait timeout (last: {watch.status}).")
    return min(delay, left)
