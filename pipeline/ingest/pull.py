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

Logs carry counts only: no patient names, ids or UIDs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select

from pipeline.db import session_scope
from pipeline.ingest.intake import Intake
from pipeline.models import Image
from pipeline.settings import ConfigError

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
# C-GET/C-MOVE final statuses that still mean "some sub-operations were done".
WARNING_STATUSES = (0xB000,)
NODE = re.compile(r"^dicom://(?P<aet>[^@/\s]{1,16})@(?P<host>[^:/\s]+):(?P<port>\d{1,5})/?$")
SINCE = re.compile(r"^(?P<n>\d+)(?P<unit>[mhdw])$")


@dataclass(frozen=True)
class DicomNode:
    """A remote DICOM application entity."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"dicom://{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str) -> DicomNode:
    """``dicom://AE_TITLE@host:port`` -> DicomNode, or a ConfigError saying what is wrong."""
    m = NODE.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{text!r} is not a DICOM node: write dicom://AE_TITLE@host:port")
    return DicomNode(m["aet"], m["host"], int(m["port"]))


def parse_since(text: str, now: datetime | None = None) -> date:
    """``30m``, ``12h``, ``2d``, ``1w`` back from now, or a date ``YYYYMMDD``/``YYYY-MM-DD``."""
    now = now or datetime.now(UTC)
    text = text.strip().lower()
    if m := SINCE.match(text):
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m["unit"]]
        return (now - timedelta(**{unit: int(m["n"])})).date()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ConfigError(f"--since {text!r}: write a duration (30m, 12h, 2d, 1w) or a date YYYYMMDD")


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


def _identifier(level: str, **keys: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


class PacsClient:
    """Study Root C-FIND, C-GET and C-MOVE against one node, with our calling AE title."""

    def __init__(self, node: DicomNode, calling_ae: str, timeout_s: float = 30.0) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    def _associate(self, ae: Any, **kwargs: Any) -> Any:
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, **kwargs)
        if not assoc.is_established:
            raise ConnectionError(f"{self.node} refused or did not answer the association")
        return assoc

    def find(self, queries: list[Any]) -> list[list[Any]]:
        """Run C-FINDs on one association; the matches of each query, in order."""
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind as FIND,
        )

        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae)
        try:
            out = []
            for query in queries:
                matches = []
                for status, identifier in assoc.send_c_find(query, FIND):
                    if status is None:
                        raise ConnectionError(f"{self.node} stopped answering a C-FIND")
                    code = int(status.Status)
                    if code in PENDING and identifier is not None:
                        matches.append(identifier)
                    elif code not in PENDING and code != 0x0000:
                        raise ConnectionError(f"{self.node} answered C-FIND with 0x{code:04X}")
                out.append(matches)
            return out
        finally:
            assoc.release()

    def get(self, requests: list[Any], sop_classes: set[str], store: Any) -> tuple[int, int]:
        """C-GET each identifier; ``store(event)`` handles each instance sent back.

        Returns (completed, failed) sub-operations as the PACS counts them.
        """
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelGet as GET,
        )

        from pipeline.ingest.scp import decodable_transfer_syntaxes

        ae = self._ae()
        ae.add_requested_context(GET)
        syntaxes = decodable_transfer_syntaxes()
        # One context per storage class we expect; the association allows 128 in all.
        for uid in sorted(sop_classes)[:127]:
            ae.add_requested_context(uid, syntaxes)
        roles = [build_role(uid, scp_role=True) for uid in sorted(sop_classes)[:127]]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store)])
        try:
            return self._sub_operations(assoc.send_c_get(r, GET) for r in requests)
        finally:
            assoc.release()

    def move(self, requests: list[Any], destination: str) -> tuple[int, int]:
        """C-MOVE each identifier to ``destination`` (an AE the PACS knows)."""
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelMove as MOVE,
        )

        ae = self._ae()
        ae.add_requested_context(MOVE)
        assoc = self._associate(ae)
        try:
            return self._sub_operations(assoc.send_c_move(r, destination, MOVE) for r in requests)
        finally:
            assoc.release()

    def _sub_operations(self, response_streams: Any) -> tuple[int, int]:
        completed = failed = 0
        for responses in response_streams:
            final = None
            for status, _identifier in responses:
                if status is None:
                    raise ConnectionError(f"{self.node} stopped answering a retrieve")
                final = status
            if final is None:
                continue
            code = int(final.Status)
            completed += int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
            failed += int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
            if code not in (0x0000, *WARNING_STATUSES) and not failed:
                raise ConnectionError(f"{self.node} answered the retrieve with 0x{code:04X}")
        return completed, failed


def _study_query(since: date, modalities: tuple[str, ...]) -> Any:
    return _identifier(
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
        _identifier("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="", Modality="")
        for uid in study_uids
    ]
    wanted: list[_Series] = []
    for uid, matches in zip(study_uids, client.find(series_queries), strict=True):
        for s in matches:
            if str(getattr(s, "Modality", "")).upper() in modalities:
                wanted.append(_Series(uid, str(s.SeriesInstanceUID)))
    image_queries = [
        _identifier(
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
                _identifier("SERIES", StudyInstanceUID=s.study_uid, SeriesInstanceUID=s.series_uid)
            )
        else:
            out += [
                _identifier(
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
