"""QIDO-RS over the instance store: matching, paging and PS3.18 JSON, without Flask.

Studies, series and instances are answered from the ``instances`` table and the study rows;
every JSON object is a pydicom ``Dataset`` turned into PS3.18 JSON by ``to_json_dict``. Matching
keys may be given by keyword or by tag (``PatientID`` or ``00100020``); ``*`` and ``?`` are
wildcards in text keys; dates take ``YYYYMMDD``, ``A-B``, ``A-`` and ``-B``; UID keys take a
list (comma or backslash separated). The JSON objects themselves are built by
pipeline.store.qido_json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pipeline.models import Instance, Study
from pipeline.store.instances import valid_uid
from pipeline.store.qido_json import (
    FROM_HEADER,
    instance_values,
    series_values,
    study_values,
    to_json,
)

_Rows = TypeVar("_Rows", bound="Select[*tuple[Any, ...]]")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 200
STUDY_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
    *FROM_HEADER,
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
IGNORED = {"limit", "offset", "includefield", "fuzzymatching"}


class BadQuery(ValueError):
    """A query parameter that cannot be answered: 400 with this text."""


def keyword(name: str) -> str:
    """A matching key's keyword, from a keyword or an 8-hex-digit tag."""
    from pydicom.datadict import keyword_for_tag

    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        found = keyword_for_tag(int(name, 16))
        if found:
            return str(found)
    return name


@dataclass
class Query:
    match: dict[str, str]
    limit: int
    offset: int
    include: set[str]


def parse(args: Mapping[str, str], allowed: tuple[str, ...]) -> Query:
    """Matching keys, paging and includefield from a query string."""
    match: dict[str, str] = {}
    include: set[str] = set()
    for name, value in args.items():
        if name in IGNORED:
            continue
        key = keyword(name)
        if key not in allowed:
            raise BadQuery(f"{name} is not a matching key here (use one of {', '.join(allowed)})")
        if value not in ("", "*"):
            match[key] = value
    for field in _all(args, "includefield"):
        include.update("all" if f == "all" else keyword(f) for f in field.split(",") if f)
    try:
        limit = int(args.get("limit", DEFAULT_LIMIT))
        offset = int(args.get("offset", 0))
    except ValueError as exc:
        raise BadQuery("limit and offset must be whole numbers") from exc
    if limit < 1 or offset < 0:
        raise BadQuery("limit must be at least 1 and offset not negative")
    return Query(match, min(limit, MAX_LIMIT), offset, include)


def _all(args: Mapping[str, str], name: str) -> list[str]:
    getlist = getattr(args, "getlist", None)
    return list(getlist(name)) if getlist else ([args[name]] if name in args else [])


def _uids(value: str) -> list[str]:
    uids = [u.strip() for u in value.replace("\\", ",").split(",") if u.strip()]
    if not uids or not all(valid_uid(u) for u in uids):
        raise BadQuery("a UID is digits and dots, at most 64 characters")
    return uids


def _text(column: Any, value: str) -> Any:
    if "*" in value or "?" in value:
        pattern = value.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
        return column.ilike(pattern, escape="\\")
    return column == value


def _dates(column: Any, value: str) -> Any:
    def check(d: str) -> str:
        if d and not (len(d) == 8 and d.isdigit()):
            raise BadQuery(f"{value!r} is not a date or date range (YYYYMMDD, A-B, A-, -B)")
        return d

    if "-" not in value:
        return column == check(value)
    start, end = (check(part) for part in value.split("-", 1))
    clauses = [column.is_not(None)]
    if start:
        clauses.append(column >= start)
    if end:
        clauses.append(column <= end)
    return clauses


def _where(stmt: Select[Any], match: dict[str, str]) -> Select[Any]:
    columns = {
        "PatientID": Study.patient_id,
        "PatientName": Study.patient_name,
        "AccessionNumber": Study.accession_number,
    }
    for key, value in match.items():
        if key == "StudyInstanceUID":
            stmt = stmt.where(Study.study_uid.in_(_uids(value)))
        elif key in columns:
            stmt = stmt.where(_text(columns[key], value))
        elif key == "StudyDate":
            clause = _dates(Study.study_date, value)
            stmt = stmt.where(*clause) if isinstance(clause, list) else stmt.where(clause)
        elif key == "ModalitiesInStudy":
            wanted = [m.strip().upper() for m in value.replace("\\", ",").split(",") if m.strip()]
            stmt = stmt.where(
                select(Instance.id)
                .where(Instance.study_id == Study.id, Instance.modality.in_(wanted))
                .exists()
            )
    return stmt


def studies(session: Session, query: Query, base: str) -> list[dict[str, Any]]:
    """The studies matching, newest first, as PS3.18 JSON."""
    has = select(Instance.id).where(Instance.study_id == Study.id).exists()
    stmt = _where(select(Study).where(has, Study.study_uid.is_not(None)), query.match)
    rows = list(
        session.scalars(
            stmt.order_by(Study.received_at.desc(), Study.id.desc())
            .offset(query.offset)
            .limit(query.limit)
        )
    )
    always = (
        *STUDY_KEYS,
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "RetrieveURL",
    )
    return [to_json(v, query.include, always) for v in study_values(session, rows, base)]


def series(
    session: Session, study_uid: str | None, query: Query, base: str
) -> list[dict[str, Any]]:
    """The series of a study (or of any study, matching), as PS3.18 JSON."""
    stmt = select(
        Instance.study_uid,
        Instance.series_uid,
        func.min(Instance.modality),
        func.min(Instance.series_number),
        func.min(Instance.series_description),
        func.count(Instance.id),
    ).group_by(Instance.study_uid, Instance.series_uid)
    if study_uid is not None:
        stmt = stmt.where(Instance.study_uid == study_uid)
    stmt = _match_instances(
        stmt,
        query.match,
        uids={"SeriesInstanceUID": Instance.series_uid, "StudyInstanceUID": Instance.study_uid},
        numbers={"SeriesNumber": Instance.series_number},
    )
    rows = session.execute(
        stmt.order_by(func.min(Instance.series_number), Instance.series_uid)
        .offset(query.offset)
        .limit(query.limit)
    ).all()
    always = (*SERIES_KEYS, "StudyInstanceUID", "NumberOfSeriesRelatedInstances", "RetrieveURL")
    return [to_json(series_values(row, base), query.include, always) for row in rows]


def _number(value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise BadQuery(f"{value!r} is not a number") from exc


def _match_instances(
    stmt: _Rows, match: dict[str, str], uids: Mapping[str, Any], numbers: Mapping[str, Any]
) -> _Rows:
    """Instance-level matching: UID-list keys, number keys and (upper-cased) Modality."""
    for key, value in match.items():
        if key in uids:
            stmt = stmt.where(uids[key].in_(_uids(value)))
        elif key in numbers:
            stmt = stmt.where(numbers[key] == _number(value))
        elif key == "Modality":
            stmt = stmt.where(Instance.modality == value.upper())
    return stmt


def instances(
    session: Session, study_uid: str, series_uid: str | None, query: Query, base: str
) -> list[dict[str, Any]]:
    """The instances of a study or series, as PS3.18 JSON."""
    stmt = select(Instance).where(Instance.study_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Instance.series_uid == series_uid)
    stmt = _match_instances(
        stmt,
        query.match,
        uids={
            "SOPInstanceUID": Instance.sop_uid,
            "SOPClassUID": Instance.sop_class_uid,
            "SeriesInstanceUID": Instance.series_uid,
        },
        numbers={"InstanceNumber": Instance.instance_number},
    )
    rows = session.scalars(
        stmt.order_by(Instance.series_uid, Instance.instance_number, Instance.id)
        .offset(query.offset)
        .limit(query.limit)
    )
    always = (
        *INSTANCE_KEYS,
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "RetrieveURL",
    )
    return [to_json(instance_values(i, base), query.include, always) for i in rows]
