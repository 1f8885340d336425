"""The site's reviewed studies as training data: ``cxr-triage train --from-db``.

Every scored frontal image of a study whose ground truth is recorded (a radiologist's read or a
RIS import, pipeline.triage.reviews) is written out from its stored preview (the image the model read,
as ingest kept it) under ``OUT/site/``, with a ``labels.csv`` of path, label (normal |
abnormal), patient_id and the finding when one was recorded. Training then splits it by patient
like any other source, so no patient is in both the training and the held-out part.
"""

from __future__ import annotations

import csv
from collections import Counter
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Image, Study
from pipeline.states import State
from pipeline.triage.reviews import latest_truths

SOURCE = "site"


class SiteDataError(ValueError):
    """Too little reviewed data to train on; the message says how much there is."""


def export_reviewed(
    session: Session, out_dir: Path, since: datetime | None = None, minimum: int = 20
) -> tuple[Path, dict[str, int]]:
    """Write the reviewed studies' images and their labels.csv; return its path and counts."""
    truths = latest_truths(session, since=since)
    folder = out_dir / SOURCE
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    counts: Counter[str] = Counter()
    ids = sorted(truths)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        query = (
            select(Image.id, Image.preview, Study.id, Study.patient_id)
            .join(Study, Study.id == Image.study_id)
            .where(
                Image.study_id.in_(chunk), Image.status == State.DONE, Image.preview.is_not(None)
            )
        )
        for image_id, preview, study_id, patient in session.execute(query):
            truth = truths[study_id]
            label = "abnormal" if truth.abnormal else "normal"
            rel = f"{label}/{image_id}.jpg"
            (folder / label).mkdir(exist_ok=True)
            (folder / rel).write_bytes(preview or b"")
            rows.append((rel, label, patient or f"study-{study_id}", truth.finding or ""))
            counts[label] += 1
    if counts["abnormal"] < minimum or counts["normal"] < minimum:
        raise SiteDataError(
            f"{counts['abnormal']} abnormal and {counts['normal']} normal reviewed "
            f"images: at least {minimum} of each are needed to train"
        )
    table = folder / "labels.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "finding"])
        w.writerows(rows)
    return table, dict(counts)
