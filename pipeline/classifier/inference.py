"""Classify a batch of queued images: claim, forward once, write results idempotently."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.classifier.network import BatchOutput, Classifier
from pipeline.db import session_scope
from pipeline.imaging import decode as imaging
from pipeline.models import FINAL_STATES, Batch, Image, Prediction, Study, as_utc, utcnow
from pipeline.queue.dispatch import delete_payloads, get_payloads
from pipeline.service.profiling import STAGES
from pipeline.states import State
from pipeline.triage import score as triage
from pipeline.triage.studies import refresh_studies

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # already final: a redelivery
    # Computed, but the claim was taken away meanwhile (the worker was judged dead or hung and
    # its images re-sent, or another delivery claimed them): the result is dropped, unwritten.
    revoked: list[int] = field(default_factory=list)
    batch_size: int = 0
    seconds: float = 0.0


def claim(
    factory: sessionmaker[Session], image_ids: list[int], worker: str | None = None
) -> tuple[dict[int, int], list[int]]:
    """Mark unfinished images processing by worker; return ({claimed id: attempt}, final ids).

    Each claim is a conditional UPDATE (never of a final image) that counts the attempt; the
    attempt number, with the worker's name, is the claim's token: only the holder of the
    current claim may write the image's result (``_write_results``).
    """
    claimed: dict[int, int] = {}
    with session_scope(factory) as session:
        final = list(
            session.scalars(
                select(Image.id).where(Image.id.in_(image_ids), Image.status.in_(FINAL_STATES))
            )
        )
        rows = session.execute(
            update(Image)
            .where(Image.id.in_(image_ids), Image.status.not_in(FINAL_STATES))
            .values(
                status=State.PROCESSING,
                started_at=utcnow(),
                worker=worker,
                attempts=func.coalesce(Image.attempts, 0) + 1,
            )
            .returning(Image.id, Image.attempts, Image.study_id)
            .execution_options(synchronize_session=False)
        ).all()
        claimed = {int(image_id): int(attempt) for image_id, attempt, _ in rows}
        touched = {study_id for _, _, study_id in rows}
        if touched:
            session.execute(
                update(Study)
                .where(Study.id.in_(touched), Study.status.in_((State.RECEIVED, State.QUEUED)))
                .values(status=State.PROCESSING)
                .execution_options(synchronize_session=False)
            )
    return claimed, final


def load_inputs(
    factory: sessionmaker[Session],
    redis_client: Any,
    ids: list[int],
    size: int,
    preprocess: str = "resize",
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Model inputs from Redis, rebuilt from the stored preview where Redis lost them.

    Returns (inputs, failures): an image whose stored preview cannot be decoded fails alone.
    """
    arrays = dict(zip(ids, get_payloads(redis_client, ids, size), strict=True))
    missing = [i for i, a in arrays.items() if a is None]
    failures: dict[int, str] = {}
    if missing:
        with session_scope(factory) as session:
            rows = session.execute(select(Image.id, Image.preview).where(Image.id.in_(missing)))
            for image_id, preview in rows:
                if preview is None:
                    continue
                try:
                    arrays[image_id] = imaging.model_input(preview, size, preprocess)
                except Exception as exc:
                    failures[image_id] = f"stored image cannot be decoded ({type(exc).__name__})"
    inputs = {i: a for i, a in arrays.items() if a is not None}
    for image_id in ids:
        if image_id not in inputs and image_id not in failures:
            failures[image_id] = "image data lost: neither the queue nor the database has it"
    return inputs, failures


def _predict_isolating_poison(
    classifier: Classifier, ids: list[int], batch: np.ndarray
) -> tuple[dict[int, tuple[BatchOutput, int]], dict[int, str]]:
    """Run the batch; if the whole batch raises, retry one by one so one bad item fails alone."""
    try:
        out = classifier.predict(batch)
        return {i: (out, n) for n, i in enumerate(ids)}, {}
    except Exception:
        log.exception("batch of %d failed; retrying items one by one", len(ids))
    results, failures = {}, {}
    for n, image_id in enumerate(ids):
        try:
            results[image_id] = (classifier.predict(batch[n : n + 1]), 0)
        except Exception as exc:
            failures[image_id] = f"model error: {type(exc).__name__}: {exc}"[:500]
    return results, failures


def classify_images(
    factory: sessionmaker[Session],
    redis_client: Any,
    classifier: Classifier,
    image_ids: list[int],
    worker: str | None = None,
    shadow: Classifier | None = None,
) -> BatchResult:
    """Classify the given images in one forward pass and persist predictions, CAMs, priorities.

    With a ``shadow`` model (pipeline.classifier.registry), the images done are scored by it too, into
    ``shadow_predictions`` alone: nothing the worklist reads changes.
    """
    with STAGES.time("claim", len(image_ids)):
        claims, skipped = claim(factory, sorted(set(image_ids)), worker)
    result = run_claimed(factory, redis_client, classifier, claims, worker, shadow)
    result.skipped = skipped
    return result


def _score_shadow(
    factory: sessionmaker[Session], shadow: Classifier, ids: list[int], batch: np.ndarray
) -> None:
    """The shadow model's p_abnormal for images already done (a failure only logs)."""
    from pipeline.models import ShadowPrediction

    try:
        out = shadow.predict(batch)
        normal = shadow.classes.index("normal")
        with session_scope(factory) as session:
            have = set(
                session.scalars(
                    select(ShadowPrediction.image_id).where(
                        ShadowPrediction.image_id.in_(ids),
                        ShadowPrediction.model_version == shadow.version,
                    )
                )
            )
            session.add_all(
                ShadowPrediction(
                    image_id=i,
                    model_version=shadow.version,
                    p_abnormal=float(1.0 - out.probabilities[k][normal]),
                )
                for k, i in enumerate(ids)
                if i not in have
            )
    except Exception:  # the shadow must never cost a live result
        log.exception("shadow model %s failed on a batch of %d", shadow.version, len(ids))


def run_claimed(
    factory: sessionmaker[Session],
    redis_client: Any,
    classifier: Classifier,
    claims: dict[int, int],
    worker: str | None = None,
    shadow: Classifier | None = None,
) -> BatchResult:
    """The forward pass and the writes of claimed images ({image id: attempt} from ``claim``).

    Results are written only for images whose claim is still this worker's when the batch
    ends; the others come back in ``revoked``.
    """
    result = BatchResult()
    if not claims:
        return result
    claimed = sorted(claims)
    with STAGES.time("load", len(claimed)):
        inputs, result.failed = load_inputs(
            factory, redis_client, claimed, classifier.input_size, classifier.preprocess
        )
    ids = [i for i in claimed if i in inputs]
    started = time.perf_counter()
    outputs: dict[int, tuple[BatchOutput, int]] = {}
    if ids:
        batch = np.stack([inputs[i] for i in ids])
        outputs, failures = _predict_isolating_poison(classifier, ids, batch)
        result.failed.update(failures)
    result.seconds = time.perf_counter() - started
    result.batch_size = len(ids)
    with STAGES.time("write", len(claimed)):
        _write_results(factory, classifier, outputs, result, worker, claims)
    if shadow is not None and result.done:
        done = [i for i in ids if i in set(result.done)]
        _score_shadow(factory, shadow, done, np.stack([inputs[i] for i in done]))
    with STAGES.time("cleanup", len(claimed)):
        delete_payloads(redis_client, [*result.done, *result.failed])
    return result


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


def _write_results(
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
