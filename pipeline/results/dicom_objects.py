"""The AI result as DICOM objects for a PACS: the snapshot they are built from, the CAM captures.

Both the captures and the SR (``pipeline.results.sr``) are built from a ``StudyResult``
snapshot taken when the result was first queued for sending (``pipeline.results.outbox``), with
every UID and date given, so building the same snapshot twice gives the same bytes: a retry
after a crash re-sends the very instance a PACS may already hold, which it treats as the same
object.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.imaging.render import Box, overlay_rgb

MANUFACTURER = "cxr-triage"
LABEL_TEXT = "AI triage - not a diagnosis"
SC_LABEL_TEXT = "AI triage \u2014 not a diagnosis"  # drawn on the image (the em dash as written)
SC_SERIES_NUMBER = 9902
SOP_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SOP_SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image


@dataclass(frozen=True)
class SourceImage:
    """One scored frontal film of the study, as the SR references it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    p_abnormal: float
    label: str
    # The SC of this film: its UID, the film's 8-bit preview and its CAM (float32 h x w).
    sc_uid: str | None = None
    view_position: str | None = None
    # Where the CAM lies on the film and its strongest cell, (r0, r1, c0, c1) fractions
    # (pipeline.classifier.cam_place); None in snapshots made before they were kept: the whole film.
    cam_box: Box | None = None
    cam_peak: Box | None = None
    columns: int | None = None  # the film's size in pixels, for the SR's region
    rows: int | None = None


@dataclass(frozen=True)
class StudyResult:
    """What goes back for one study: the snapshot every built object comes from."""

    study_instance_uid: str
    patient: dict[str, str]  # DICOM keyword -> value (PatientName, PatientID, ...)
    p_abnormal: float
    triage_class: str
    label: str
    priority: float
    model_version: str
    model_name: str
    policy_version: str
    policy_parameters: tuple[str, ...]
    content_datetime: datetime
    sr_uid: str
    images: tuple[SourceImage, ...] = field(default_factory=tuple)

    @property
    def sr_series_uid(self) -> str:
        return series_uid(self.study_instance_uid, "sr", self.model_version)

    @property
    def sc_series_uid(self) -> str:
        return series_uid(self.study_instance_uid, "sc", self.model_version)


def series_uid(study_uid: str, kind: str, model_version: str) -> str:
    """The results series of a study: one per kind and model, the same on every build."""
    return str(generate_uid(entropy_srcs=["cxr-triage-series", study_uid, kind, model_version]))


def fix_times(ds: Dataset, when: datetime) -> None:
    """Dates and times from the snapshot, never the build's clock (same object every build)."""
    for prefix in ("InstanceCreation", "Content", "DateOfSecondaryCapture"):
        date_kw = prefix if prefix.startswith("DateOf") else f"{prefix}Date"
        time_kw = "TimeOfSecondaryCapture" if date_kw.startswith("DateOf") else f"{prefix}Time"
        if date_kw in ds:
            setattr(ds, date_kw, when.strftime("%Y%m%d"))
        if time_kw in ds:
            setattr(ds, time_kw, when.strftime("%H%M%S"))
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def burn_overlay(
    preview: np.ndarray, cam: np.ndarray, alpha: float = 0.45, box: Box | None = None
) -> np.ndarray:
    """The film with its CAM blended in (on ``box`` of it, None: all of it) and the label
    drawn on a black band: RGB uint8."""
    h, w = preview.shape
    rgb = overlay_rgb(preview, cam, alpha, box)
    band = max(18, h // 24)
    img = PILImage.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w, band), fill=(0, 0, 0))
    font = _font(int(band * 0.7))
    draw.text((band // 3, band // 8), SC_LABEL_TEXT, fill=(255, 255, 0), font=font)
    return np.asarray(img, dtype=np.uint8)


def _font(size: int) -> Any:
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def build_sc(result: StudyResult, image: SourceImage, preview: bytes, cam: np.ndarray) -> Dataset:
    """A Secondary Capture of one film with its CAM burned in, in the study's SC series."""
    from highdicom import UID as HdUID  # noqa: N811
    from highdicom.sc import SCImage

    assert image.sc_uid is not None
    grey = np.asarray(PILImage.open(io.BytesIO(preview)).convert("L"), dtype=np.uint8)
    pixels = burn_overlay(grey, cam, box=image.cam_box)
    index = [i.sop_instance_uid for i in result.images].index(image.sop_instance_uid) + 1
    p = result.patient
    sc = SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=result.study_instance_uid,
        series_instance_uid=result.sc_series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=HdUID(image.sc_uid),
        instance_number=index,
        manufacturer=MANUFACTURER,
        patient_id=p.get("PatientID") or None,
        patient_name=p.get("PatientName") or None,
        patient_birth_date=p.get("PatientBirthDate") or None,
        patient_sex=p.get("PatientSex") or None,
        accession_number=p.get("AccessionNumber") or None,
        study_id=p.get("StudyID") or None,
        study_date=p.get("StudyDate") or None,
        study_time=p.get("StudyTime") or None,
        referring_physician_name=p.get("ReferringPhysicianName") or None,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=LABEL_TEXT,
    )
    # The source's orientation is not kept at ingest: left empty (Type 2C allows it) rather
    # than guessed from the view.
    sc.PatientOrientation = []
    sc.BodyPartExamined = "CHEST"  # only chest films are scored
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{LABEL_TEXT}. CAM of model {result.model_version}."
    sc.DerivationDescription = "class activation map blended over the film, label burned in"
    source = Dataset()
    source.ReferencedSOPClassUID = image.sop_class_uid
    source.ReferencedSOPInstanceUID = image.sop_instance_uid
    sc.SourceImageSequence = [source]
    if p.get("PatientAge"):
        sc.PatientAge = p["PatientAge"]
    fix_times(sc, result.content_datetime)
    return sc


def to_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
