"""Classify a batch of queued images: claim, forward once, write results idempotently."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.classifier.network import BatchOutput, Classifier
from pipeline.classifier.persist import BatchResult, write_results
from pipeline.db import session_scope
from pipeline.imaging import decode as imaging
from pipeline.models import FINAL_STATES, Image, Study, utcnow
from pipeline.profiling import STAGES
from pipeline.queue.dispatch import delete_payloads, get_payloads
from pipeline.states import State
from pipeline.tables_registry import ShadowPrediction

log = logging.getLogger(__name__)


def claim(
    factory: sessionmaker[Session], image_ids: list[int], worker: str | None = None
) -> tuple[dict[int, int], list[int]]:
    """Mark unfinished images processing by worker; return ({claimed id: attempt}, final ids).

    Each claim is a conditional UPDATE (never of a final image) that counts the attempt; the
    attempt number, with the worker's name, is the claim's token: only the holder of the
    current claim may write the image's result (``pipeline.classifier.persist``).
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
        write_results(factory, classifier, outputs, result, worker, claims)
    if shadow is not None and result.done:
        done = [i for i in ids if i in set(result.done)]
        _score_shadow(factory, shadow, done, np.stack([inputs[i] for i in done]))
    with STAGES.time("cleanup", len(claimed)):
        delete_payloads(redis_client, [*result.done, *result.failed])
    return result
