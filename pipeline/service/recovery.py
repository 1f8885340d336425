"""Recovery passes of a running system: re-send what the database says is unfinished, and what
dead workers held (see ``pipeline.queue.reconcile`` for the rules)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.classifier.weights import describe_weights
from pipeline.db import session_factory
from pipeline.queue.connections import queue_connections
from pipeline.queue.reconcile import redis_restarted, requeue_dead_workers, requeue_stuck
from pipeline.service.supervisor import Child, Supervisor, worker_nodename
from pipeline.settings import Settings

log = logging.getLogger(__name__)
# How often `run` (and a multi-process `worker`) looks for workers whose heartbeat expired.
DEAD_WORKER_CHECK_S = 5.0
# How often `run` makes a full reconciler pass, and the age past which a queued image whose
# task message is nowhere in Redis is re-sent (its sender died between commit and send).
RECONCILE_EVERY_S = 10.0
LOST_MESSAGE_AFTER_S = 10.0


def _resend_args(settings: Settings) -> dict[str, Any]:
    # What every re-send needs to rebuild a lost payload and finish a study.
    model = describe_weights(settings)
    return {
        "max_attempts": settings.max_attempts,
        "input_size": model["input_size"],
        "ttl_s": settings.payload_ttl_s,
        "thresholds": model["thresholds"],
        "preprocess": model["preprocess"],
    }


def reconcile_once(
    settings: Settings,
    redis_url: str,
    stuck_after_s: float | None = None,
    held_after_s: float | None = None,
) -> dict:
    """Re-send unfinished work found in the database.

    ``processing`` past the stuck timeout, and ``queued`` past ``LOST_MESSAGE_AFTER_S`` (or
    the stuck timeout, if shorter) with no task message in Redis.
    """
    stuck_s = settings.stuck_after_s if stuck_after_s is None else stuck_after_s
    rescued = rescue_dead_workers(settings, redis_url, held_after_s=held_after_s)
    with queue_connections(redis_url) as (client, dispatcher):
        stuck = requeue_stuck(
            session_factory(settings),
            client,
            dispatcher,
            stuck_after_s=stuck_s,
            queued_after_s=min(stuck_s, LOST_MESSAGE_AFTER_S),
            held_after_s=held_after_s,
            **_resend_args(settings),
        )
    return {k: rescued[k] + stuck[k] for k in ("requeued", "failed")}


def rescue_dead_workers(
    settings: Settings,
    redis_url: str,
    dead: tuple[str, ...] = (),
    held_after_s: float | None = None,
) -> dict:
    """Re-send at once what dead workers held: those named, and any whose heartbeat expired.

    When Redis is another process than at the last check (it crashed and was restarted), the
    queued images whose messages it lost are re-sent too.
    """
    factory, resend = session_factory(settings), _resend_args(settings)
    held: dict[str, Any] = {} if held_after_s is None else {"held_after_s": held_after_s}
    with queue_connections(redis_url) as (client, dispatcher):
        if redis_restarted(client, redis_url):
            log.warning("Redis was restarted: re-sending queued work whose message it lost")
            requeue_stuck(
                factory,
                client,
                dispatcher,
                stuck_after_s=settings.stuck_after_s,
                queued_after_s=0,
                **resend,
            )
        return requeue_dead_workers(
            factory,
            client,
            dispatcher,
            dead=dead,
            hung_after_s=settings.hung_after_s,
            **resend,
            **held,
        )


def watch_workers(sup: Supervisor, settings: Settings, redis_url: str) -> None:
    """Have sup re-send a worker child's claimed work the moment it exits."""

    def on_exit(child: Child) -> None:
        if (name := worker_nodename(child.command)) is not None:
            rescue_dead_workers(settings, redis_url, dead=(name,))

    sup.on_exit = on_exit
