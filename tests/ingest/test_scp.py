"""The DICOM listener, driven by a real pynetdicom SCU over loopback."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pipeline.db import make_engine, make_session_factory
from pipeline.ingest.intake import Intake
from pipeline.ingest.scp import start_listener
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.queue.dispatch import payload_key, redis_client
from tests.conftest import REPO, SHARED_DATA, chest_like, dicom_bytes, settings_env

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def listener(settings) -> Iterator[tuple[int, object]]:  # type: ignore[no-untyped-def]
    """An in-process SCP (our AE CXRTRIAGE) that only accepts the calling AE MODALITY1."""
    settings = settings.with_(dicom_allowed_aes=("MODALITY1",))
    upgrade(settings.db_url)
    intake = Intake(settings)
    port = _free_port()
    server = start_listener(settings, intake, "127.0.0.1", port)
    yield port, make_session_factory(make_engine(settings.db_url))
    server.shutdown()
    intake.close()


def _associate(port: int, calling: str = "MODALITY1", syntaxes=(ExplicitVRLittleEndian,)):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CR_STORAGE, list(syntaxes))
    ae.add_requested_context(BASIC_TEXT_SR, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def test_echo_and_store_commit_the_study_before_answering(listener, settings) -> None:
    port, factory = listener
    assoc = _associate(port)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        ds = _read(dicom_bytes(chest_like(seed=11), priority="STAT"))
        status = assoc.send_c_store(ds)
        # Success has been answered: the row must already be committed (read it from here).
        assert status.Status == 0x0000
        with factory() as session:
            study = session.scalars(select(Study)).one()
            image = session.scalars(select(Image)).one()
        assert (study.source, study.status, study.requested_priority) == ("dicom", "queued", "STAT")
        assert image.sop_uid == ds.SOPInstanceUID and image.filename == f"{ds.SOPInstanceUID}.dcm"
        # ...and its model input was sent to Redis after the commit.
        assert redis_client(settings.redis_url).exists(payload_key(image.id)) == 1
        # The same instance again: Success, pointing at the same study; nothing new is stored.
        assert assoc.send_c_store(ds).Status == 0x0000
        with factory() as session:
            assert len(session.scalars(select(Image)).all()) == 1
    finally:
        assoc.release()


def test_undecodable_and_non_image_instances_get_failure_statuses(listener) -> None:
    port, factory = listener
    assoc = _associate(port)
    try:
        truncated = _read(dicom_bytes(chest_like(seed=12)))
        truncated.PixelData = truncated.PixelData[:-5000]
        status = assoc.send_c_store(truncated)
        assert status.Status == 0xC000
        assert status.ErrorComment.startswith("pixel data is truncated or corrupt")
        ct = _read(dicom_bytes(modality="CT"))
        status = assoc.send_c_store(ct)
        assert (status.Status, status.ErrorComment) == (
            0xC000,
            "modality CT is not accepted (allowed: CR, DX)",
        )
        report = Dataset()
        report.SOPClassUID, report.SOPInstanceUID = BASIC_TEXT_SR, generate_uid()
        report.StudyInstanceUID, report.Modality = generate_uid(), "SR"
        report.file_meta = FileMetaDataset()
        report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        status = assoc.send_c_store(report)
        assert status.Status == 0x0122
        assert status.ErrorComment.startswith("not an image: SOP class Basic Text SR Storage")
        # Sent again: a duplicate keeps its status, from the code recorded with it, not its words.
        again = assoc.send_c_store(report)
        assert (again.Status, again.ErrorComment) == (status.Status, status.ErrorComment)
    finally:
        assoc.release()
    with factory() as session:
        codes = [i.meta.get("rejection") for i in session.scalars(select(Image).order_by(Image.id))]
    assert codes == ["unreadable", "unreadable", "not_an_image"]
    with factory() as session:
        studies = session.scalars(select(Study).order_by(Study.id)).all()
    assert [(s.source, s.status) for s in studies] == [("dicom", "rejected")] * 3
    assert studies[0].reason.startswith("pixel data is truncated or corrupt: The number of bytes")


def test_a_calling_ae_title_not_allowed_is_refused_at_association(listener) -> None:
    port, factory = listener
    assoc = _associate(port, calling="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    with factory() as session:
        assert session.scalars(select(Study)).all() == []


@pytest.mark.skipif(not (SHARED_DATA / "dicom").is_dir(), reason="../shared/data/dicom absent")
def test_dicom_listen_command_stores_a_real_jpeg2000_chest(settings, tmp_path: Path) -> None:
    """The CLI's listener, a real compressed chest CR negotiated in its own transfer syntax."""
    upgrade(settings.db_url)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "dicom-listen", "--port", str(port)],
        env=settings_env(settings),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        ds = pydicom.dcmread(SHARED_DATA / "dicom" / "chest_cr_rg1" / "RG1_J2KR.dcm")
        deadline = time.monotonic() + 60
        assoc = _associate(port, calling="ANYONE", syntaxes=(ds.file_meta.TransferSyntaxUID,))
        while not assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.3)
            assoc = _associate(port, calling="ANYONE", syntaxes=(ds.file_meta.TransferSyntaxUID,))
        assert assoc.is_established
        assert assoc.accepted_contexts[1].transfer_syntax[0] == ds.file_meta.TransferSyntaxUID
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        factory = make_session_factory(make_engine(settings.db_url))
        with factory() as session:
            image = session.scalars(select(Image)).one()
            assert (image.kind, image.width, image.height) == ("dicom", 1841, 1955)
            assert image.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.90"
            assert image.study.status == "queued" and image.study.source == "dicom"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert "DICOM listener CXRTRIAGE on port" in out
    assert "RG1" not in out  # nothing from the header reaches the log


def test_failure_statuses_come_from_codes_not_words() -> None:
    from pipeline.imaging.decode import RejectedInput
    from pipeline.ingest.intake import failure_status

    assert failure_status("not_an_image") == 0x0122
    assert failure_status("too_large") == 0xA700
    assert failure_status("unreadable") == failure_status(None) == 0xC000
    # A reason that merely reads like another refusal keeps its own code's status.
    assert RejectedInput("not an image, says the sender").code == "unreadable"
    assert RejectedInput("x", "too_large").code == "too_large"
