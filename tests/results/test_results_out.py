"""Results back to the hospital: the SR and CAM captures are valid DICOM, built the same on
every send, and reach a real Orthanc by C-STORE and STOW-RS exactly once, through outages."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from pipeline.classifier.registry import preprocess_of
from pipeline.cli.outbox import Sender, model_info, send_pass
from pipeline.db import session_scope
from pipeline.imaging.cam_place import place
from pipeline.imaging.render import box_pixels
from pipeline.models import (
    AuditEvent,
    Destination,
    Image,
    OutboxItem,
    Prediction,
    ResultObject,
    Study,
    as_utc,
    utcnow,
)
from pipeline.results.destinations import Spec, apply, parse_url, sync_env
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.results.outbox import NOT_DICOM, claim_due, queue_results, retry_now
from pipeline.results.senders import build_payload, send_dicom
from pipeline.settings import Settings
from tests import pacs

needs_orthanc = pytest.mark.skipif(pacs.missing() is not None, reason=pacs.missing() or "")


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """A test that also asks for ``database_url`` runs on SQLite and on PostgreSQL."""
    if "database_url" in request.fixturenames:
        return settings.with_(database_url=request.getfixturevalue("database_url"))
    return settings


def add_destination(factory: Any, settings: Settings, spec: Spec) -> int:
    with session_scope(factory) as session:
        row = apply(settings, Destination(source="console", enabled=True), spec)
        row.created_at = utcnow() - timedelta(days=1)  # before the studies finished
        session.add(row)
        session.flush()
        return int(row.id)


def dicom_dest(orthanc: pacs.OrthancServer) -> Spec:
    return parse_url(f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")


def stow_dest(orthanc: pacs.OrthancServer) -> Spec:
    spec = parse_url(orthanc.dicomweb_url)
    spec.auth, spec.username, spec.secret = "basic", pacs.USER, pacs.PASSWORD
    return spec


def objects(factory: Any) -> list[ResultObject]:
    with factory() as session:
        return list(session.scalars(select(ResultObject).order_by(ResultObject.id)))


def outbox(factory: Any) -> list[OutboxItem]:
    with factory() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def dicom_study(factory: Any) -> Study:
    with factory() as session:
        return session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()


# --------------------------------------------------------------------------- the objects


def test_sr_and_capture_are_valid_dicom_and_the_same_on_every_build(
    populated: Any, settings: Settings, tmp_path: Path
) -> None:
    import highdicom as hd

    add_destination(populated, settings, parse_url("dicom://PACS@127.0.0.1:1"))
    counts = queue_results(populated, model_info(settings))
    assert counts["studies"] == 3  # the DICOM study and the JPEG and PNG ones
    objs = objects(populated)
    skipped = [o for o in objs if o.status == "skipped"]
    assert len(skipped) == 2 and {o.reason for o in skipped} == {NOT_DICOM}
    ready = [o for o in objs if o.status == "ready"]
    assert sorted(o.kind for o in ready) == ["sc", "sr"]
    assert len(outbox(populated)) == 2  # nothing owed for the skipped ones
    study = dicom_study(populated)
    with populated() as session:
        source = session.scalars(select(Image).where(Image.study_id == study.id)).one()
        payloads = {o.kind: build_payload(session, o) for o in ready}
        again = {o.kind: build_payload(session, o) for o in ready}
    assert payloads == again  # a retry sends byte-for-byte the same instance
    sr, sc = dcmread(io.BytesIO(payloads["sr"])), dcmread(io.BytesIO(payloads["sc"]))
    for ds, sop in ((sr, SOP_SR), (sc, SOP_SC)):
        assert ds.SOPClassUID == sop
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.SeriesInstanceUID != source.series_uid
        assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
            "PID-0001",
            "Test^Patient",
            "ACC-0001",
        )
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert {o.uid for o in ready} == {sr.SOPInstanceUID, sc.SOPInstanceUID}
    # highdicom reads the SR back as a TID 1500 report with our values in it
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    assert report.get_evidence() == [
        (study.study_uid, source.series_uid, source.sop_uid, "1.2.840.10008.5.1.4.1.1.1")
    ]
    assert report.content.get_image_measurement_groups() == []  # every group has a region
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["AI triage: study"]
    # the region is the CAM's strongest cell, on the part of the film the model read
    with populated() as session:
        img = session.get(Image, source.id)
        pred = session.scalars(select(Prediction).where(Prediction.image_id == source.id)).one()
        placed = place(session, img, pred, settings.weights_path)
        method = preprocess_of(session, pred.model_version, settings.weights_path)
    assert method == "resize" and placed.box == (0.0, 1.0, 0.0, 1.0)  # this model: the film
    region = groups[0].roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert (
        region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == source.sop_uid
    )
    r0, r1, c0, c1 = placed.peak
    cols, rows = source.width, source.height
    np.testing.assert_allclose(
        region.value,
        [
            [c0 * cols, r0 * rows],
            [c1 * cols, r0 * rows],
            [c1 * cols, r1 * rows],
            [c0 * cols, r1 * rows],
            [c0 * cols, r0 * rows],
        ],
        atol=1.0,
    )
    b0, b1, a0, a1 = placed.box
    assert b0 - 1e-6 <= r0 < r1 <= b1 + 1e-6 and a0 - 1e-6 <= c0 < c1 <= a1 + 1e-6
    (p_abn,) = [m for m in groups[0].get_measurements() if m.name.meaning == "Abnormal probability"]
    assert p_abn.value == pytest.approx(study.p_abnormal, abs=1e-6)
    evaluations = {e.name.meaning: e.value.meaning for e in groups[0].get_qualitative_evaluations()}
    assert evaluations["Triage class"] == study.triage_class.capitalize()
    assert groups[0].finding_type.meaning == {
        "normal": "Normal",
        "pneumonia": "Pneumonia",
        "covid19": "COVID-19",
    }.get(study.label, study.label)
    texts = {e.value for e in sr.iterall() if e.keyword == "TextValue"}
    assert study.model_version in texts
    assert any(t.startswith(f"policy {study.model_version}/policy-") for t in texts), texts
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[2] == 3

    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.sop_uid
    # the Debian validators: no errors (warnings: our private coding scheme, see README)
    for kind, data in payloads.items():
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(data)
        if shutil.which("dciodvfy"):
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            lines = (out.stdout + out.stderr).splitlines()
            assert not [ln for ln in lines if ln.startswith("Error")], lines
            # Allowed: our private coding scheme, and DICOMDIR-only attributes (Study ID, Study
            # Time) that are empty because the source study had none (Type 2, copied as is).
            warnings = {
                ln
                for ln in lines
                if ln.startswith("Warning") and "needed to build DICOMDIR" not in ln
            }
            assert warnings <= {
                "Warning - Unrecognized defined term <99CXRTRIAGE> for value 1 "
                "of attribute <Coding Scheme Designator>"
            }, warnings
    if shutil.which("dsrdump"):
        out = subprocess.run(
            ["dsrdump", "-v", str(tmp_path / "sr.dcm")], capture_output=True, text=True
        )
        assert out.returncode == 0 and "E:" not in out.stderr and "W:" not in out.stderr
        assert "Imaging Measurement Report" in out.stdout and "Abnormal probability" in out.stdout


def test_the_cam_lies_on_the_crop_the_model_read(
    settings: Settings, study_folder: Path, tmp_path: Path
) -> None:
    """The shipped model reads a thorax crop: its CAM is drawn on that crop of the film, in
    the capture, the study page's layers and the SR's region, never stretched over the film."""
    from PIL import Image as PILImage

    from pipeline.classifier.inference import classify_images
    from pipeline.classifier.network import Classifier
    from pipeline.db import make_engine, make_session_factory
    from pipeline.imaging.decode import Limits
    from pipeline.imaging.render import WHOLE
    from pipeline.ingest.accept import ingest_paths
    from pipeline.migrate import upgrade
    from pipeline.queue.dispatch import redis_client
    from pipeline.users import create_user
    from tests.conftest import PASSWORD, REPO
    from tests.dashboard.test_dashboard import login

    shipped = settings.with_(weights=REPO / "weights" / "cxr-resnet18.pt")
    upgrade(shipped.db_url)
    factory = make_session_factory(make_engine(shipped.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    ids = [i.image_id for i in report.accepted]
    done = classify_images(
        factory, redis_client(shipped.redis_url), Classifier(shipped.weights, "cpu", 1), ids
    )
    assert sorted(done.done) == sorted(ids)
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    add_destination(factory, shipped, parse_url("dicom://PACS@127.0.0.1:1"))
    queue_results(factory, model_info(shipped))
    study = dicom_study(factory)
    with factory() as session:
        source = session.scalars(select(Image).where(Image.study_id == study.id)).one()
        pred = session.scalars(select(Prediction).where(Prediction.image_id == source.id)).one()
        placed = place(session, source, pred, shipped.weights_path)
        assert preprocess_of(session, pred.model_version, shipped.weights_path) == "thorax"
        payloads = {
            o.kind: build_payload(session, o)
            for o in session.scalars(select(ResultObject).where(ResultObject.status == "ready"))
        }
    assert placed.box != WHOLE
    b0, b1, a0, a1 = placed.box
    assert 0.0 <= b0 < b1 <= 1.0 and 0.0 <= a0 < a1 <= 1.0 and (b1 - b0) * (a1 - a0) < 0.95
    # the capture: tinted inside the crop, the grey film outside it (below the label band)
    sc = dcmread(io.BytesIO(payloads["sc"]))
    rgb = sc.pixel_array.astype(int)
    h, w = rgb.shape[:2]
    y0, y1, x0, x1 = box_pixels(placed.box, w, h)
    tinted = (rgb.max(axis=2) - rgb.min(axis=2)) > 12
    outside = np.ones((h, w), dtype=bool)
    outside[y0:y1, x0:x1] = False
    outside[: max(18, h // 24) + 2] = False
    assert not tinted[outside].any() and tinted[y0:y1, x0:x1].mean() > 0.05
    # the study page's CAM layer: transparent outside the crop
    from dashboard import create_app

    client = create_app({"CXR_SETTINGS": shipped, "TESTING": True}).test_client()
    assert login(client).status_code == 302
    layer = client.get(f"/images/{source.id}/cam.png")
    assert layer.status_code == 200
    alpha = np.asarray(PILImage.open(io.BytesIO(layer.get_data())))[..., 3]
    lh, lw = alpha.shape
    ly0, ly1, lx0, lx1 = box_pixels(placed.box, lw, lh)
    inside = np.zeros_like(alpha, dtype=bool)
    inside[ly0:ly1, lx0:lx1] = True
    assert alpha[~inside].max() == 0 and alpha[inside].max() > 200
    # the SR's region: the strongest cell, inside the crop, in the film's pixels
    import highdicom as hd

    (group,) = hd.sr.ComprehensiveSR.from_dataset(
        dcmread(io.BytesIO(payloads["sr"]))
    ).content.get_planar_roi_measurement_groups()
    xs, ys = group.roi.value[:, 0] / source.width, group.roi.value[:, 1] / source.height
    r0, r1, c0, c1 = placed.peak
    np.testing.assert_allclose(
        [ys.min(), ys.max(), xs.min(), xs.max()],
        [r0, r1, c0, c1],
        atol=2.0 / min(source.width, source.height),
    )
    assert b0 - 1e-6 <= r0 and r1 <= b1 + 1e-6 and a0 - 1e-6 <= c0 and c1 <= a1 + 1e-6


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
    from datetime import UTC, datetime, timedelta

    from pipeline.cli.outbox import Sender

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


# --------------------------------------------------------------------------- a real PACS


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    if pacs.missing():
        pytest.skip(pacs.missing() or "")
    server = pacs.OrthancServer(tmp_path / "orthanc").start()
    yield server
    server.stop()


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


# --------------------------------------------------------------------------- critical alerts


class MllpListener:
    """A real MLLP receiver (python-hl7's asyncio server) that records and ACKs messages."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.messages: list[str] = []
        self.port = pacs.free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _serve(self) -> None:
        from hl7.mllp import start_hl7_server

        async def handle(reader: Any, writer: Any) -> None:
            try:
                while not reader.at_eof():
                    message = await reader.readmessage()
                    self.messages.append(str(message))
                    writer.writemessage(message.create_ack())
                    await writer.drain()
            except Exception:  # the client closed
                pass
            finally:
                writer.close()

        async def main() -> None:
            server = await start_hl7_server(handle, "127.0.0.1", self.port)
            self.ready.set()
            async with server:
                await server.serve_forever()

        self.loop.create_task(main())
        self.loop.run_forever()

    def stop(self) -> None:
        def cancel() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        import asyncio

        self.loop.call_soon_threadsafe(cancel)
        self.thread.join(5)


def make_critical(factory: Any) -> Study:
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()
        study.triage_class, study.priority = "critical", 90.0
        session.flush()
        session.expunge(study)
        return study


def test_critical_study_alert_over_mllp_is_acknowledged(
    populated: Any, settings: Settings, database_url: str
) -> None:
    study = make_critical(populated)
    listener = MllpListener()
    try:
        add_destination(populated, settings, parse_url(f"mllp://127.0.0.1:{listener.port}"))
        sender = Sender(settings)
        result = sender.once()
        assert result["queued"]["alerts"] == 1 and result["sent"] == {"sent": 1}
        assert sender.once()["sent"] == {}  # acknowledged: never sent again
        sender.close()
    finally:
        listener.stop()
    assert len(listener.messages) == 1
    segments = {
        line.split("|")[0]: line.split("|") for line in listener.messages[0].split("\r") if line
    }
    assert segments["MSH"][8] == "ORU^R01^ORU_R01"
    assert segments["OBR"][2] == "ACC-0001" and segments["OBR"][5] == "S"
    assert "PID" not in segments and "Test^Patient" not in listener.messages[0]
    assert "critical" in listener.messages[0] and "90.0" in listener.messages[0]
    assert [i.status for i in outbox(populated)] == ["sent"]
    assert study.triage_class == "critical"
    # audited: raised and delivered, by the system (no user), with no patient data
    with populated() as session:
        alert = session.scalars(select(ResultObject).where(ResultObject.kind == "alert")).one()
        events = [
            (e.action, e.target, e.user_id, e.detail or "")
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.action.startswith("alert_")
        ]
    assert [e[:3] for e in events] == [
        ("alert_raised", f"study:{study.id}", None),
        ("alert_sent", f"study:{study.id}", None),
    ]
    assert all(alert.uid in e[3] for e in events)
    assert "mllp destination" in events[1][3] and "attempt 1" in events[1][3]
    assert not [e for e in events if "Test^Patient" in e[3] or "PID-0001" in e[3]]


def test_critical_alert_webhook_is_signed(populated: Any, settings: Settings) -> None:
    import hashlib
    import hmac
    import http.server
    import json
    import threading

    make_critical(populated)
    got: list[tuple[dict[str, str], bytes]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.headers, body))  # case-insensitive, as HTTP headers are
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = settings.with_(
            alert_destinations=f"http://127.0.0.1:{server.server_port}/hook",
            alert_webhook_secret="hook-key",
        )
        with session_scope(populated) as session:
            sync_env(session, env)  # an env destination, backdated to before the study
            for row in session.scalars(select(Destination)):
                row.created_at = utcnow() - timedelta(days=1)
        sender = Sender(env)
        assert sender.once()["sent"] == {"sent": 1}
        sender.close()
    finally:
        server.shutdown()
    headers, body = got[0]
    expected = hmac.new(b"hook-key", body, hashlib.sha256).hexdigest()
    assert headers["X-CXR-Signature"] == f"sha256={expected}"
    doc = json.loads(body)
    assert (doc["accession_number"], doc["triage_class"], doc["priority"]) == (
        "ACC-0001",
        "critical",
        90.0,
    )
    assert "Test^Patient" not in body.decode() and "PID-0001" not in body.decode()
