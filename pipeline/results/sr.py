"""The TID 1500 Comprehensive SR of a study's AI result: its groups on the CAM's strongest cell
of each film, built from the same snapshot as the captures (``pipeline.results.dicom_objects``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.results.dicom_objects import (
    LABEL_TEXT,
    MANUFACTURER,
    SourceImage,
    StudyResult,
    fix_times,
)

SR_SERIES_NUMBER = 9901
# Local concepts have no standard code: a private coding scheme, declared in the dataset's
# Coding Scheme Identification Sequence so any reader can tell whose codes they are.
LOCAL_SCHEME = "99CXRTRIAGE"

# Findings the model names, coded; anything else is a local code of its own name.
FINDING_CODES = {
    "normal": ("17621005", "SCT", "Normal"),
    "abnormal": ("263654008", "SCT", "Abnormal"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "covid19": ("840539006", "SCT", "COVID-19"),
    "other": ("OTHER", LOCAL_SCHEME, "Other abnormality"),
}


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
    fix_times(sr, result.content_datetime)
    return sr
