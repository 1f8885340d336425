"""``cxr-triage ingest``: files and folders into the system, optionally waiting for results
(with a private Redis and worker when no system is running)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import migrate
from pipeline.classifier.weights import describe_weights
from pipeline.db import session_factory, session_scope
from pipeline.ingest.accept import Enqueuer, IngestReport, ingest_paths
from pipeline.ingest.intake import limits_of
from pipeline.models import FINAL_STATES, Study
from pipeline.queue.connections import queue_connections
from pipeline.queue.dispatch import QueueFull, queue_has_room
from pipeline.queue.locate import resolve_redis_url
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.service.supervisor import Supervisor, child_env, worker_children
from pipeline.settings import Settings
from pipeline.states import State
from pipeline.storage import StorageFull
from pipeline.store.instances import InstanceStore

EXIT_TIMED_OUT = 3  # `--wait` ran past `--timeout`
EXIT_STORAGE_FULL = 4  # the disk holding the database is full
EXIT_QUEUE_FULL = 5  # Redis is at its maxmemory and refuses writes


def register(sub: Any) -> None:
    ing = sub.add_parser("ingest", help="ingest files and folders of .dcm/.jpg/.jpeg/.png")
    ing.add_argument("paths", nargs="+")
    ing.add_argument("--wait", action="store_true", help="block until every study is final")
    ing.add_argument("--json", action="store_true")
    ing.add_argument("--lane", choices=("live", "bulk"), default="live")
    ing.add_argument("--timeout", type=float, default=3600.0)
    ing.set_defaults(handler=cmd_ingest)


def _wait_final(settings: Settings, study_ids: set[int], timeout: float) -> bool:
    factory = session_factory(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            rows = session.execute(select(Study.status).where(Study.id.in_(study_ids))).all()
        if all(status in FINAL_STATES for (status,) in rows):
            return True
        time.sleep(0.25)
    return False


def _ingest_json(settings: Settings, report: IngestReport) -> dict[str, Any]:
    ids = {i.study_id for i in report.items if i.study_id is not None}
    with session_scope(session_factory(settings)) as session:
        studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(ids)))}
    accepted = [studies[i.study_id] for i in report.accepted if i.study_id in studies]
    return {
        "accepted": len(report.accepted),
        "duplicates": len(report.duplicates),
        "rejected": [{"path": i.path, "reason": i.reason} for i in report.rejected],
        "done": sum(1 for s in accepted if s.status == State.DONE),
        "failed": sum(1 for s in accepted if s.status == State.FAILED),
        "studies": [
            {
                "id": s.id,
                "path": i.path,
                "status": s.status,
                # Why a study is skipped, rejected or failed: the text the worklist shows.
                "reason": s.reason,
                "label": s.label,
                "p_abnormal": None if s.p_abnormal is None else round(s.p_abnormal, 4),
                "priority": s.priority,
            }
            for i in report.items
            if i.study_id in studies
            for s in [studies[i.study_id]]
        ],
    }


def _ingest(
    args: argparse.Namespace, settings: Settings, redis_url: str | None
) -> tuple[IngestReport, StorageFull | QueueFull | None]:
    """Store and queue the files; what was stored before a full disk or queue stands."""
    factory = session_factory(settings)
    paths, store = [Path(p) for p in args.paths], InstanceStore.of(settings)
    common = {"source": "cli", "lane": args.lane, "store": store}
    try:
        if redis_url is None:
            return ingest_paths(factory, paths, limits_of(settings), sink=None, **common), None
        model = describe_weights(settings)
        with queue_connections(redis_url) as (client, dispatcher):
            if not queue_has_room(client):
                raise QueueFull()  # refused before anything is stored
            sink = Enqueuer(
                factory,
                client,
                dispatcher,
                model["input_size"],
                settings.payload_ttl_s,
                lane=args.lane,
                preprocess=model["preprocess"],
            )
            return ingest_paths(factory, paths, limits_of(settings), sink=sink, **common), None
    except (StorageFull, QueueFull) as exc:
        return exc.report or IngestReport(), exc


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    redis_url = resolve_redis_url(settings)
    temp: Supervisor | None = None
    embedded: EmbeddedRedis | None = None
    ok = True
    try:
        if redis_url is None and args.wait:
            # No running system: bring up a private Redis and one worker for this command.
            embedded = EmbeddedRedis(settings.data_dir / "redis-ingest").start()
            redis_url = embedded.url
            # Their banners and logs go to a file: stdout is this command's own output.
            temp = Supervisor(log_path=settings.data_dir / "ingest-workers.log")
            env = child_env(settings, redis_url)
            for name, command, env_of in worker_children(settings, env, "cxr-ingest"):
                temp.add(name, command, env_of).start()
        report, full = _ingest(args, settings, redis_url)
        queued = [i for i in report.accepted if i.status == State.QUEUED]
        if redis_url is None and queued:
            print(
                f"{len(queued)} images queued in the database; no system is running, so they "
                "will be classified when `cxr-triage run` starts",
                file=sys.stderr,
            )
        if args.wait and redis_url is not None and full is None:
            ids = {i.study_id for i in report.accepted if i.study_id is not None}
            ok = _wait_final(settings, ids, args.timeout)
    finally:
        if temp is not None:
            temp.stop_all()
        if embedded is not None:
            embedded.stop()
    return _report(args, settings, report, full, ok, temp)


def _report(
    args: argparse.Namespace,
    settings: Settings,
    report: IngestReport,
    full: StorageFull | QueueFull | None,
    ok: bool,
    temp: Supervisor | None,
) -> int:
    doc = _ingest_json(settings, report)
    if full is not None:
        # The files stored before the disk (or the queue) filled stand; the rest were not.
        doc["error"] = str(full)
        print(
            f"cxr-triage: {full}; {doc['accepted']} files were stored before that, "
            "the rest were not",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"accepted {doc['accepted']}, duplicates {doc['duplicates']}, "
            f"rejected {len(doc['rejected'])}, done {doc['done']}, failed {doc['failed']}"
        )
        for r in doc["rejected"]:
            print(f"  rejected {r['path']}: {r['reason']}")
    if full is not None:
        return EXIT_QUEUE_FULL if isinstance(full, QueueFull) else EXIT_STORAGE_FULL
    if not ok:
        print(f"timed out after {args.timeout:.0f} s waiting for results", file=sys.stderr)
        if temp is not None:
            print(f"the workers' log: {temp.log_path}", file=sys.stderr)
        return EXIT_TIMED_OUT
    return 0
