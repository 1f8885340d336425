"""Log lines name the Celery task or the request they belong to, in one format everywhere."""

from __future__ import annotations

import io
import logging
import re

from sqlalchemy import select

from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Study
from pipeline.service.logs import ContextFilter, log_context, task_label, use_format
from tests.worker.test_worker import make_studies, send, wait_done

TASK_LINE = re.compile(r"\[task [0-9a-f-]{36}(?: \+(\d+))?\]: batch of (\d+) messages")


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    use_format([handler])
    logger = logging.getLogger("cxr-test-logs")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger


def test_a_line_carries_the_context_it_was_logged_in_and_nothing_outside() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    logger.info("outside")
    with log_context("request 5f1c"):
        logger.info("inside")
        with log_context("task 0a0b"):
            logger.info("nested")
        logger.info("back")
    lines = stream.getvalue().splitlines()
    assert [line.split(" cxr-test-logs ")[1] for line in lines] == [
        "[-]: outside",
        "[request 5f1c]: inside",
        "[task 0a0b]: nested",
        "[request 5f1c]: back",
    ]
    assert sum(isinstance(f, ContextFilter) for f in logger.handlers[0].filters) == 1
    use_format(logger.handlers)  # applied twice: still one filter
    assert sum(isinstance(f, ContextFilter) for f in logger.handlers[0].filters) == 1


def test_a_batch_is_named_by_its_first_task_and_how_many_more() -> None:
    assert task_label([]) == "-"
    assert task_label(["a1"]) == "task a1"
    assert task_label(["a1", "b2", "c3"]) == "task a1 +2"


def test_the_worker_logs_each_batch_under_its_task_ids(settings, tmp_path, worker_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=8, batch_wait_ms=300)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    worker = worker_factory(settings)
    ids = send(settings, make_studies(tmp_path / "in", 3))
    wait_done(factory, ids)
    with factory() as session:
        assert list(session.scalars(select(Study.status))) == ["done"] * 3
    found = [m for m in TASK_LINE.finditer(worker.output())]
    assert found, worker.output()[-2000:]
    # every message of the batch is counted: the first id named, the rest as "+N"
    assert sum(int(m.group(2)) for m in found) == 3
    assert all(int(m.group(1) or 0) + 1 == int(m.group(2)) for m in found)
