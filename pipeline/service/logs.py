"""One log format for every process, whose lines say which Celery task or HTTP request they
belong to (``[task <id>]``, ``[request <id>]``, ``-`` outside either). No PHI: the context is
an opaque id, never a patient's or a file's name."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(context)s]: %(message)s"
CONTEXT: ContextVar[str] = ContextVar("cxr_log_context", default="-")


class ContextFilter(logging.Filter):
    """Adds ``record.context``: the task or request the current thread is working for."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = CONTEXT.get()
        return True


@contextmanager
def log_context(label: str) -> Iterator[None]:
    """Lines logged inside the block carry label (e.g. ``task 3f2a…``)."""
    token = CONTEXT.set(label)
    try:
        yield
    finally:
        CONTEXT.reset(token)


def task_label(ids: list[str]) -> str:
    """The context of a batch of Celery messages: its first task id, and how many more."""
    if not ids:
        return "-"
    return f"task {ids[0]}" + (f" +{len(ids) - 1}" if len(ids) > 1 else "")


def use_format(handlers: list[logging.Handler]) -> None:
    """Give handlers (e.g. those Celery or gunicorn made) this format and the context filter."""
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())


def configure(stream: IO[str] = sys.stderr) -> None:
    """Root logging for a command: CXR_LOG_LEVEL (default INFO) to stream, in this format."""
    handler = logging.StreamHandler(stream)
    use_format([handler])
    logging.basicConfig(level=os.environ.get("CXR_LOG_LEVEL", "INFO"), handlers=[handler])
    # pydicom logs invalid header values verbatim; those can be patient names.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
