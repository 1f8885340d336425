"""An admin's requeue: send a failed study's images through the model once more.

Only a study with a ``failed`` image whose decoded preview is stored can be re-run: that preview
rebuilds the model input. A rejected file was never decoded (nothing to re-run: fix it and send
it again); a done study keeps its result; a queued one is already on its way. Each image moves
``failed -> queued`` in a conditional UPDATE, so two admins clicking at once send it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.models import Image, Study, utcnow
from pipeline.queue.send import enqueue
from pipeline.states import State
from pipeline.triage.studies import refresh_study


class RequeueError(ValueError):
    """A study that cannot be requeued; the message says why, for the admin."""


def requeueable_image_ids(session: Session, study_ids: list[int]) -> dict[int, list[int]]:
    """Per study, its failed images that have a stored preview (and so can be re-run)."""
    if not study_ids:
        return {}
    rows = session.execute(
        select(Image.study_id, Image.id)
        .where(
            Image.study_id.in_(study_ids), Image.status == State.FAILED, Image.preview.is_not(None)
        )
        .order_by(Image.id)
    )
    found: dict[int, list[int]] = {}
    for study_id, image_id in rows:
        found.setdefault(study_id, []).append(image_id)
    return found


def _refusal(study: Study) -> str:
    reason = f" ({study.reason})" if study.reason else ""
    refusals: dict[str, str] = {
        State.DONE: f"study {study.id} is done: its result stands and is not re-run",
        State.REJECTED: f"study {study.id} was rejected at ingest{reason}: the file was never "
        "decoded, so there is nothing to re-run; fix the file and send it again",
        State.SKIPPED: f"study {study.id} was skipped{reason}: the model reads frontal films only",
    }
    return refusals.get(
        study.status, f"study {study.id} is {study.status}: it is already in the queue"
    )


def claim_for_requeue(
    session: Session, study_id: int, thresholds: Mapping[str, float]
) -> tuple[list[int], str]:
    """Move the study's re-runnable failed images back to queued; return their ids and lane."""
    study = session.get(Study, study_id)
    if study is None:
        raise RequeueError(f"no study {study_id}")
    candidates = requeueable_image_ids(session, [study_id]).get(study_id, [])
    now, claimed = utcnow(), []
    for image_id in candidates:
        moved = session.execute(
            update(Image)
            .where(Image.id == image_id, Image.status == State.FAILED)
            .values(
                status=State.QUEUED,
                reason=None,
                attempts=0,
                queued_at=now,
                started_at=None,
                done_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(image_id)
    if not claimed:
        raise RequeueError(_refusal(study))
    session.expire_all()
    study = session.get(Study, study_id)
    assert study is not None
    study.reason, study.done_at = None, None
    refresh_study(session, study, thresholds)
    return claimed, study.lane


def requeue_study(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Any,
    study_id: int,
    *,
    input_size: int,
    ttl_s: int,
    thresholds: Mapping[str, float],
    preprocess: str = "resize",
) -> dict[str, Any]:
    """Requeue a failed study: commit the state change first, then send its images once.

    Without Redis (``redis_client`` None) the images stay ``queued`` in the database and the
    reconciler sends them when the queue is back.
    """
    with session_scope(factory) as session:
        image_ids, lane = claim_for_requeue(session, study_id, thresholds)
    sent = 0
    if redis_client is not None and dispatcher is not None:
        sent = enqueue(
            factory,
            redis_client,
            dispatcher,
            image_ids,
            input_size,
            ttl_s,
            lane=lane,
            preprocess=preprocess,
        )
    return {"study_id": study_id, "image_ids": image_ids, "sent": sent, "lane": lane}
