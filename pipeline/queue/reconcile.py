"""The reconciler: re-send work that the database says is unfinished.

Redis may be flushed or restarted and a worker may die holding a batch. The database knows every
image still ``queued`` or ``processing``; this re-sends those past a timeout and gives up, with a
reason, after the configured number of attempts. What a dead worker held is re-sent at once
(``requeue_dead_workers``): its supervisor saw it exit, or its heartbeat expired. The timeout
is the last resort, for a worker that is alive and does not finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.models import Image, Study, as_utc, utcnow
from pipeline.queue.dispatch import Dispatcher
from pipeline.queue.inflight import (
    heartbeats,
    hung_workers,
    images_in_flight,
    messages_held_since,
)
from pipeline.queue.send import enqueue, mark_unsent
from pipeline.states import State
from pipeline.triage.studies import refresh_study

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
    queued_after_s: float | None = None,
) -> dict[str, int]:
    """Re-send images queued or processing for longer than stuck_after_s; fail the exhausted.

    A queued image whose message a worker has held, unclaimed, for longer than
    ``held_after_s`` (default: ``stuck_after_s``, at least ``HELD_GRACE_S``) is re-sent too:
    its worker died while buffering the batch. ``queued_after_s`` (default: stuck_after_s)
    is the age past which a queued image with no message in Redis is re-sent.
    """
    if held_after_s is None:
        held_after_s = max(stuck_after_s, HELD_GRACE_S)
    cutoff = utcnow() - timedelta(seconds=stuck_after_s)
    queued_cutoff = utcnow() - timedelta(
        seconds=stuck_after_s if queued_after_s is None else queued_after_s
    )
    with session_scope(factory) as session:
        rows = session.execute(
            select(Image, Study.lane)
            .join(Study, Study.id == Image.study_id)
            .where(
                or_(
                    and_(
                        Image.status.in_((State.RECEIVED, State.QUEUED)),
                        or_(Image.queued_at.is_(None), Image.queued_at <= queued_cutoff),
                    ),
                    and_(Image.status == State.PROCESSING, Image.started_at <= cutoff),
                )
            )
        ).all()
        # A queued image whose task message is in Redis (in a lane, or held by a worker) is
        # waiting in a backlog, not lost. Neither a payload nor any marker proves that: a sender
        # can die between payload and message, and kombu takes a message off its queue before
        # recording it as unacknowledged, so a Redis crash in between loses it. Look.
        candidates = {img.id for img, _ in rows if img.status != State.PROCESSING}
        waiting = (
            candidates & images_in_flight(redis_client, held_at_most_s=held_after_s)
            if candidates
            else set()
        )
        resend, failed = _mark_for_resend(
            session,
            [(img, lane) for img, lane in rows if img.id not in waiting],
            max_attempts,
            thresholds,
        )
    sent = _send(factory, redis_client, dispatcher, resend, input_size, ttl_s, preprocess)
    if sent or failed:
        log.warning("reconciler re-sent %d images and failed %d", sent, failed)
    return {"requeued": sent, "failed": failed}


def _mark_for_resend(
    session: Session,
    rows: Iterable[tuple[Image, str]],
    max_attempts: int,
    thresholds: Mapping[str, float],
) -> tuple[dict[str, list[int]], int]:
    """Move rows back to queued (per lane, to send after commit); fail the exhausted ones."""
    resend: dict[str, list[int]] = {"live": [], "bulk": []}
    failed = 0
    for img, lane in rows:
        if img.attempts >= max_attempts:
            img.status, img.done_at = State.FAILED, utcnow()
            img.reason = (
                f"gave up after {img.attempts} attempts: the worker did not finish "
                "this image (an admin can requeue it)"
            )
            failed += 1
            session.flush()
            refresh_study(session, session.get(Study, img.study_id), thresholds)  # type: ignore[arg-type]
            continue
        img.status, img.queued_at, img.worker = State.QUEUED, utcnow(), None
        resend[lane if lane in resend else "live"].append(img.id)
    return resend, failed


def _send(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Dispatcher,
    resend: dict[str, list[int]],
    input_size: int,
    ttl_s: int,
    preprocess: str,
) -> int:
    sent = 0
    for lane, ids in resend.items():
        try:
            sent += enqueue(
                factory,
                redis_client,
                dispatcher,
                ids,
                input_size,
                ttl_s,
                lane=lane,
                preprocess=preprocess,
            )
        except Exception:
            mark_unsent(factory, ids)  # Redis down or full: the next check tries again
            raise
    return sent


_REDIS_RUN_IDS: dict[str, str] = {}


def redis_restarted(redis_client: Any, key: str) -> bool:
    """True when the Redis server behind key is another process than at the last call.

    A restarted Redis may have lost task messages (the AOF keeps at most the last second's
    writes, an embedded Redis may keep none): its queued images are looked for at once.
    """
    run_id = str(redis_client.info("server").get("run_id", ""))
    previous = _REDIS_RUN_IDS.get(key)
    _REDIS_RUN_IDS[key] = run_id
    return previous is not None and previous != run_id


def expired_claims(
    claims: Iterable[tuple[int, str, datetime]], beats: Mapping[str, float | None]
) -> list[int]:
    """Images whose claiming worker is dead, from (image id, worker, claimed at) and heartbeats.

    A worker is dead when its heartbeat has expired (``beats[worker]`` is None), or when the
    heartbeat under its name comes from a process started after the claim: the claimer died
    and was restarted under the same name (a container's restart policy keeps its hostname).
    """
    dead = []
    for image_id, worker, claimed_at in claims:
        since = beats.get(worker)
        if since is None or (since > 0 and as_utc(claimed_at).timestamp() < since):
            dead.append(image_id)
    return dead


def requeue_dead_workers(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Dispatcher,
    *,
    max_attempts: int,
    input_size: int,
    ttl_s: int,
    thresholds: dict[str, float],
    dead: Iterable[str] = (),
    held_after_s: float = HELD_GRACE_S,
    preprocess: str = "resize",
    hung_after_s: float | None = None,
) -> dict[str, int]:
    """Re-send at once what dead workers held, without waiting for the stuck timeout.

    That is: images ``processing`` under a worker named in ``dead`` (its supervisor saw it
    exit), whose heartbeat has expired (dead or frozen), or whose heartbeat says its batch has
    run for more than ``hung_after_s`` (hung; None: not checked), and images still ``queued``
    whose message a worker took more than ``held_after_s`` ago without claiming it (it died
    while buffering). An image that was finished is ``done`` and never selected, a second
    delivery of one that is re-sent is skipped at claim, and a hung worker that wakes up finds
    its claim gone and writes nothing (``pipeline.classifier.inference``), so no image gets two results.
    """
    named = set(dead)
    held = messages_held_since(redis_client, time.time() - held_after_s)
    with session_scope(factory) as session:
        claims: list[tuple[int, str, datetime]] = [
            (image_id, worker, started_at)
            for image_id, worker, started_at in session.execute(
                select(Image.id, Image.worker, Image.started_at).where(
                    Image.status == State.PROCESSING, Image.worker.is_not(None)
                )
            )
            if worker is not None and started_at is not None
        ]
        if hung_after_s is not None:
            hung = hung_workers(redis_client, sorted({c[1] for c in claims}), hung_after_s)
            if hung:
                log.warning(
                    "%d workers hung (a batch running over %.0f s): re-sending their claims",
                    len(hung),
                    hung_after_s,
                )
            named |= hung
        ids = {image_id for image_id, worker, _ in claims if worker in named}
        others = [c for c in claims if c[1] not in named]
        ids.update(expired_claims(others, heartbeats(redis_client, sorted({c[1] for c in others}))))
        # Committed, but their message could not be sent (mark_unsent): send them now.
        ids.update(
            session.scalars(
                select(Image.id).where(Image.status == State.QUEUED, Image.queued_at.is_(None))
            )
        )
        if held:
            queued = session.execute(
                select(Image.id, Image.queued_at).where(
                    Image.id.in_(list(held)), Image.status.in_((State.RECEIVED, State.QUEUED))
                )
            )
            # Not one re-sent since that worker took it: that one has a fresh message.
            ids.update(i for i, at in queued if at is None or as_utc(at).timestamp() <= held[i])
        rows = (
            session.execute(
                select(Image, Study.lane)
                .join(Study, Study.id == Image.study_id)
                .where(Image.id.in_(sorted(ids)))
            ).all()
            if ids
            else []
        )
        resend, failed = _mark_for_resend(
            session, [(i, lane) for i, lane in rows], max_attempts, thresholds
        )
    sent = _send(factory, redis_client, dispatcher, resend, input_size, ttl_s, preprocess)
    if sent or failed:
        log.warning("re-sent %d images dead workers held (failed %d)", sent, failed)
    return {"requeued": sent, "failed": failed}
