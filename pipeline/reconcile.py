"""The reconciler: re-send work that the database says is unfinished.

Redis may be flushed or restarted and a worker may die holding a batch. The database knows every
image still ``queued`` or ``processing``; this re-sends those past a timeout and gives up, with a
reason, after the configured number of attempts.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.ingest import enqueue
from pipeline.models import Image, Study, utcnow
from pipeline.queue import Dispatcher, images_in_flight
from pipeline.studies import refresh_study

log = logging.getLogger(__name__)

# A live worker claims the messages it holds within CXR_BATCH_WAIT_MS, so one held unclaimed for
# longer than this belongs to a dead worker. (A retry held through its countdown, at most 60 s,
# may be sent a second time; the second delivery is skipped at claim.)
HELD_GRACE_S = 10.0


def requeue_stuck(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Dispatcher,
    *,
    stuck_after_s: float,
    max_attempts: int,
    input_size: int,
    ttl_s: int,
    thresholds: dict[str, float],
    held_after_s: float | None = None,
    preprocess: str = "resize",
) -> dict[str, int]:
    """Re-send images queued or processing for longer than stuck_after_s; fail the exhausted.

    A queued image whose message a worker has held, unclaimed, for longer than
    ``held_after_s`` (default: ``stuck_after_s``, at least ``HELD_GRACE_S``) is re-sent too:
    its worker died while buffering the batch.
    """
    if held_after_s is None:
        held_after_s = max(stuck_after_s, HELD_GRACE_S)
    cutoff = utcnow() - timedelta(seconds=stuck_after_s)
    resend: dict[str, list[int]] = {"live": [], "bulk": []}
    failed = 0
    with session_scope(factory) as session:
        rows = session.execute(
            select(Image, Study.lane)
            .join(Study, Study.id == Image.study_id)
            .where(
                or_(
                    and_(
                        Image.status.in_(("received", "queued")),
                        or_(Image.queued_at.is_(None), Image.queued_at <= cutoff),
                    ),
                    and_(Image.status == "processing", Image.started_at <= cutoff),
                )
            )
        ).all()
        # A queued image whose task message is in Redis (in a lane, or held by a worker) is
        # waiting in a backlog, not lost. Neither a payload nor any marker proves that: a sender
        # can die between payload and message, and kombu takes a message off its queue before
        # recording it as unacknowledged, so a Redis crash in between loses it. Look.
        candidates = {img.id for img, _ in rows if img.status != "processing"}
        waiting = (candidates & images_in_flight(redis_client, held_at_most_s=held_after_s)
                   if candidates else set())  # fmt: skip
        for img, lane in rows:
            if img.id in waiting:
                continue
            if img.attempts >= max_attempts:
                img.status, img.done_at = "failed", utcnow()
                img.reason = (
                    f"gave up after {img.attempts} attempts: the worker did not finish "
                    "this image (an admin can requeue it)"
                )
                failed += 1
                session.flush()
                refresh_study(session, session.get(Study, img.study_id), thresholds)  # type: ignore[arg-type]
                continue
            img.status, img.queued_at = "queued", utcnow()
            resend[lane if lane in resend else "live"].append(img.id)
    sent = 0
    for lane, ids in resend.items():
        sent += enqueue(factory, redis_client, dispatcher, ids, input_size, ttl_s, lane=lane,
                        preprocess=preprocess)  # fmt: skip
    if sent or failed:
        log.warning("reconciler re-sent %d images and failed %d", sent, failed)
    return {"requeued": sent, "failed": failed}
