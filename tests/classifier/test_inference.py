"""Result writing: idempotent under redelivery and under concurrent deliveries."""

from __future__ import annotations

from sqlalchemy import func, select, update

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.classifier.persist import _copy, _insert_predictions
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Image, Prediction, Study
from pipeline.queue.dispatch import redis_client


def _classified(settings, study_folder):  # type: ignore[no-untyped-def]
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    ids = [i.image_id for i in report.accepted]
    clf = Classifier(settings.weights, "cpu", 1)
    client = redis_client(settings.redis_url)
    classify_images(factory, client, clf, ids)
    return factory, client, clf, ids


def test_redelivery_of_done_images_is_skipped(settings, study_folder) -> None:  # type: ignore[no-untyped-def]
    factory, client, clf, ids = _classified(settings, study_folder)
    again = classify_images(factory, client, clf, ids)
    assert sorted(again.skipped) == sorted(ids) and again.done == []
    # A delivery that got past the claim (status reset) still writes no second prediction.
    with factory() as session:
        session.execute(update(Image).where(Image.id.in_(ids)).values(status="queued"))
        session.commit()
    third = classify_images(factory, client, clf, ids)
    assert sorted(third.done) == sorted(ids)
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == len(ids)


def test_concurrent_insert_conflict_keeps_one_row_and_inserts_the_rest(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    factory, _client, clf, ids = _classified(settings, study_folder)
    with factory() as session:
        rows = list(session.scalars(select(Prediction)))
        copies = [_copy(r) for r in rows]
        # Delete all but the first: a concurrent delivery has written only that one.
        for r in rows[1:]:
            session.delete(r)
        session.commit()
    with factory() as session:
        _insert_predictions(session, copies, clf.version)
        session.commit()
        per_image = dict(
            session.execute(
                select(Prediction.image_id, func.count()).group_by(Prediction.image_id)
            ).all()
        )
    assert per_image == {i: 1 for i in ids}


def test_a_worker_that_wakes_after_its_claims_were_re_sent_writes_nothing(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """Worker A claims a batch and freezes; the reconciler re-sends A's claims (its heartbeat
    stopped). B claims them; A wakes before B writes, then after: A's results are dropped
    both times, B's stand, and each image has one prediction and keeps B's final state."""
    from pipeline.classifier.inference import claim, run_claimed
    from pipeline.service.recovery import rescue_dead_workers

    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    ids = sorted(i.image_id for i in report.accepted if i.status == "queued")
    assert len(ids) == 3
    clf = Classifier(settings.weights, "cpu", 1)
    client = redis_client(settings.redis_url)

    def state() -> dict[int, tuple]:  # type: ignore[type-arg]
        with factory() as session:
            return {
                i.id: (i.status, i.worker, i.attempts, i.done_at, i.latency_ms)
                for i in session.scalars(select(Image).where(Image.id.in_(ids)))
            }

    frozen, _ = claim(factory, ids, "a@h")
    assert frozen == {i: 1 for i in ids}
    # A's heartbeat expired (no key under its name): its claims go back to the queue.
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 3
    taken, _ = claim(factory, ids, "b@h")
    assert taken == {i: 2 for i in ids}
    early = run_claimed(factory, client, clf, frozen, "a@h")  # A wakes while B computes
    assert (early.done, early.failed, sorted(early.revoked)) == ([], {}, ids)
    assert {s[:3] for s in state().values()} == {("processing", "b@h", 2)}
    b = run_claimed(factory, client, clf, taken, "b@h")
    assert sorted(b.done) == ids and b.revoked == []
    finished = state()
    late = run_claimed(factory, client, clf, frozen, "a@h")  # and once more after B's write
    assert (late.done, sorted(late.revoked)) == ([], ids)
    assert state() == finished
    assert {s[:3] for s in finished.values()} == {("done", "b@h", 2)}
    with factory() as session:
        per_image = dict(
            session.execute(
                select(Prediction.image_id, func.count()).group_by(Prediction.image_id)
            ).all()
        )
        studies = set(
            session.scalars(
                select(Study.status).where(Study.id.in_([i.study_id for i in report.accepted]))
            )
        )
    assert per_image == {i: 1 for i in ids}
    assert studies == {"done"}
    client.close()
