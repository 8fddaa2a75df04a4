"""Logging: the model process's records cross its pipe and land in the parent's loggers; task records name the task.

End to end (serve's log holds the child's "model loaded" and a kill logged as asked) in test_service.py.
"""

from __future__ import annotations

import io
import logging
import pickle

import pytest

from dreamserve import logs


def test_child_records_are_replayed_into_the_parent_logger(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[logs.Log] = []
    handler = logs.PipeHandler(sent.append)
    record = logging.LogRecord(
        "dreamserve.worker.child", logging.WARNING, __file__, 1, "loaded in %.1f s", (2.5,), None
    )
    handler.emit(record)
    [message] = sent
    assert isinstance(message, logs.Log)
    crossed = pickle.loads(pickle.dumps(message))  # what crosses the pipe
    with caplog.at_level(logging.INFO, logger="dreamserve"):
        logs.replay(crossed)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("dreamserve.worker.child", logging.WARNING, "loaded in 2.5 s")
    ]


def test_replay_keeps_the_parents_level(caplog: pytest.LogCaptureFixture) -> None:
    debug = logging.LogRecord("dreamserve.worker.child", logging.DEBUG, __file__, 1, "noise", None, None)
    sent: list[logs.Log] = []
    logs.PipeHandler(sent.append).emit(debug)
    with caplog.at_level(logging.INFO, logger="dreamserve"):
        logs.replay(sent[0])
    assert caplog.records == []


def test_a_closed_pipe_drops_the_record_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    def closed(_: logs.Log) -> None:
        raise BrokenPipeError

    record = logging.LogRecord("dreamserve", logging.ERROR, __file__, 1, "parent gone", None, None)
    logs.PipeHandler(closed).emit(record)
    assert capsys.readouterr().err == "", "no '--- Logging error ---' report once the parent is gone"


def test_task_records_show_the_task_id() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs._TaskField())
    handler.setFormatter(logging.Formatter("%(name)s%(task)s: %(message)s"))
    logger = logging.getLogger("dreamserve.test_logs")
    logger.addHandler(handler)
    try:
        logger.warning("kill requested", extra=logs.about(12))
        logger.warning("model ready")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue().splitlines() == [
        "dreamserve.test_logs [task 12]: kill requested",
        "dreamserve.test_logs: model ready",
    ]
