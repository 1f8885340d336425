"""Results back to the hospital: the SR and CAM captures reach a real Orthanc by C-STORE and
STOW-RS exactly once, through outages and a crash between send and commit.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.cli.outbox import Sender, model_info, send_pass
from pipeline.db import session_scope
from pipeline.models import as_utc, utcnow
from pipeline.results.claims import claim_due, retry_now
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.results.outbox import queue_results
from pipeline.results.payloads import build_payload
from pipeline.results.senders import send_dicom
from pipeline.settings import Settings
from pipeline.tables_results import Destination, OutboxItem, ResultObject
from tests import pacs
from tests.results.support import (
    add_destination,
    dicom_dest,
    dicom_study,
    objects,
    outbox,
    stow_dest,
)

needs_orthanc = pytest.mark.skipif(pacs.missing() is not None, reason=pacs.missing() or "")


def _stored(orthanc: pacs.OrthancServer) -> list[dict[str, Any]]:
    return [i for i in orthanc.instances() if i.get("SOPClassUID") in (SOP_SR, SOP_SC)]


@needs_orthanc
def test_sr_and_capture_arrive_by_cstore_and_stow(
    populated: Any, settings: Settings, tmp_path: Path
) -> None:
    by_store = pacs.OrthancServer(tmp_path / "store", aet="STOREPACS").start()
    by_stow = pacs.OrthancServer(tmp_path / "stow").start()
    try:
        add_destination(populated, settings, dicom_dest(by_store))
        add_destination(populated, settings, stow_dest(by_stow))
        sender = Sender(settings)
        result = sender.once()
        sender.close()
        assert result["sent"] == {"sent": 4}
        study = dicom_study(populated)
        for server in (by_store, by_stow):
            got = _stored(server)
            assert sorted(i["SOPClassUID"] for i in got) == sorted([SOP_SR, SOP_SC])
            assert {i["StudyInstanceUID"] for i in got} == {study.study_uid}
            assert {i["SOPInstanceUID"] for i in got} == {
                o.uid for o in objects(populated) if o.status == "ready"
            }
            assert len({i["SeriesInstanceUID"] for i in got}) == 2
        assert [i.status for i in outbox(populated)] == ["sent"] * 4
    finally:
        by_store.stop()
        by_stow.stop()


@needs_orthanc
def test_pacs_down_retries_then_every_object_arrives_once(
    populated: Any, settings: Settings, database_url: str, orthanc: pacs.OrthancServer
) -> None:
    dest_id = add_destination(populated, settings, dicom_dest(orthanc))
    orthanc.stop()
    sender = Sender(settings)
    try:
        assert sender.once()["sent"] == {"pending": 2}
        items = outbox(populated)
        assert [(i.status, i.attempts) for i in items] == [("pending", 1)] * 2
        assert all("association" in (i.last_error or "") for i in items)
        first_wait = as_utc(items[0].next_attempt_at) - as_utc(items[0].updated_at)
        assert sender.once()["sent"] == {}  # backing off: nothing due yet
        with session_scope(populated) as session:
            retry_now(session, dest_id)
        assert sender.once()["sent"] == {"pending": 2}
        items = outbox(populated)
        assert [i.attempts for i in items] == [2, 2]
        wait = as_utc(items[0].next_attempt_at) - as_utc(items[0].updated_at)
        assert round(first_wait.total_seconds()) == 5 and round(wait.total_seconds()) == 10
        orthanc.start()
        with session_scope(populated) as session:
            retry_now(session, dest_id)
        assert sender.once()["sent"] == {"sent": 2}
        assert sender.once()["sent"] == {}  # sent: never again
    finally:
        sender.close()
    got = _stored(orthanc)
    assert sorted(i["SOPInstanceUID"] for i in got) == sorted(
        o.uid for o in objects(populated) if o.status == "ready"
    )
    with populated() as session:
        dest = session.get(Destination, dest_id)
        assert dest is not None and dest.last_ok_at is not None and dest.last_error


@needs_orthanc
def test_a_crash_between_send_and_commit_resends_the_same_instance(
    populated: Any, settings: Settings, database_url: str, orthanc: pacs.OrthancServer
) -> None:
    add_destination(populated, settings, dicom_dest(orthanc))
    queue_results(populated, model_info(settings))
    with session_scope(populated) as session:
        claimed = claim_due(session)
    assert len(claimed) == 2
    with populated() as session:
        dest = session.scalars(select(Destination)).one()
        session.expunge(dest)
        items = [
            (i.id, build_payload(session, session.get(ResultObject, i.object_id)))
            for i in session.scalars(select(OutboxItem))
        ]
    send_dicom(settings, dest, items, lambda *_: None)  # sent, then the sender "dies"
    assert len(_stored(orthanc)) == 2
    assert [i.status for i in outbox(populated)] == ["sending", "sending"]
    with session_scope(populated) as session:  # its lease lapses
        for item in session.scalars(select(OutboxItem)):
            item.claimed_until = utcnow() - timedelta(seconds=1)
    assert send_pass(populated, settings) == {"sent": 2}
    got = _stored(orthanc)
    assert len(got) == 2  # the same two instances, not four
    assert [i.attempts for i in outbox(populated)] == [2, 2]
