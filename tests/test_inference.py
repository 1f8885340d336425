"""Result writing: idempotent under redelivery and under concurrent deliveries."""

from __future__ import annotations

from sqlalchemy import func, select, update

from pipeline.classifier import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging import Limits
from pipeline.inference import _copy, _insert_predictions, classify_images
from pipeline.ingest import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Image, Prediction
from pipeline.queue import redis_client


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
        per_image = dict(session.execute(
            select(Prediction.image_id, func.count()).group_by(Prediction.image_id)).all())  # fmt: skip
    assert per_image == {i: 1 for i in ids}
