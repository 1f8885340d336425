"""The short reliability suite (``cxr-triage reliability --quick``) on a live system.

The same command as ``make reliability`` with smaller counts: every fault, bad-input, load and
security scenario runs against real processes (worker, dashboard, DICOM listener, Redis, SQLite
and, when it answers, PostgreSQL behind a TCP proxy the harness cuts). Every row must lose and
double nothing and meet its documented outcome.
"""

from __future__ import annotations

import json
import os

import pytest

from reliability.pg import reachable
from tests.conftest import PG_ADMIN_URL, run_cli

pytestmark = pytest.mark.e2e

COMMON = {
    "worker SIGKILL mid-batch",
    "worker hung (SIGSTOP mid-batch), woken after its batch was re-run",
    "redis full (maxmemory, noeviction) mid-run",
    "bad input corpus (CLI ingest)",
    "bad HTTP uploads",
    "dashboard killed+restarted during uploads",
    "load: 120 studies, HTTP + DICOM at once",
    "security: routes, CSRF, scopes, PHI in logs, stored names",
}


@pytest.mark.timeout(1500)
def test_quick_reliability_suite_loses_and_doubles_nothing(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ["reliability", "--quick", "--json", "--workdir", str(tmp_path / "run")]
    with_pg = reachable(PG_ADMIN_URL) is None
    if with_pg:
        args += ["--database-url", PG_ADMIN_URL]
    proc = run_cli(args, settings, timeout=1400)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stdout: {proc.stdout[:2000]}"  # --json: one
    doc = json.loads(lines[0])
    rows = doc["rows"]
    bad = [r for r in rows if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    assert proc.returncode == 0 and doc["ok"] is True
    expected = {("decoder fuzz (hypothesis, mutated real files)", "-")}
    expected |= {(s, "sqlite+embedded") for s in COMMON}
    expected.add(("redis crash+restart (embedded, AOF)", "sqlite+embedded"))
    if with_pg:
        expected |= {(s, "postgresql+compose") for s in COMMON}
        expected |= {
            ("redis crash+restart (compose, AOF)", "postgresql+compose"),
            ("postgresql down 3 s", "postgresql+compose"),
        }
    # Rows on a system of their own (reliability.cli.OWN_SYSTEM_ROWS); the disk-full row mounts
    # a tmpfs, which needs root.
    own = {
        "sqlite+embedded": ["partition 20 s: workers-Redis"],
        "postgresql+compose": ["partition 20 s: workers-Redis, dashboard-database"],
    }
    if os.geteuid() == 0:
        own["sqlite+embedded"].append("disk full (64 MB tmpfs: data dir, SQLite, Redis AOF, spool)")
        own["postgresql+compose"].append("disk full (64 MB tmpfs: data dir, Redis AOF, spool)")
    # The quick plan runs them on SQLite only (Plan.own_rows_on_postgres; `make reliability`
    # runs them on both).
    for profile in ["sqlite+embedded"]:
        expected |= {(s, profile) for s in own[profile]}
        expected.add(("soak: 200 studies at 15/s, HTTP + DICOM", profile))
        # The real `cxr-triage run` (shipped defaults) SIGKILLed mid-load and started again.
        expected.add(("run supervisor SIGKILL mid-load, restarted", profile))
    assert {(r["scenario"], r["profile"]) for r in rows} == expected
    for row in rows:
        assert row["lost"] == 0 and row["duplicated"] == 0, row
        if row["scenario"].startswith(
            (
                "worker",
                "redis",
                "postgresql",
                "dashboard",
                "load",
                "disk full",
                "partition",
                "soak",
                "run supervisor",
            )
        ):
            # Every study sent came out final: done (these scenarios send good studies only).
            assert row["done"] == row["sent"], row
    fuzz = next(r for r in rows if r["scenario"].startswith("decoder fuzz"))
    assert fuzz["sent"] == 200 and fuzz["note"] == "0 unhandled exceptions in 200 inputs"
    security = [r for r in rows if r["scenario"].startswith("security")]
    assert all("0 with PHI" in r["note"] for r in security), security
    # The fault rows say they ran with the shipped timeouts (`make run`'s, not tuned ones).
    for row in rows:
        if row["scenario"].startswith(
            ("worker", "redis crash", "redis full", "postgresql down", "run supervisor")
        ):
            assert "shipped" in row["note"], row
