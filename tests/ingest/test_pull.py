"""``cxr-triage pull``: C-FIND a real PACS (Orthanc), retrieve by C-GET or C-MOVE, ingest once."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory, session_scope
from pipeline.ingest.intake import Intake
from pipeline.ingest.pull import pull_once
from pipeline.ingest.scp import start_listener
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.settings import ConfigError, DicomNode, parse_node, parse_since
from tests import pacs
from tests.conftest import chest_like, dicom_bytes, run_cli

pytestmark = pytest.mark.skipif(pacs.missing() is not None, reason=pacs.missing() or "")
OLD = date(2000, 1, 1)


def instance(
    study_uid: str,
    seed: int,
    modality: str = "CR",
    study_date: str = "20261122",
    series_uid: str | None = None,
) -> bytes:
    """A generated radiograph of this study (its own series unless one is given)."""
    ds = pydicom.dcmread(
        io.BytesIO(dicom_bytes(chest_like(seed=seed), study_uid=study_uid, modality=modality))
    )
    ds.StudyDate = study_date
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[pacs.OrthancServer]:
    server = pacs.OrthancServer(tmp_path / "orthanc").start()
    yield server
    server.stop()


@pytest.fixture
def intake(settings) -> Iterator[Intake]:  # type: ignore[no-untyped-def]
    upgrade(settings.db_url)
    it = Intake(settings)
    yield it
    it.close()


def node_of(server: pacs.OrthancServer) -> DicomNode:
    return DicomNode(server.aet, "127.0.0.1", server.dicom_port)


def held(intake: Intake) -> dict[str, tuple[str, str | None]]:
    """SOP Instance UID -> (study source, study UID) of every image row."""
    with session_scope(intake.factory) as s:
        rows = s.execute(select(Image.sop_uid, Study.source, Study.study_uid).join(Study)).all()
    return {sop: (source, study) for sop, source, study in rows}


def test_nodes_and_windows_parse_or_say_what_is_wrong() -> None:
    assert parse_node("dicom://PACS_1@10.0.0.5:104") == DicomNode("PACS_1", "10.0.0.5", 104)
    for bad in (
        "PACS@host:104",
        "dicom://@host:104",
        "dicom://A@host",
        "dicom://A@host:70000",
        "dicom://SEVENTEENCHARSXXXX@h:1",
    ):
        with pytest.raises(ConfigError, match="dicom://AE_TITLE@host:port"):
            parse_node(bad)
    now = datetime(2026, 12, 3, 1, 0, tzinfo=UTC)
    assert parse_since("2d", now) == date(2026, 12, 1)
    assert parse_since("2h", now) == date(2026, 12, 2)
    assert parse_since("1w", now) == date(2026, 11, 26)
    assert parse_since("20261101") == parse_since("2026-11-01") == date(2026, 11, 1)
    with pytest.raises(ConfigError, match="30m, 12h, 2d, 1w"):
        parse_since("yesterday")


def test_c_get_pulls_what_is_missing_once_in_the_wanted_modalities(
    orthanc: pacs.OrthancServer, intake: Intake
) -> None:
    a, b = generate_uid(), generate_uid()
    series_a = generate_uid()
    files = {
        "a1": instance(a, 1, series_uid=series_a),
        "a2": instance(a, 2, series_uid=series_a),
        "b1": instance(b, 3, modality="DX"),
        "ct": instance(b, 4, modality="CT"),  # another modality of study b: not pulled
    }
    for data in files.values():
        orthanc.upload(data)
    uid = {k: str(pydicom.dcmread(io.BytesIO(v)).SOPInstanceUID) for k, v in files.items()}
    # One instance of study a already came by the normal route (C-STORE to us).
    intake.submit(files["a1"], "routed.dcm", "dicom")

    report = pull_once(intake, node_of(orthanc), OLD, ("CR", "DX"))
    assert (report.studies, report.series, report.instances) == (2, 2, 3)
    assert (report.already_held, report.retrieved, report.failed) == (1, 2, 0)
    assert report.statuses == {"stored": 2}
    rows = held(intake)
    assert set(rows) == {uid["a1"], uid["a2"], uid["b1"]}
    # The pulled instance joins the study that came by C-STORE: one study, its first source.
    assert rows[uid["a1"]] == rows[uid["a2"]] == ("dicom", a)
    assert rows[uid["b1"]] == ("pull", b)

    again = pull_once(intake, node_of(orthanc), OLD, ("CR", "DX"))
    assert (again.instances, again.already_held, again.retrieved) == (3, 3, 0)
    with session_scope(intake.factory) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 3
        assert s.scalar(select(func.count()).select_from(Study)) == 2


def test_the_window_selects_by_study_date(orthanc: pacs.OrthancServer, intake: Intake) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    recent, old = generate_uid(), generate_uid()
    orthanc.upload(instance(recent, 5, study_date=today))
    orthanc.upload(instance(old, 6, study_date="20240105"))
    report = pull_once(intake, node_of(orthanc), parse_since("2d"), ("CR", "DX"))
    assert (report.studies, report.retrieved) == (1, 1)
    assert {study for _, study in held(intake).values()} == {recent}


def test_c_move_sends_to_our_listener_and_ingests_once(
    orthanc: pacs.OrthancServer, intake: Intake, settings
) -> None:  # type: ignore[no-untyped-def]
    port = pacs.free_port()
    server = start_listener(settings, intake, "127.0.0.1", port)
    try:
        orthanc.add_modality("cxr", settings.dicom_ae_title, "127.0.0.1", port)
        study = generate_uid()
        for seed in (7, 8):
            orthanc.upload(instance(study, seed))
        report = pull_once(
            intake, node_of(orthanc), OLD, ("CR", "DX"), move_to=settings.dicom_ae_title
        )
        assert (report.instances, report.retrieved, report.failed, report.errors) == (2, 2, 0, [])
        assert [s for s, _ in held(intake).values()] == ["dicom", "dicom"]
        again = pull_once(
            intake, node_of(orthanc), OLD, ("CR", "DX"), move_to=settings.dicom_ae_title
        )
        assert (again.already_held, again.retrieved) == (2, 0)
    finally:
        server.shutdown()


def test_pulled_studies_are_classified_by_a_real_worker(
    orthanc: pacs.OrthancServer, intake: Intake, settings, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    study = generate_uid()
    orthanc.upload(instance(study, 9))
    worker_factory(settings)
    report = pull_once(intake, node_of(orthanc), OLD, ("CR", "DX"))
    assert report.retrieved == 1
    factory = make_session_factory(make_engine(settings.db_url))
    deadline = time.monotonic() + 90
    status = None
    while time.monotonic() < deadline:
        with session_scope(factory) as s:
            status = s.scalar(select(Study.status).where(Study.study_uid == study))
        if status == "done":
            break
        time.sleep(0.3)
    assert status == "done"


def test_cli_json_is_one_line_and_a_dead_pacs_is_a_clear_error(
    orthanc: pacs.OrthancServer, settings
) -> None:  # type: ignore[no-untyped-def]
    orthanc.upload(instance(generate_uid(), 10))
    node = f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    out = run_cli(["pull", "--from", node, "--since", "20000101", "--json"], settings)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert (doc["studies"], doc["instances"], doc["retrieved"]) == (1, 1, 1)
    assert doc["ingested"] == {"stored": 1}

    orthanc.stop()
    out = run_cli(["pull", "--from", node, "--since", "2d", "--json"], settings)
    assert out.returncode == 2
    assert len(out.stdout.splitlines()) == 1
    assert "refused or did not answer" in json.loads(out.stdout)["error"]
    bad = run_cli(["pull", "--from", "pacs:104"], settings)
    assert bad.returncode != 0 and "dicom://AE_TITLE@host:port" in bad.stderr


def test_pull_settings_are_checked_and_run_supervises_a_pull_child() -> None:
    from pipeline.cli.sources import source_children
    from pipeline.settings import Settings

    assert [n for n, _ in source_children(Settings())] == []
    s = Settings.from_env(
        {"CXR_PULL_FROM": "dicom://PACS@127.0.0.1:4242", "CXR_PULL_EVERY_S": "60"}
    )
    ((name, command),) = source_children(s)
    assert name == "pull" and command[-3:] == ["pull", "--every", "60"]
    with pytest.raises(ConfigError, match="dicom://AE_TITLE@host:port"):
        Settings.from_env({"CXR_PULL_FROM": "pacs:4242"})
    with pytest.raises(ConfigError, match="at least 10 seconds"):
        Settings.from_env({"CXR_PULL_FROM": "dicom://PACS@h:4242", "CXR_PULL_EVERY_S": "1"})


def test_run_with_cxr_pull_from_pulls_and_classifies(
    orthanc: pacs.OrthancServer, tmp_path: Path, weights_file
) -> None:  # type: ignore[no-untyped-def]
    """`run` with CXR_PULL_FROM: its supervised pull child fetches the PACS's new study, once."""
    from pipeline.settings import Settings
    from tests.pacs import free_port
    from tests.service.processes import start_run, wait_for, wait_serving

    study = generate_uid()
    orthanc.upload(instance(study, 11, study_date=datetime.now(UTC).strftime("%Y%m%d")))
    settings = Settings(
        data_dir=tmp_path / "data",
        weights=weights_file,
        port=free_port(),
        pull_from=f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        pull_every_s=10,
    )
    log_path = tmp_path / "run.log"
    run = start_run(settings, log_path)
    try:
        wait_serving(settings, run, log_path)
        factory = make_session_factory(make_engine(settings.db_url))

        def status() -> str | None:
            with session_scope(factory) as s:
                return s.scalar(select(Study.status).where(Study.study_uid == study))

        wait_for(lambda: status() == "done", 120, "the pulled study to be classified")
        time.sleep(11)  # one more pull pass: it must find the study held
        with session_scope(factory) as s:
            assert s.scalar(select(func.count()).select_from(Image)) == 1
            assert s.scalar(select(Study.source).where(Study.study_uid == study)) == "pull"
    finally:
        run.terminate()
        run.wait(60)
