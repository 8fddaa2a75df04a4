"""What the clients return: the task object, socket events and progress, read tolerantly."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dreamserve.status import FINAL, Frame, Pexit, TaskStatus

TERMINAL_EVENTS: frozenset[str] = FINAL
#: ``task_error`` is terminal only as a Task/Detail *status* (fatal pre-run failure); as a socket event it is stderr.
TERMINAL_STATUSES: frozenset[str] = frozenset(s for s in TaskStatus if s.is_terminal)
#: An input image: a local path, raw bytes, or an ``http(s)://`` URL the server fetches itself.
ImageInput = str | os.PathLike[str] | bytes
#: An item of ``Task.outputs`` or a bare URL.
OutputRef = Mapping[str, Any] | str
EventHandler = Callable[["Event"], None]


class WireText:
    """A read-only text field of the task object, named as on the wire: its value as text, ``""`` when absent."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, task: Task | None, owner: type | None = None) -> str:
        return "" if task is None else str(task.data.get(self.key) or "")


@dataclass(frozen=True)
class RunResult:
    taskid: str
    #: Doubles as the ``tasktoken`` of Task/Detail and of the socket.
    socketaccesstoken: str


@dataclass(frozen=True)
class Task:
    """A Wiro task object, kept exactly as the server sent it (``data``), with readable accessors."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.data.get("id", ""))

    socketaccesstoken = WireText()
    status = WireText()
    pexit = WireText()
    debugerror = WireText()

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return [o for o in self.data.get("outputs") or [] if isinstance(o, dict)]

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == TaskStatus.POSTPROCESS_END and self.pexit == Pexit.OK


@dataclass(frozen=True)
class Progress:
    """Wiro's ``progressGenerate`` object, read tolerantly: every value may be a string, a number or absent."""

    step: int | None
    total: int | None
    percentage: float | None
    speed: str
    elapsed: str
    #: The server's own estimate, e.g. ``"3s"``.
    remaining: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, message: Any) -> Progress | None:
        if not isinstance(message, dict) or not ({"stepCurrent", "percentage"} & message.keys()):
            return None
        speed = f"{message.get('speed') or ''} {message.get('speedType') or ''}".strip()
        return cls(
            step=to_int(message.get("stepCurrent")),
            total=to_int(message.get("stepTotal")),
            percentage=to_float(message.get("percentage")),
            speed=speed,
            elapsed=str(message.get("elapsedTime") or ""),
            remaining=str(message.get("remainingTime") or ""),
            raw=message,
        )


@dataclass(frozen=True)
class Event:
    """One socket frame ``{"type", "id", "tasktoken", "message", "result"}``; ``message`` already JSON-decoded."""

    type: str
    taskid: str
    tasktoken: str = ""
    message: Any = None
    result: bool = True

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def progress(self) -> Progress | None:
        return Progress.parse(self.message) if self.type == Frame.OUTPUT else None

    @property
    def queue_position(self) -> int | None:
        """dreamserve extension: ``task_queue`` may carry ``{"position": "3"}``; ``None`` when not given."""
        if self.type != TaskStatus.QUEUE or not isinstance(self.message, dict):
            return None
        return to_int(self.message.get("position"))

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The output items of ``task_postprocess_end`` (the same items as Task/Detail ``outputs``)."""
        if self.type != TaskStatus.POSTPROCESS_END or not isinstance(self.message, list):
            return []
        return [o for o in self.message if isinstance(o, dict)]


def to_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def to_int(value: Any) -> int | None:
    number = to_float(value)
    return int(number) if number is not None and number == number and abs(number) != float("inf") else None


def decode_message(message: Any) -> Any:
    """Progress objects and output lists sometimes arrive JSON-encoded inside a string (WiroKit parses them)."""
    if isinstance(message, str) and message.lstrip().startswith(("{", "[")):
        try:
            return json.loads(message)
        except ValueError:
            return message
    return message
