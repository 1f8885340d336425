"""The study folder ingested for the queue tests, and waiting until every study is final."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.models import Study
from pipeline.settings import Settings
from tests.conftest import run_cli


def wait_all_final(factory, timeout: float = 120) -> dict[str, int]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as session:
            counts = dict(
                session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
            )
        if not set(counts) & {"queued", "processing", "received"}:
            return counts
        time.sleep(0.3)
    raise TimeoutError(f"studies not final: {counts}")


def ingest_offline(settings: Settings, folder: Path) -> Any:
    """Ingest folder with no Redis (the studies wait, queued); return a session factory."""
    assert (
        run_cli(["ingest", str(folder), "--json"], settings.with_(redis_url=None)).returncode == 0
    )
    return make_session_factory(make_engine(settings.db_url))
