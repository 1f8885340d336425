"""Pull from a PACS that cannot route: C-FIND what it has, retrieve what we have not seen.

``cxr-triage pull --from dicom://AE@host:port --since 2d`` asks the PACS (Study Root
Query/Retrieve) for the studies of the window, then for their series in the configured
modalities (``CXR_MODALITIES``, CR and DX by default) and those series' instances. Instances whose
SOP Instance UID is already in the database (``images.dedup_key`` ``sop:<uid>``: accepted,
rejected or skipped alike) are not fetched again. The rest are retrieved

- by **C-GET** (the default): on the same association, the PACS sends each instance back to us
  and our storage handler (the DICOM listener's own) commits it before answering; or
- by **C-MOVE** to our listener (``--move-to AE``): the PACS must know that AE's address, and
  ``cxr-triage dicom-listen`` (or ``run`` with ``CXR_DICOM_PORT``) must be receiving.

Either way every instance goes through the one ingest path (decode, validate, de-duplicate,
commit, send to the workers), so a study pulled twice, or pulled and also routed, is held once.
Under ``cxr-triage run`` with ``CXR_PULL_FROM`` set, a supervised ``pull --every`` child repeats
this every ``CXR_PULL_EVERY_S`` seconds over the last ``CXR_PULL_SINCE``.

The associations themselves (C-FIND, C-GET, C-MOVE) are pipeline.ingest.pacs_client's.
Logs carry counts only: no patient names, ids or UIDs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import select

from pipeline.db import session_scope
from pipeline.ingest.intake import Intake
from pipeline.ingest.pacs_client import PacsClient, identifier
from pipeline.models import Image
from pipeline.settings import DicomNode

log = logging.getLogger(__name__)


@dataclass
class PullReport:
    """What one pull found and did; ``as_json`` is the ``--json`` line."""

    studies: int = 0
    series: int = 0
    instances: int = 0
    already_held: int = 0
    retrieved: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # our ingest outcome per instance
    failed: int = 0  # sub-operations the PACS reports as failed
    errors: list[str] = field(default_factory=list)

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "series": self.series,
            "instances": self.instances,
            "already_held": self.already_held,
            "retrieved": self.retrieved,
            "ingested": dict(sorted(self.statuses.items())),
            "failed": self.failed,
            "errors": self.errors,
        }


@dataclass
class _Series:
    study_uid: str
    series_uid: str
    instances: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> SOP Class UID


def _study_query(since: date, modalities: tuple[str, ...]) -> Any:
    return identifier(
        "STUDY",
        StudyInstanceUID="",
        StudyDate=f"{since:%Y%m%d}-",
        ModalitiesInStudy=list(modalities) if len(modalities) > 1 else modalities[0],
        NumberOfStudyRelatedInstances="",
    )


def held_sop_uids(intake: Intake, uids: list[str]) -> set[str]:
    """The SOP Instance UIDs among ``uids`` the database already has an image row for."""
    held: set[str] = set()
    keys = [f"sop:{u}" for u in uids]
    with session_scope(intake.factory) as session:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            held.update(
                k[4:]
                for k in session.scalars(select(Image.dedup_key).where(Image.dedup_key.in_(chunk)))
            )
    return held


def discover(client: PacsClient, since: date, modalities: tuple[str, ...]) -> list[_Series]:
    """Every series of the window in the wanted modalities, with its instances."""
    (studies,) = client.find([_study_query(since, modalities)])
    study_uids = sorted({str(s.StudyInstanceUID) for s in studies if "StudyInstanceUID" in s})
    series_queries = [
        identifier("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="", Modality="")
        for uid in study_uids
    ]
    wanted: list[_Series] = []
    for uid, matches in zip(study_uids, client.find(series_queries), strict=True):
        for s in matches:
            if str(getattr(s, "Modality", "")).upper() in modalities:
                wanted.append(_Series(uid, str(s.SeriesInstanceUID)))
    image_queries = [
        identifier(
            "IMAGE",
            StudyInstanceUID=s.study_uid,
            SeriesInstanceUID=s.series_uid,
            SOPInstanceUID="",
            SOPClassUID="",
        )
        for s in wanted
    ]
    for series, matches in zip(wanted, client.find(image_queries), strict=True):
        for i in matches:
            if "SOPInstanceUID" in i:
                series.instances[str(i.SOPInstanceUID)] = str(getattr(i, "SOPClassUID", ""))
    return wanted


def _retrieve_requests(series: list[_Series], missing: set[str]) -> list[Any]:
    """A SERIES-level request where the whole series is missing, else one per instance."""
    out = []
    for s in series:
        todo = [u for u in s.instances if u in missing]
        if not todo:
            continue
        if len(todo) == len(s.instances):
            out.append(
                identifier("SERIES", StudyInstanceUID=s.study_uid, SeriesInstanceUID=s.series_uid)
            )
        else:
            out += [
                identifier(
                    "IMAGE",
                    StudyInstanceUID=s.study_uid,
                    SeriesInstanceUID=s.series_uid,
                    SOPInstanceUID=u,
                )
                for u in todo
            ]
    return out


def pull_once(
    intake: Intake,
    node: DicomNode,
    since: date,
    modalities: tuple[str, ...],
    move_to: str | None = None,
    calling_ae: str | None = None,
) -> PullReport:
    """One pass: find, skip what is held, retrieve the rest through the ingest path."""
    from pipeline.ingest.scp import handle_store

    report = PullReport()
    client = PacsClient(node, calling_ae or intake.settings.dicom_ae_title)
    series = discover(client, since, modalities)
    report.studies = len({s.study_uid for s in series})
    report.series = len(series)
    uids = [u for s in series for u in s.instances]
    report.instances = len(uids)
    held = held_sop_uids(intake, uids)
    report.already_held = len(held)
    missing = set(uids) - held
    requests = _retrieve_requests(series, missing)
    if not requests:
        return report
    if move_to:
        completed, report.failed = client.move(requests, move_to)
        after = held_sop_uids(intake, sorted(missing))
        report.retrieved = len(after)
        for _ in after:
            report.count("stored")
        if completed != len(after):
            report.errors.append(f"the PACS moved {completed} instances, {len(after)} arrived")
        return report

    def store(event: Any) -> Any:
        status = handle_store(event, intake, source="pull")
        code = int(status.Status)
        report.retrieved += 1
        report.count("stored" if code == 0 else f"refused 0x{code:04X}")
        return status

    classes = {c for s in series for u, c in s.instances.items() if u in missing and c}
    _completed, report.failed = client.get(requests, classes, store)
    return report
