"""celery-batches' ``Batches`` with its flush timer re-armed after a broker reconnect.

celery-batches 0.11 arms its repeating flush timer once, on the first message, and keeps the
handle on the long-lived task instance. When the connection to Redis is lost (Redis restarted
or crashed), Celery rebuilds the consumer with a new timer and calls ``Strategy()`` again, but
the stale handle keeps the guard from arming a timer on the new consumer: the worker then
holds its prefetched messages unacknowledged and never flushes them until the broker's
visibility timeout (clokep/celery-batches#107; fixed upstream in #108, not yet released).
The reliability suite's Redis crash scenario found it here: 16 studies stuck for minutes.
"""

from __future__ import annotations

from typing import Any

from celery_batches import Batches


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
        return super().Strategy(task, app, consumer)
