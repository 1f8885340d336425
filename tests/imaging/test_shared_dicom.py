"""Every real DICOM file in ../shared/data/dicom reaches the outcome its manifest implies.

The whole folder goes through ``cxr-triage ingest --wait`` with a real Celery worker. A file
the manifest says decodes (``ok ...``) must end ``done`` or ``skipped`` with a stored preview;
one that does not decode must be ``rejected`` with its own specific reason. Decoded frontal
chests must pass the polarity check: on the stored preview the mediastinal strip is brighter
than both lung fields (``chest_contrast`` > 20 grey levels; conventional films measure 40-130).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.db import make_engine, make_session_factory
from pipeline.imaging import decode as imaging
from pipeline.imaging.display import chest_contrast
from pipeline.models import Image
from tests.conftest import SHARED_DATA, run_cli

DICOM_DIR = SHARED_DATA / "dicom"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"{DICOM_DIR} absent (CI has it)"),
]
# The specific reason each undecodable file must get (start of the recorded reason).
REJECTED = {
    "cr_rg2_hip/RG2_JPLY_bad_header.dcm": "the JPEG Extended (Process 2 and 4) pixel data "
    "cannot be decoded",
    "malformed/ExplVR_LitEndNoMeta.dcm": "not an image: SOP class RT Ion Plan Storage",
    "malformed/MR_truncated.dcm": "pixel data is truncated or corrupt: The number of bytes",
    "malformed/badVR.dcm": "not an image: SOP class RT Dose Storage",
    "malformed/no_meta.dcm": "not a DICOM file: no DICM header",
    "tiny_cr/chrJapMulti.dcm": "no pixel data: the CR header arrived without its image",
}
# Decodable files the model must not score, and why.
SKIPPED = {
    "tiny_cr/CR_cspine_16x16_6154.dcm": "lateral view (LL)",
    **{
        f"cr_rg2_hip/RG2_{ts}.dcm": "body part HIP" for ts in ("J2KR", "JLSL", "JPLL", "RLE", "UNC")
    },
}
# Decodable frontal chest radiographs: the polarity check applies.
CHESTS = {
    "chest_cr_rg1/RG1_J2KR.dcm",
    "chest_cr_rg1/RG1_UNCR.dcm",
    "chest_dx_966/966_fixed.dcm",
    "chest_dx_nih/nih_cxr14_dx_sc_8bit.dcm",
    "dx_misc/JPEG2KLossless_1s_1f_u_16_16.dcm",
}


def _manifest() -> dict[str, dict[str, str]]:
    with open(DICOM_DIR / "manifest.csv", newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def test_every_shared_dicom_file_reaches_its_manifest_outcome(settings, worker_factory) -> None:
    manifest = _manifest()
    assert set(manifest) == {str(p.relative_to(DICOM_DIR)) for p in DICOM_DIR.rglob("*.dcm")}
    # OT (LUT test images) and MR accepted here so that those files meet their decoder.
    settings = settings.with_(modalities=("CR", "DX", "OT", "MR"))
    assert run_cli(["db", "upgrade"], settings).returncode == 0
    worker = worker_factory(settings)
    proc = run_cli(["ingest", str(DICOM_DIR), "--wait", "--json", "--timeout", "180"], settings)
    assert proc.returncode == 0, proc.stderr[-3000:] + worker.output()[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["duplicates"] == 0 and doc["failed"] == 0

    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        images = {img.filename: img for img in session.scalars(select(Image))}
        outcomes = {}
        for rel, row in manifest.items():
            image = images[Path(rel).name]
            outcomes[rel] = (image.status, image.reason)
            decodes = row["decode_with_pydicom3_pylibjpeg"].startswith("ok")
            if not decodes:
                assert image.status == "rejected", rel
                assert image.reason.startswith(REJECTED[rel]), (rel, image.reason)
                assert "\n" not in image.reason
                continue
            assert image.preview is not None, rel
            if rel in SKIPPED:
                assert image.status == "skipped" and image.reason.startswith(SKIPPED[rel]), rel
            else:
                assert image.status == "done" and image.predictions, (rel, image.status)
            if rel in CHESTS:
                preview = imaging.decode_preview(image.preview)
                assert chest_contrast(preview) > 20, (rel, chest_contrast(preview))
            # Only the file whose header contradicts its pixels needed the guards.
            guarded = "DisplayPolarityInverted" in image.meta
            assert guarded == (rel == "dx_misc/JPEG2KLossless_1s_1f_u_16_16.dcm"), rel
    assert sum(1 for s, _ in outcomes.values() if s == "done") == len(manifest) - len(
        REJECTED
    ) - len(SKIPPED)


def test_default_modalities_reject_non_radiographs_with_the_modality_reason() -> None:
    for rel, modality in (("luts/vlut_04.dcm", "OT"), ("malformed/MR_truncated.dcm", "MR")):
        with pytest.raises(imaging.RejectedInput) as exc:
            imaging.decode_bytes((DICOM_DIR / rel).read_bytes(), rel)
        assert str(exc.value) == f"modality {modality} is not accepted (allowed: CR, DX)"


def test_the_same_image_decodes_identically_in_every_transfer_syntax() -> None:
    """RG2 (10-bit CR) in uncompressed, RLE, JPEG lossless, JPEG-LS and JPEG 2000."""
    decoded = {
        ts: imaging.decode_bytes((DICOM_DIR / f"cr_rg2_hip/RG2_{ts}.dcm").read_bytes(), ts).pixels
        for ts in ("UNC", "RLE", "JPLL", "JLSL", "J2KR")
    }
    reference = decoded.pop("UNC")
    for ts, pixels in decoded.items():
        assert (pixels == reference).all(), ts
