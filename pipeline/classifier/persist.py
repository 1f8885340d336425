"""Write a batch's results where this worker's claim still holds: predictions, states, the batch.

A claim (worker name and attempt number, taken by ``pipeline.classifier.inference.claim``) is
the token that lets a batch write its images: a worker judged dead whose images were re-sent
finds its claims gone and writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.classifier.network import BatchOutput, Classifier
from pipeline.db import session_scope
from pipeline.models import Batch, Image, Prediction, Study, as_utc, utcnow
from pipeline.states import State
from pipeline.triage import score as triage
from pipeline.triage.studies import refresh_studies

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What became of each image of a batch, and the batch's size and forward time."""

    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # already final: a redelivery
    # Computed, but the claim was taken away meanwhile (the worker was judged dead or hung and
    # its images re-sent, or another delivery claimed them): the result is dropped, unwritten.
    revoked: list[int] = field(default_factory=list)
    batch_size: int = 0
    seconds: float = 0.0


def _prediction_row(
    classifier: Classifier, image_id: int, out: BatchOutput, n: int, batch_ms: float, size: int
) -> Prediction | str:
    probs = out.probabilities[n]
    cam = out.cams[n]
    if not (np.all(np.isfinite(probs)) and np.all(np.isfinite(cam))):
        return "the model produced non-finite output (NaN or infinity) for this image"
    probabilities = {c: round(float(p), 6) for c, p in zip(classifier.classes, probs, strict=True)}
    p = triage.p_abnormal(probabilities)
    cls = triage.triage_class(p, classifier.thresholds)
    return Prediction(
        image_id=image_id,
        model_version=classifier.version,
        probabilities=probabilities,
        label=classifier.classes[int(out.cam_index[n])],
        p_abnormal=p,
        triage_class=cls,
        priority=triage.priority_score(p, classifier.thresholds),
        cam_class=classifier.cam_class(int(out.cam_index[n])),
        cam=np.ascontiguousarray(cam, dtype=np.float16).tobytes(),
        cam_h=int(cam.shape[0]),
        cam_w=int(cam.shape[1]),
        batch_size=size,
        inference_ms=batch_ms,
    )


def _elapsed_ms(start: datetime, end: datetime) -> float:
    return (as_utc(end) - as_utc(start)).total_seconds() * 1000.0


def _insert_predictions(session: Session, rows: list[Prediction], version: str) -> None:
    """Insert in one statement; on a conflict (a concurrent delivery) insert only what is missing."""
    if not rows:
        return
    try:
        with session.begin_nested():
            session.add_all(rows)
    except IntegrityError:
        ids = [r.image_id for r in rows]
        existing = set(
            session.scalars(
                select(Prediction.image_id).where(
                    Prediction.image_id.in_(ids), Prediction.model_version == version
                )
            )
        )
        log.info("%d images already had a result from a concurrent delivery", len(existing))
        for row in rows:
            if row.image_id not in existing:
                with session.begin_nested():
                    session.add(_copy(row))


def _copy(row: Prediction) -> Prediction:
    fields = (
        "image_id",
        "model_version",
        "probabilities",
        "label",
        "p_abnormal",
        "triage_class",
        "priority",
        "cam_class",
        "cam",
        "cam_h",
        "cam_w",
        "batch_size",
        "inference_ms",
    )
    return Prediction(**{f: getattr(row, f) for f in fields})


def _finish_many(
    session: Session,
    worker: str | None,
    claims: dict[int, int],
    status: str,
    values: dict[int, dict[str, Any]],
) -> set[int]:
    """Make images final where this worker's claim is still the current one; return those.

    One conditional UPDATE per image, sent in one executemany: a worker that was frozen,
    judged dead and woke up later finds its images re-queued, claimed by another worker, or
    final, and changes nothing. Which rows moved is read back in the same transaction: a
    claim (worker name and attempt number) is held by one batch only, so a row final with
    this claim's token was made final by this call.
    """
    if not values:
        return set()
    table = cast(Table, Image.__table__)
    columns = sorted({c for v in values.values() for c in v})
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("k_id"),
            table.c.status == State.PROCESSING,
            table.c.worker.is_not_distinct_from(bindparam("k_worker")),
            table.c.attempts == bindparam("k_attempt"),
        )
        .values({c: bindparam(f"v_{c}") for c in columns})
    )
    params = [
        {
            "k_id": i,
            "k_worker": worker,
            "k_attempt": claims[i],
            **{f"v_{c}": v.get(c) for c in columns},
        }
        for i, v in values.items()
    ]
    session.execute(statement, params)
    rows = session.execute(
        select(table.c.id, table.c.status, table.c.worker, table.c.attempts).where(
            table.c.id.in_(list(values))
        )
    )
    return {
        int(i)
        for i, st, w, attempt in rows
        if st == status and w == worker and attempt == claims[int(i)]
    }


def write_results(
    factory: sessionmaker[Session],
    classifier: Classifier,
    outputs: dict[int, tuple[BatchOutput, int]],
    result: BatchResult,
    worker: str | None,
    claims: dict[int, int],
) -> None:
    """Write results of the images this worker still holds; drop the rest as revoked."""
    batch_ms = result.seconds * 1000.0
    with session_scope(factory) as session:
        ids = [*outputs, *result.failed]
        received = dict(
            session.execute(select(Image.id, Image.received_at).where(Image.id.in_(ids))).all()
        )
        existing = set(
            session.scalars(
                select(Prediction.image_id).where(
                    Prediction.image_id.in_(list(outputs)),
                    Prediction.model_version == classifier.version,
                )
            )
        )
        now = utcnow()
        scored: dict[int, Prediction] = {}
        for image_id, (out, n) in outputs.items():
            row = _prediction_row(classifier, image_id, out, n, batch_ms, result.batch_size)
            if isinstance(row, str):
                result.failed[image_id] = row
            else:
                scored[image_id] = row
        done = {
            i: {
                "status": State.DONE,
                "reason": None,
                "done_at": now,
                "latency_ms": _elapsed_ms(received[i], now) if i in received else None,
            }
            for i in scored
        }
        finished = _finish_many(session, worker, claims, State.DONE, done)
        rows = []
        for image_id, row in scored.items():
            if image_id not in finished:
                result.revoked.append(image_id)
                continue
            if image_id not in existing:
                rows.append(row)
            result.done.append(image_id)
        _insert_predictions(session, rows, classifier.version)
        failed = {
            i: {"status": State.FAILED, "reason": reason, "done_at": now}
            for i, reason in result.failed.items()
            if i in received
        }
        finished = _finish_many(session, worker, claims, State.FAILED, failed)
        for image_id in failed:
            if image_id not in finished:
                del result.failed[image_id]
                result.revoked.append(image_id)
        if result.batch_size:
            session.add(
                Batch(
                    worker=worker,
                    model_version=classifier.version,
                    size=result.batch_size,
                    done=len(result.done),
                    failed=len(result.failed),
                    inference_ms=batch_ms,
                )
            )
        session.flush()
        session.expire_all()  # the conditional UPDATEs bypassed the identity map
        touched = set(session.scalars(select(Image.study_id).where(Image.id.in_(ids))))
        studies = session.scalars(select(Study).where(Study.id.in_(touched))).all()
        refresh_studies(session, studies, classifier.thresholds)
