"""The AI result as DICOM objects for a PACS: a TID 1500 Comprehensive SR (its groups on the CAM's
strongest cell of each film) and CAM captures.

Both are built from a ``StudyResult`` snapshot taken when the result was first queued for
sending (``pipeline.results.outbox``), with every UID and date given, so building the same snapshot
twice gives the same bytes: a retry after a crash re-sends the very instance a PACS may
already hold, which it treats as the same object.
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
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
# Local concepts have no standard code: a private coding scheme, declared in the dataset's
# Coding Scheme Identification Sequence so any reader can tell whose codes they are.
LOCAL_SCHEME = "99CXRTRIAGE"
SOP_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SOP_SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image

# Findings the model names, coded; anything else is a local code of its own name.
FINDING_CODES = {
    "normal": ("17621005", "SCT", "Normal"),
    "abnormal": ("263654008", "SCT", "Abnormal"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "covid19": ("840539006", "SCT", "COVID-19"),
    "other": ("OTHER", LOCAL_SCHEME, "Other abnormality"),
}


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
    # (pipeline.imaging.cam_place); None in snapshots made before they were kept: the whole film.
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


def _code(value: str, scheme: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _local(value: str, meaning: str) -> Any:
    return _code(value, LOCAL_SCHEME, meaning)


def finding_code(label: str) -> Any:
    """The coded concept of a model's finding label."""
    value, scheme, meaning = FINDING_CODES.get(label, (label.upper()[:16], LOCAL_SCHEME, label))
    return _code(value, scheme, meaning)


def _evidence(result: StudyResult) -> list[Dataset]:
    """Minimal source datasets: the patient and study attributes the SR inherits, and refs."""
    out = []
    for img in result.images:
        ds = Dataset()
        ds.StudyInstanceUID = result.study_instance_uid
        ds.SeriesInstanceUID = img.series_instance_uid
        ds.SOPInstanceUID = img.sop_instance_uid
        ds.SOPClassUID = img.sop_class_uid
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
        ):
            setattr(ds, keyword, result.patient.get(keyword) or None)
        for keyword in ("PatientAge", "IssuerOfPatientID", "StudyDescription"):
            if result.patient.get(keyword):
                setattr(ds, keyword, result.patient[keyword])
        out.append(ds)
    return out


def peak_region(image: SourceImage) -> Any:
    """The CAM's strongest cell on the film as an SR image region (a closed rectangle, in the
    film's pixel coordinates), or None where the snapshot does not say where it lies."""
    from highdicom.sr import GraphicTypeValues, ImageRegion, SourceImageForRegion

    if image.cam_peak is None or not image.columns or not image.rows:
        return None
    r0, r1, c0, c1 = image.cam_peak
    x0, x1 = c0 * image.columns, min(c1 * image.columns, image.columns - 1.0)
    y0, y1 = r0 * image.rows, min(r1 * image.rows, image.rows - 1.0)
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=corners.round(2),
        source_image=SourceImageForRegion(image.sop_class_uid, image.sop_instance_uid),
    )


def _group(
    result: StudyResult,
    tracking: str,
    images: tuple[SourceImage, ...],
    p: float,
    label: str,
    triage_class: str | None,
    region: Any = None,
) -> Any:
    """A measurement group: TID 1410 on ``region`` (an image region) where one is given, so a
    viewer draws it on the film; else TID 1501, referencing the films."""
    from highdicom.sr import (
        AlgorithmIdentification,
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    uid = generate_uid(entropy_srcs=["cxr-triage-tracking", result.sr_uid, tracking])
    measurements = [
        Measurement(
            name=_local("PABN", "Abnormal probability"), value=round(p, 6), unit=codes.UCUM.NoUnits
        )
    ]
    evaluations: list[Any] = []
    if triage_class is not None:
        measurements.append(
            Measurement(
                name=_local("PRIO", "Triage priority score"),
                value=result.priority,
                unit=codes.UCUM.NoUnits,
            )
        )
        evaluations.append(
            QualitativeEvaluation(
                _local("TRIAGE", "Triage class"),
                _local(triage_class.upper(), triage_class.capitalize()),
            )
        )
    common: dict[str, Any] = {
        "tracking_identifier": TrackingIdentifier(uid=uid, identifier=tracking),
        "finding_type": finding_code(label),  # the model's call
        "algorithm_id": AlgorithmIdentification(
            name=result.model_name,
            version=result.model_version,
            parameters=[f"policy {result.policy_version}", *result.policy_parameters],
            manufacturer=MANUFACTURER,
        ),
        "measurements": measurements,
        "qualitative_evaluations": evaluations,
    }
    if region is not None:
        return PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    return MeasurementsAndQualitativeEvaluations(
        source_images=[
            SourceImageForMeasurementGroup(i.sop_class_uid, i.sop_instance_uid) for i in images
        ],
        **common,
    )


def _coding_schemes() -> list[Dataset]:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "cxr-triage local concepts"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return [item]


def _fix_times(ds: Dataset, when: datetime) -> None:
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


def build_sr(result: StudyResult) -> Dataset:
    """The TID 1500 Comprehensive SR of a study's AI result, in a series of its own."""
    from highdicom.sr import (
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes

    device_uid = generate_uid(entropy_srcs=["cxr-triage-device", result.model_version])
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=result.model_name[:64],
        ),
    )
    # The study's group lies on the region of its highest-scoring film, each film's on its
    # own: the strongest cell of the CAM, where the snapshot says where that is.
    top = max(result.images, key=lambda i: i.p_abnormal) if result.images else None
    groups = [
        _group(
            result,
            "AI triage: study",
            result.images,
            result.p_abnormal,
            result.label,
            result.triage_class,
            peak_region(top) if top is not None else None,
        )
    ]
    if len(result.images) > 1:
        for n, img in enumerate(result.images, start=1):
            groups.append(
                _group(
                    result,
                    f"AI triage: image {n}",
                    (img,),
                    img.p_abnormal,
                    img.label,
                    None,
                    peak_region(img),
                )
            )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_code("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=groups,
    )
    sr = ComprehensiveSR(
        evidence=_evidence(result),
        content=report[0],
        series_instance_uid=result.sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result.sr_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=LABEL_TEXT,
        content_date=result.content_datetime.date(),
        content_time=result.content_datetime.time().replace(microsecond=0),
    )
    sr.CodingSchemeIdentificationSequence = _coding_schemes()
    _fix_times(sr, result.content_datetime)
    return sr


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
    _fix_times(sc, result.content_datetime)
    return sc


def to_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
