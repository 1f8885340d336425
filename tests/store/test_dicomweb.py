"""DICOMweb's read side, proved by an independent client (dicomweb-client) over real HTTP.

Films are ingested into the instance store the way every source does it, scored by a real
model, and served by the dashboard on a real port: QIDO-RS finds them by the usual keys,
WADO-RS returns the very bytes received (the 15-bit MONOCHROME1 NEMA chest CR among them when
../shared/data is present), their metadata with bulk data by reference, and their frames in
the stored transfer syntax; the JPEG study comes back as a Secondary Capture of its own study.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from bench.viewer_site import serving
from dashboard import create_app
from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.dispatch import redis_client
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore
from pipeline.users import create_user, issue_token
from tests.conftest import SHARED_DATA, chest_like, dicom_bytes, jpeg_bytes, png_bytes

dicomweb_client = pytest.importorskip("dicomweb_client")
RG1 = SHARED_DATA / "dicom/chest_cr_rg1"
STUDY = "1.2.826.0.1.3680043.8.498.1001"


class Served:
    def __init__(
        self,
        url: str,
        tokens: dict[str, str],
        files: dict[str, Path],
        store: InstanceStore,
        settings: Settings,
    ) -> None:
        self.url, self.tokens, self.files, self.store, self.settings = (
            url,
            tokens,
            files,
            store,
            settings,
        )

    def client(self, role: str = "radiologist") -> Any:
        return dicomweb_client.DICOMwebClient(
            f"{self.url}/dicomweb", headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )

    def get(self, path: str, role: str | None = "radiologist", **headers: str) -> Any:
        if role:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        req = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[Served]:
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "cr": folder / "cr.dcm",
        "jpeg": folder / "chest.jpg",
        "png": folder / "chest.png",
    }
    files["cr"].write_bytes(dicom_bytes(chest_like(seed=5), study_uid=STUDY, bits=12))
    files["jpeg"].write_bytes(jpeg_bytes(chest_like(seed=6)))
    files["png"].write_bytes(png_bytes(chest_like(seed=7)))
    if (RG1 / "RG1_UNCR.dcm").exists():
        files["rg1"] = RG1 / "RG1_UNCR.dcm"
        files["rg1_j2k"] = RG1 / "RG1_J2KR.dcm"
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    store = InstanceStore.of(settings)
    report = ingest_paths(factory, list(files.values()), Limits(), store=store)
    assert [i.status for i in report.items] == ["queued"] * len(files)
    classify_images(
        factory,
        redis_client(settings.redis_url),
        Classifier(settings.weights, "cpu", 1),
        [i.image_id for i in report.items],
    )
    with factory() as session:
        tokens = {
            role: issue_token(
                session,
                create_user(session, role, None if role == "feed" else "pw-123456789", role),
            )
            for role in ("radiologist", "feed")
        }
        session.commit()
    with serving(create_app({"CXR_SETTINGS": settings, "TESTING": True})) as base:
        yield Served(base, tokens, files, store, settings)


def _uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_qido_finds_studies_by_the_usual_keys(served: Served) -> None:
    client = served.client()
    studies = client.search_for_studies()
    uids = {s["0020000D"]["Value"][0] for s in studies}
    assert STUDY in uids
    assert len(studies) == len(served.files) - (1 if "rg1" in served.files else 0)  # RG1 x2
    cr = client.search_for_studies(search_filters={"PatientID": "PID-0001"})
    assert [s["0020000D"]["Value"][0] for s in cr] == [STUDY]
    assert cr[0]["00100010"]["Value"][0]["Alphabetic"] == "Test^Patient"
    assert cr[0]["00080061"]["Value"] == ["CR"]
    assert client.search_for_studies(search_filters={"AccessionNumber": "ACC-0001"})[0]["0020000D"][
        "Value"
    ] == [STUDY]
    assert len(client.search_for_studies(search_filters={"StudyDate": "20261101-20261130"})) == 1
    assert client.search_for_studies(search_filters={"StudyDate": "20270101-"}) == []
    assert client.search_for_studies(search_filters={"PatientName": "Test*"})[0]["0020000D"][
        "Value"
    ] == [STUDY]
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    page = client.search_for_studies(limit=1, offset=1)
    assert len(page) == 1 and page[0] != studies[0]
    status, _, body = served.get("/dicomweb/studies?StudyDate=yesterday")
    assert status == 400 and b"date" in body
    status, _, _ = served.get("/dicomweb/studies?NoSuchKey=1")
    assert status == 400


def test_series_and_instances_include_the_ai_results(served: Served) -> None:
    client = served.client()
    series = client.search_for_series(STUDY)
    by_modality = {s["00080060"]["Value"][0]: s for s in series}
    assert set(by_modality) == {"CR", "OT", "SR"}  # the film, its CAM capture, the SR
    cam = by_modality["OT"]
    assert cam["0008103E"]["Value"][0].startswith("AI triage")
    cam_uid = cam["0020000E"]["Value"][0]
    instances = client.search_for_instances(STUDY, cam_uid)
    assert len(instances) == 1
    ds = client.retrieve_instance(STUDY, cam_uid, instances[0]["00080018"]["Value"][0])
    assert ds.BurnedInAnnotation == "YES" and ds.pixel_array.shape[2] == 3
    _, _, cr_sop = _uids(served.files["cr"].read_bytes())
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == cr_sop
    # made once: a second look adds nothing
    assert len(client.search_for_series(STUDY)) == 3


def test_wado_returns_the_bytes_received(served: Served) -> None:
    client = served.client()
    for key in [k for k in ("cr", "rg1", "rg1_j2k") if k in served.files]:
        original = served.files[key].read_bytes()
        study, series, sop = _uids(original)
        ds = client.retrieve_instance(study, series, sop)
        expected = pydicom.dcmread(io.BytesIO(original))
        assert np.array_equal(ds.pixel_array, expected.pixel_array)
        assert str(ds.file_meta.TransferSyntaxUID) == str(expected.file_meta.TransferSyntaxUID)
        status, headers, body = served.get(
            f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
            Accept='multipart/related; type="application/dicom"',
        )
        assert status == 200 and headers["Content-Type"].startswith("multipart/related")
        assert hashlib.sha256(original).hexdigest() == headers["ETag"].strip('"')
        assert original in body  # unchanged, byte for byte
        again = served.get(
            f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
            **{"If-None-Match": headers["ETag"]},
        )
        assert again[0] == 304
    if "rg1" in served.files:
        rg1 = client.retrieve_instance(*_uids(served.files["rg1"].read_bytes()))
        assert rg1.PhotometricInterpretation == "MONOCHROME1" and rg1.BitsStored == 15
        assert int(rg1.pixel_array.max()) > 255  # the film's bits reach the reader


def test_metadata_refers_to_bulk_data_and_frames_come_as_stored(served: Served) -> None:
    client = served.client()
    original = served.files["cr"].read_bytes()
    study, series, sop = _uids(original)
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert meta["00080018"]["Value"] == [sop]
    assert meta["00020010"]["Value"] == ["1.2.840.10008.1.2.1"]
    assert meta["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/bulk/7FE00010")
    assert len(client.retrieve_series_metadata(study, series)) == 1
    frame = client.retrieve_instance_frames(
        study, series, sop, [1], media_types=(("application/octet-stream", "*"),)
    )
    assert frame[0] == pydicom.dcmread(io.BytesIO(original)).PixelData
    # dicomweb-client sends Host without the port, so the URI names port 80: put it back.
    uri = meta["7FE00010"]["BulkDataURI"].replace("http://127.0.0.1/", served.url + "/")
    bulk = client.retrieve_bulkdata(uri)
    assert bulk[0] == frame[0]
    status, _, body = served.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2"
    )
    assert status == 404 and b"1 frame" in body
    if "rg1_j2k" in served.files:
        j2k = served.files["rg1_j2k"].read_bytes()
        study, series, sop = _uids(j2k)
        stored = client.retrieve_instance_frames(
            study, series, sop, [1], media_types=(("application/octet-stream", "*"),)
        )
        from pydicom.encaps import generate_frames

        ds = pydicom.dcmread(io.BytesIO(j2k))
        assert stored[0].rstrip(b"\0") == next(
            generate_frames(ds.PixelData, number_of_frames=1)
        ).rstrip(b"\0")
        native = client.retrieve_instance_frames(
            study,
            series,
            sop,
            [1],
            media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
        )
        assert (
            np.frombuffer(native[0], "<u2").reshape(ds.Rows, ds.Columns).tolist()
            == ds.pixel_array.tolist()
        )


def test_jpeg_and_png_studies_are_secondary_captures(served: Served) -> None:
    client = served.client()
    studies = client.search_for_studies(search_filters={"ModalitiesInStudy": "OT"})
    assert len(studies) == 2  # the JPEG's and the PNG's own studies
    jpeg = served.files["jpeg"].read_bytes()
    for study in studies:
        uid = study["0020000D"]["Value"][0]
        films = [s for s in client.search_for_series(uid) if s["00200011"]["Value"] == [9900]]
        assert len(films) == 1
        series = films[0]["0020000E"]["Value"][0]
        sop = client.search_for_instances(uid, series)[0]["00080018"]["Value"][0]
        ds = client.retrieve_instance(uid, series, sop)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.StudyInstanceUID == uid
        if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50":  # the JPEG, encapsulated
            from pydicom.encaps import generate_frames

            assert next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\0") == jpeg
        else:  # the PNG, as its pixels
            assert np.array_equal(ds.pixel_array, chest_like(seed=7))
        status, headers, body = served.get(f"/dicomweb/studies/{uid}/series/{series}/thumbnail")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"


def test_access_and_identifiers(served: Served) -> None:
    assert served.get("/dicomweb/studies", role=None)[0] == 401
    assert served.get("/dicomweb/studies", role="feed")[0] == 403
    study, series, sop = _uids(served.files["cr"].read_bytes())
    for bad in ("1.2.abc", "1." + "2" * 70, "..", "1..2", "01.2"):
        assert served.get(f"/dicomweb/studies/{bad}/series")[0] in (400, 404), bad
    assert served.get("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd")[0] in (400, 404)
    assert served.get(f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3")[0] == 404
    assert served.get(f"/dicomweb/studies/{generate_uid()}/metadata")[0] == 404
    status, _, body = served.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/x"
    )
    assert status == 400 and b"1-based" in body


def test_accept_headers_as_viewers_send_them() -> None:
    from pipeline.store.wado import EXPLICIT_LE, NotAcceptable, parse_accept

    ohif = parse_accept("multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert ohif.syntaxes == {"*"} and not ohif.native_ok  # OHIF's, unquoted
    default = parse_accept('multipart/related; type="application/octet-stream"')
    assert default.syntaxes == {EXPLICIT_LE} and default.native_ok
    assert parse_accept(None).native_ok
    jls = parse_accept(
        'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80'
    )
    assert jls.syntaxes == {"1.2.840.10008.1.2.4.80"} and not jls.native_ok
    with pytest.raises(NotAcceptable):
        parse_accept("text/html")
