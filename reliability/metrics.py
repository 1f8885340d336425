"""What the harness counts, defined once.

- **sent**: files a scenario handed to an ingest path (CLI ingest, HTTP API, DICOM C-STORE).
- **done / rejected**: of those, images that ended ``done`` / ``rejected`` (``skipped`` and
  ``failed`` are final too and counted in ``final``).
- **lost**: sent files that never became an image row (the sender gave up), plus images that are
  not in a final state (done, rejected, failed, skipped) at the recovery deadline.
- **duplicated**: images with more than one prediction for the same model version (the unique
  constraint should make this impossible; counted anyway, by query).
- **recomputed**: redundant batch work during the scenario: images the workers reported done
  in committed batches minus predictions written (an image computed twice counts once here).
- **recover_s**: seconds from the fault (kill, cut, restart) to every sent study being final.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import FINAL_STATES, Batch, Image, Prediction


@dataclass
class Row:
    """One line of the reliability table."""

    scenario: str
    profile: str
    sent: int = 0
    done: int = 0
    rejected: int = 0
    lost: int = 0
    duplicated: int = 0
    recomputed: int = 0
    recover_s: float | None = None
    note: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.lost == 0 and self.duplicated == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "profile": self.profile,
            "sent": self.sent,
            "done": self.done,
            "rejected": self.rejected,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "recomputed": self.recomputed,
            "recover_s": None if self.recover_s is None else round(self.recover_s, 1),
            "ok": self.ok,
            "note": self.note,
            "failures": self.failures,
        }


def work_counters(factory: sessionmaker[Session]) -> tuple[int, int]:
    """(images reported done by committed batches, predictions written), for deltas."""
    with factory() as session:
        batch_done = session.scalar(select(func.coalesce(func.sum(Batch.done), 0))) or 0
        predictions = session.scalar(select(func.count(Prediction.id))) or 0
    return int(batch_done), int(predictions)


def open_count(factory: sessionmaker[Session], image_ids: list[int]) -> int:
    """How many of these images are not final yet."""
    with factory() as session:
        return int(
            session.scalar(
                select(func.count(Image.id)).where(
                    Image.id.in_(image_ids), Image.status.not_in(FINAL_STATES)
                )
            )
            or 0
        )


def wait_final(
    factory: sessionmaker[Session], image_ids: list[int], timeout: float, poll_s: float = 0.25
) -> bool:
    """Poll until every image is final (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if open_count(factory, image_ids) == 0:
                return True
        except Exception:  # the database may be the thing that is down
            pass
        time.sleep(poll_s)
    return False


def fill(
    row: Row,
    factory: sessionmaker[Session],
    image_ids: list[int],
    sent: int,
    before: tuple[int, int],
) -> Row:
    """Count outcomes of a scenario's images into its row."""
    with factory() as session:
        statuses = dict(
            session.execute(select(Image.id, Image.status).where(Image.id.in_(image_ids))).all()
        )
        doubled = session.scalar(
            select(func.count()).select_from(
                select(Prediction.image_id)
                .where(Prediction.image_id.in_(image_ids))
                .group_by(Prediction.image_id, Prediction.model_version)
                .having(func.count(Prediction.id) > 1)
                .subquery()
            )
        )
    after = work_counters(factory)
    row.sent = sent
    row.done = sum(1 for s in statuses.values() if s == "done")
    row.rejected = sum(1 for s in statuses.values() if s == "rejected")
    final = sum(1 for s in statuses.values() if s in FINAL_STATES)
    row.lost = sent - final  # never stored, or stored but unfinished
    row.duplicated = int(doubled or 0)
    row.recomputed = (after[0] - before[0]) - (after[1] - before[1])
    return row
