"""``cxr-triage reliability [--quick] [--json] [--database-url URL]``: the suite, one table.

Each profile starts its own system (Redis, database, worker, dashboard) in a temporary
directory, runs the scenarios one after the other, scans every log of the run for the test
files' patient names and ids, and stops everything. Exit status 1 when any row is not ok.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.settings import ConfigError, Settings
from reliability.badinput import bad_input_row
from reliability.diskfull import disk_full_row
from reliability.faults import Plan, fault_rows
from reliability.fuzz import fuzz_row
from reliability.metrics import Row
from reliability.partition import partition_row
from reliability.pg import reachable, temporary_database
from reliability.report import as_json, markdown
from reliability.runkill import run_kill_row
from reliability.samples import PhiRegistry
from reliability.security import security_row
from reliability.services import Profile
from reliability.soak import soak_row
from reliability.sources import dashboard_restart_row, http_bad_requests_row, load_row
from reliability.system import System

log = logging.getLogger(__name__)


def run_profile(profile: Profile, plan: Plan, workdir: Path) -> list[Row]:
    """Start a system with this profile and run every scenario against it."""
    workdir.mkdir(parents=True, exist_ok=True)
    phi = PhiRegistry()
    # The harness's own log lines are scanned for PHI like every other process's.
    handler = logging.FileHandler(workdir / "harness.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    system = System(profile, workdir)
    rows: list[Row] = []
    try:
        system.start()
        rows += fault_rows(system, plan, phi)
        rows.append(bad_input_row(system, phi, plan.recover_timeout_s))
        rows.append(http_bad_requests_row(system))
        rows.append(dashboard_restart_row(system, plan.studies, phi, plan.recover_timeout_s))
        rows.append(load_row(system, plan.load_studies, phi, plan.recover_timeout_s))
        rows.append(security_row(system, phi))  # last: its PHI scan reads every log
    except Exception as exc:
        log.exception("profile %s could not run", profile.name)
        rows.append(Row("system start", profile.name, failures=[f"{type(exc).__name__}: {exc}"]))
    finally:
        system.stop()
        logging.getLogger().removeHandler(handler)
        handler.close()
    return rows


# Rows that start a system of their own (a data dir on a small disk, proxied links, a fresh
# system whose memory is followed): (workdir name, row function).
OWN_SYSTEM_ROWS: list[tuple[str, Callable[[Profile, Plan, PhiRegistry, Path], Row]]] = [
    ("diskfull", disk_full_row),
    ("partition", partition_row),
    ("soak", soak_row),
    ("runkill", run_kill_row),
]


def run_own_system_rows(
    profile: Profile, plan: Plan, workdir: Path, postgres_admin_url: str | None = None
) -> list[Row]:
    """Each row on a system of its own; on PostgreSQL each in a database of its own."""
    rows = []
    for name, row_fn in OWN_SYSTEM_ROWS:
        try:
            if postgres_admin_url is None:
                rows.append(row_fn(profile, plan, PhiRegistry(), workdir / name))
                continue
            with temporary_database(postgres_admin_url) as url:
                own = Profile(profile.name, database_url=url, redis=profile.redis)
                rows.append(row_fn(own, plan, PhiRegistry(), workdir / name))
        except Exception as exc:
            log.exception("row %s could not run", name)
            rows.append(Row(name, profile.name, failures=[f"{type(exc).__name__}: {exc}"]))
    return rows


def run_suite(plan: Plan, postgres_admin_url: str | None, workdir: Path) -> list[Row]:
    """SQLite first, then PostgreSQL in a database of the run's own; rows in run order."""
    rows = [fuzz_row(plan.fuzz_inputs)]
    rows += run_profile(Profile("sqlite+embedded"), plan, workdir / "sqlite")
    rows += run_own_system_rows(Profile("sqlite+embedded"), plan, workdir / "sqlite")
    if postgres_admin_url:
        profile = Profile("postgresql+compose", redis="compose")
        with temporary_database(postgres_admin_url) as url:
            profile.database_url = url
            rows += run_profile(profile, plan, workdir / "postgresql")
        if plan.own_rows_on_postgres:
            rows += run_own_system_rows(profile, plan, workdir / "postgresql", postgres_admin_url)
    return rows


def cmd_reliability(args: argparse.Namespace, settings: Settings) -> int:
    plan = Plan.quick() if args.quick else Plan.full()
    postgres = args.database_url
    if postgres and (why := reachable(postgres)):
        if not args.if_reachable:
            raise ConfigError(f"PostgreSQL at {postgres} does not answer: {why}")
        print(f"PostgreSQL not reachable ({why}); running on SQLite only", file=sys.stderr)
        postgres = None
    with tempfile.TemporaryDirectory(prefix="cxr-reliability-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        rows = run_suite(plan, postgres, workdir)
    print(as_json(rows) if args.json else markdown(rows))
    return 0 if all(r.ok for r in rows) else 1


def register(sub: Any) -> None:
    """Add ``reliability`` to the ``cxr-triage`` parser."""
    p = sub.add_parser("reliability", help="fault, bad-input, security and load scenarios")
    p.add_argument("--quick", action="store_true", help="the short CI version")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.add_argument(
        "--database-url",
        help="also run on this PostgreSQL server, in a database "
        "the run creates and drops (the URL names an existing database to connect to)",
    )
    p.add_argument(
        "--if-reachable",
        action="store_true",
        help="without an answering PostgreSQL, run on SQLite only instead of failing",
    )
    p.add_argument("--workdir", help="keep the run's files and logs here (default: a temp dir)")
    p.set_defaults(handler=cmd_reliability)
