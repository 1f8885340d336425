"""What is owed and where it goes: a second pass, recent and full passes, destination URLs and
the environment's destinations.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.cli.outbox import Sender, model_info
from pipeline.db import session_scope
from pipeline.results.destinations import parse_url, sync_env
from pipeline.results.outbox import queue_results
from pipeline.settings import Settings
from pipeline.tables_results import Destination
from tests.results.support import add_destination, objects, outbox


def test_a_second_pass_owes_nothing_new(
    populated: Any, settings: Settings, database_url: str
) -> None:
    add_destination(populated, settings, parse_url("dicom://PACS@127.0.0.1:1"))
    model = model_info(settings)
    queue_results(populated, model)
    assert queue_results(populated, model) == {"studies": 0, "alerts": 0, "outbox": 0}
    assert len(objects(populated)) == 4 and len(outbox(populated)) == 2


def test_frequent_passes_look_at_recent_studies_and_full_passes_at_all(
    populated: Any, settings: Settings
) -> None:
    """The sender's frequent pass searches the last minutes only; its full pass (at start and
    every few minutes) finds an older study still owed."""
    from datetime import UTC, datetime

    add_destination(populated, settings, parse_url("dicom://PACS@127.0.0.1:1"))
    model = model_info(settings)
    later = datetime.now(UTC) + timedelta(minutes=1)  # every study finished before this
    assert queue_results(populated, model, done_since=later) == {
        "studies": 0,
        "alerts": 0,
        "outbox": 0,
    }
    assert queue_results(populated, model)["studies"] == 3
    sender = Sender(settings)
    try:
        assert sender._done_since("results") is None  # the first pass is a full one
        window = sender._done_since("results")
        assert window is not None
        assert timedelta(minutes=9) < datetime.now(UTC) - window < timedelta(minutes=11)
    finally:
        sender.close()


def test_destination_urls() -> None:
    d = parse_url("dicom://ORTHANC@pacs.example:4242")
    assert (d.kind, d.ae_title, d.host, d.port, d.want_sr, d.want_sc) == (
        "dicom",
        "ORTHANC",
        "pacs.example",
        4242,
        True,
        True,
    )
    w = parse_url("https://pacs.example:8042/dicom-web/#sr")
    assert (w.kind, w.url, w.want_sr, w.want_sc) == (
        "dicomweb",
        "https://pacs.example:8042/dicom-web",
        True,
        False,
    )
    assert parse_url("mllp://ris:2575").port == 2575
    for bad in ("dicom://pacs:104", "ftp://x", "dicom://WAY-TOO-LONG-AE-TITLE@h:1"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_environment_destinations_are_synced(populated: Any, settings: Settings) -> None:
    env = settings.with_(
        pacs_destinations="dicom://A@h:104, https://h/dicom-web",
        pacs_token="tok",
        alert_destinations="mllp://ris:2575",
    )
    with session_scope(populated) as session:
        assert sync_env(session, env) == {"added": 3, "disabled": 0}
    with session_scope(populated) as session:
        rows = {r.name: r for r in session.scalars(select(Destination))}
        assert rows["https://h/dicom-web"].auth == "bearer"
        assert "tok" not in (rows["https://h/dicom-web"].secret or "")  # stored encrypted
        assert sync_env(session, settings.with_(pacs_destinations="dicom://A@h:104")) == {
            "added": 0,
            "disabled": 2,
        }
