"""celery-batches' ``Batches`` with its flush timer re-armed after a broker reconnect.

celery-batches 0.11 arms its repeating flush timer once, on the first message, and keeps the
handle on the long-lived task instance. When the connection to Redis is lost (Redis restarted
or crashed), Celery rebuilds the consumer with a new timer and calls ``Strategy()`` again, but
the stale handle keeps the guard from arming a timer on the new consumer: the worker then
holds its prefetched messages unacknowledged and never flushes them until the broker's
visibility timeout (clokep/celery-batches#107; fixed upstream in #108, not yet released).
The reliability suite's Redis crash scenario found it here: 16 studies stuck for minutes.

It also times what Celery does around a batch (pipeline.profiling): decoding each message,
the wait from a batch's first message to its flush, acknowledging, and the idle time between
batches.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from celery_batches import Batches

from pipeline.profiling import STAGES


class ReconnectSafeBatches(Batches):
    """``Batches`` whose flush timer is re-armed on every (re)started consumer."""

    abstract = True

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        tref = getattr(self, "_tref", None)
        if tref is not None:
            # The old timer belongs to the dead consumer's hub; the next message arms a new one.
            try:
                tref.cancel()
            except Exception:  # the old hub may already be gone
                pass
            self._tref = None
        handler = super().Strategy(task, app, consumer)
        self._first_at: float | None = None  # when the batch now filling got its first message
        self._idle_from: float | None = None  # when the last batch ended
        self._message_ms = 0.0  # spent decoding the filling batch's messages

        def timed_handler(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            if self._first_at is None:
                self._first_at, self._message_ms = start, 0.0
                if self._idle_from is not None:
                    STAGES.add("idle", (start - self._idle_from) * 1000.0, 0.0, 0)
            with STAGES.time("message"):  # the flush this may trigger is timed on its own
                handler(*args, **kwargs)
            self._message_ms += (time.perf_counter() - start) * 1000.0

        return timed_handler

    def flush(self, requests: Collection[Any]) -> Any:
        """Run the batch (the solo pool runs it here), timing the wait before it and the acks."""
        now = time.perf_counter()
        first = getattr(self, "_first_at", None)
        if first is not None:
            fill = (now - first) * 1000.0 - getattr(self, "_message_ms", 0.0)
            STAGES.add("fill", max(0.0, fill), 0.0, len(requests))
        self._first_at = None
        with STAGES.time("ack", len(requests)):  # what is not timed inside: acks, conversions
            out = super().flush(requests)
        with STAGES.time("push"):
            self.on_flushed()
        self._idle_from = time.perf_counter()
        return out

    def on_flushed(self) -> None:
        """Called after each batch has run and been acknowledged."""
