"""Logging of the server processes: set up by ``serve`` and ``worker`` (never at import), one logger per module.

Records about a task carry its id (``extra=about(id)``), shown as ``[task 12]``. The model process sends its
records over its pipe (``PipeHandler``) and the supervisor replays them into this process's loggers
(``replay``), so they land in the same log, with the same format and levels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(task)s: %(message)s"


def about(task_id: int) -> dict[str, int]:
    """``log.info(..., extra=about(id))``: marks a record as about that task."""
    return {"task_id": task_id}


class _TaskField(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        task_id = getattr(record, "task_id", None)
        record.task = f" [task {task_id}]" if task_id is not None else ""
        return True


def configure(level: str | int = "INFO") -> None:
    """Send the ``dreamserve`` loggers to stderr, beside uvicorn's and Celery's lines (which they leave alone)."""
    handler = logging.StreamHandler()
    handler.addFilter(_TaskField())
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("dreamserve")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


# -- the model process's side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Log:
    """A log record of the model process, as a message to its parent (``worker/protocol.py``): the fields of a
    ``LogRecord`` that survive pickling, the message already formatted."""

    record: dict[str, Any]


class PipeHandler(logging.Handler):
    """In the model process: each record becomes a ``Log`` message to the parent."""

    def __init__(self, send: Callable[[Log], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = record.exc_text
            if record.exc_info:
                exc_text = logging.Formatter().formatException(record.exc_info)
            fields = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "created": record.created,
                "msecs": record.msecs,
                "process": record.process,
                "processName": record.processName,
                "exc_text": exc_text,
            }
            self._send(Log(fields))
        except OSError:
            pass  # the parent is gone (its pipe closed): nobody is left to read the record
        except Exception:
            self.handleError(record)


def forward_from_child(send: Callable[[Any], None], level: int) -> Callable[[Any], None]:
    """Route the model process's logging to its parent; returns ``send`` made safe to call from any thread
    (a library may log from a thread of its own while the main thread sends a step)."""
    lock = threading.Lock()

    def locked(message: Any) -> None:
        with lock:
            send(message)

    root = logging.getLogger()
    root.handlers[:] = [PipeHandler(locked)]
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    logging.getLogger("dreamserve").setLevel(level)
    logging.captureWarnings(True)
    return locked


def replay(message: Log) -> None:
    """In the parent: hand a record from the model process to the logger of the same name."""
    record = logging.makeLogRecord({**message.record, "args": None})
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
