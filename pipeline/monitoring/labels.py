"""Ground truth imported from the RIS: a CSV of accession number, abnormal, optional finding.

Every row is checked before anything is written; a file with any bad row imports nothing, and
the errors name the row (its line in the file, the header being line 1) and why. Accession
numbers are never echoed back (they identify a patient's examination). A good file is written
in one transaction as reviews with ``source="ris"`` and the importing account as the user;
a row whose study already has exactly that RIS outcome as its current truth is left alone, so
importing the same file twice changes nothing.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Review, Study
from pipeline.triage.reviews import FINDINGS, latest_truths, model_snapshot

TRUE_WORDS = {"1", "yes", "y", "true", "t", "abnormal"}
FALSE_WORDS = {"0", "no", "n", "false", "f", "normal"}
# Finding spellings a RIS export may use -> the stored key.
FINDING_ALIASES = {
    **{key: key for key in FINDINGS},
    **{words.lower().replace(" ", ""): key for key, words in FINDINGS.items()},
    "consolidation": "pneumonia",
    "pneumonia/consolidation": "pneumonia",
    "covid": "covid19",
    "covid-19": "covid19",
    "covid-19pattern": "covid19",
    "mass": "mass_nodule",
    "nodule": "mass_nodule",
    "mass/nodule": "mass_nodule",
    "mass_nodule": "mass_nodule",
}
REQUIRED = ("accession_number", "abnormal")
MAX_ROWS = 1_000_000


class LabelFileError(ValueError):
    """The file as a whole cannot be read (no header, missing column, not text)."""


@dataclass(frozen=True)
class RowError:
    row: int  # line number in the file; the header is line 1
    error: str


@dataclass
class ImportReport:
    rows: int = 0
    imported: int = 0
    unchanged: int = 0
    abnormal: int = 0
    errors: list[RowError] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "rows": self.rows,
            "imported": self.imported,
            "unchanged": self.unchanged,
            "abnormal": self.abnormal,
            "errors": [{"row": e.row, "error": e.error} for e in self.errors],
        }


def parse_abnormal(value: str) -> bool:
    text = value.strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(
        "abnormal must be 1/0, yes/no, true/false or abnormal/normal"
        + (f", not {value.strip()[:20]!r}" if text else "; it is empty")
    )


def parse_finding(value: str | None) -> str | None:
    text = (value or "").strip().lower()
    if not text:
        return None
    key = FINDING_ALIASES.get(text) or FINDING_ALIASES.get(text.replace(" ", ""))
    if key is None:
        raise ValueError(
            f"unknown finding {(value or '').strip()[:40]!r}; use one of " + ", ".join(FINDINGS)
        )
    return key


@dataclass(frozen=True)
class _Row:
    line: int
    accession: str
    abnormal: bool
    finding: str | None


def read_rows(data: bytes) -> tuple[list[_Row], list[RowError]]:
    """The file's rows, parsed, and the errors of those that cannot be (row and why)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"the file is not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        raise LabelFileError(
            "the file is empty; it needs a header: accession_number,abnormal[,finding]"
        )
    names = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise LabelFileError(
            f"the header lacks {', '.join(missing)} (it has: {', '.join(n for n in names if n)})"
        )
    col = {name: names.index(name) for name in (*REQUIRED, "finding") if name in names}
    rows: list[_Row] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(RowError(reader.line_num, f"not readable as CSV: {exc}"))
            break
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(rows) + len(errors) >= MAX_ROWS:
            raise LabelFileError(f"more than {MAX_ROWS} rows; split the file")

        def cell(name: str, cells: list[str] = cells) -> str:
            i = col.get(name)
            return cells[i] if i is not None and i < len(cells) else ""

        accession = cell("accession_number").strip()
        try:
            if not accession:
                raise ValueError("no accession number")
            abnormal = parse_abnormal(cell("abnormal"))
            finding = parse_finding(cell("finding"))
            if finding is not None and not abnormal:
                raise ValueError("a normal outcome cannot name a finding")
            if accession in seen:
                raise ValueError(f"the same accession number as row {seen[accession]}")
        except ValueError as exc:
            errors.append(RowError(line, str(exc)))
            continue
        seen[accession] = line
        rows.append(_Row(line, accession, abnormal, finding))
    return rows, errors


def import_labels(session: Session, data: bytes, user_id: int) -> ImportReport:
    """Check every row, then (only if all are good) add their outcomes; the caller commits.

    Raises LabelFileError for a file that cannot be read at all. With row errors nothing is
    added and the report lists them in file order.
    """
    rows, errors = read_rows(data)
    report = ImportReport(rows=len(rows) + len(errors))
    if not rows and not errors:
        raise LabelFileError("the file has a header but no rows")
    studies: dict[str, list[Study]] = defaultdict(list)
    accessions = sorted({r.accession for r in rows})
    for start in range(0, len(accessions), 500):
        chunk = accessions[start : start + 500]
        for study in session.scalars(select(Study).where(Study.accession_number.in_(chunk))):
            studies[study.accession_number or ""].append(study)
    for r in rows:
        found = studies.get(r.accession, [])
        if not found:
            errors.append(RowError(r.line, "no study has this accession number"))
        elif len(found) > 1:
            ids = ", ".join(str(s.id) for s in sorted(found, key=lambda s: s.id))
            errors.append(
                RowError(
                    r.line,
                    f"this accession number matches {len(found)} studies "
                    f"(ids {ids}); resolve it in the RIS or PACS",
                )
            )
    if errors:
        report.errors = sorted(errors, key=lambda e: e.row)
        return report
    current = latest_truths(session, study_ids=[studies[r.accession][0].id for r in rows])
    for r in rows:
        study = studies[r.accession][0]
        now = current.get(study.id)
        if now is not None and (now.source, now.abnormal, now.finding) == (
            "ris",
            r.abnormal,
            r.finding,
        ):
            report.unchanged += 1
            continue
        snapshot = model_snapshot(study, r.abnormal)
        review = Review(
            study_id=study.id,
            user_id=user_id,
            action="import",
            source="ris",
            abnormal=r.abnormal,
            finding=r.finding,
            **snapshot,
        )
        session.add(review)
        report.imported += 1
        report.abnormal += int(r.abnormal)
    session.flush()
    return report
