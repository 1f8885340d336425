"""Fault scenarios: each sends studies, breaks one part mid-run, and counts what came out.

Every scenario runs on the same live system (the machine's worker layout, one Redis, one database), one after the
other, each with its own freshly generated studies, and waits until all of them are final.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from pipeline.models import Image
from pipeline.settings import Settings
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.samples import PhiRegistry, write_studies
from reliability.sender import CliSender
from reliability.system import SHIPPED_STUCK_AFTER_S, System

log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """An ingest path a scenario needs is not part of this checkout yet."""


@dataclass
class Plan:
    """Sizes of a run: the quick one runs in CI, the full one from ``make reliability``."""

    studies: int = 48
    outage_s: float = 3.0
    recover_timeout_s: float = 180.0
    load_studies: int = 120
    fuzz_inputs: int = 200
    # reliability.diskfull: the tmpfs's size, and studies sent before the disk fills
    disk_mb: int = 64
    disk_studies: int = 24
    # reliability.partition: how long the links are cut (full: past the visibility timeout)
    partition_s: float = 20.0
    # reliability.soak: studies, and the steady rate they are sent at (studies/s)
    soak_studies: int = 200
    soak_rate: float = 15.0
    # The rows on a system of their own (disk full, partitions, soak, run killed) on PostgreSQL
    # too: the full plan; the quick one runs them on SQLite only, to keep `make test` short.
    own_rows_on_postgres: bool = False

    @classmethod
    def quick(cls) -> Plan:
        return cls()

    @classmethod
    def full(cls) -> Plan:
        visibility_s = Settings().visibility_timeout_s  # the shipped default: 600 s
        return cls(
            studies=240,
            outage_s=10.0,
            recover_timeout_s=600.0,
            load_studies=2000,
            fuzz_inputs=2000,
            disk_studies=96,
            partition_s=visibility_s + 30.0,
            soak_studies=20_000,
            soak_rate=20.0,
            own_rows_on_postgres=True,
        )


def _count(system: System, ids: list[int], status: str) -> int:
    assert system.factory is not None
    with system.factory() as session:
        return int(
            session.scalar(
                select(func.count(Image.id)).where(Image.id.in_(ids), Image.status == status)
            )
            or 0
        )


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll the predicate until it holds (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def run_fault(
    system: System,
    name: str,
    plan: Plan,
    phi: PhiRegistry,
    offset: int,
    fault: Callable[[System, CliSender], float],
    pause_s: float = 0.0,
    chunk: int = 16,
) -> Row:
    """Send plan.studies studies, inject the fault, and count outcomes after recovery.

    The reconciler runs as `cxr-triage run` does with the shipped timeouts (the System's).
    """
    assert system.factory is not None
    row = Row(name, system.profile.name)
    paths = write_studies(system.workdir / "studies" / name, plan.studies, phi, start=offset)
    before = work_counters(system.factory)
    sender = CliSender(system, paths, chunk=chunk, pause_s=pause_s).start()
    fault_at = fault(system, sender)
    sender.join(plan.recover_timeout_s)
    ids = sorted(set(sender.image_ids.values()))
    finished = wait_final(system.factory, ids, plan.recover_timeout_s)
    row.recover_s = time.monotonic() - fault_at if finished else None
    fill(row, system.factory, ids, len(paths), before)
    row.failures += sender.errors
    if not finished:
        row.failures.append(f"not all final after {plan.recover_timeout_s:.0f} s")
    notes = [f"shipped timeouts (stuck {SHIPPED_STUCK_AFTER_S} s)"]
    if sender.retries:
        notes.append(f"sender retried {sender.retries}x")
    row.note = "; ".join(notes)
    return row


def _in_flight(system: System, sender: CliSender, status: str) -> Callable[[], bool]:
    def check() -> bool:
        ids = list(sender.image_ids.values())
        return bool(ids) and _count(system, ids, status) > 0

    return check


def kill_worker_mid_batch(system: System, sender: CliSender) -> float:
    """SIGKILL a worker while batches are in flight; restart it as ``cxr-triage run`` does.

    Where the layout has several worker processes, the first dies and the others keep working.
    """
    worker = system.worker
    assert worker is not None
    if not wait_until(_in_flight(system, sender, "processing"), 120):
        raise RuntimeError("never saw a batch in flight")
    fault_at = time.monotonic()
    worker.kill()
    system.worker_died(worker)
    system.restart_worker(worker)
    return fault_at


def crash_redis(system: System, sender: CliSender) -> float:
    """SIGKILL redis-server once some studies are done, and start it again from its AOF."""
    if not wait_until(_in_flight(system, sender, "done"), 120):
        raise RuntimeError("no study finished before the fault")
    fault_at = time.monotonic()
    system.crash_redis()
    return fault_at


def cut_database(outage_s: float) -> Callable[[System, CliSender], float]:
    """Make PostgreSQL unreachable for everyone (worker, dashboard, ingest) for outage_s."""

    def fault(system: System, sender: CliSender) -> float:
        if system.proxy is None:
            raise SourceUnavailable("needs PostgreSQL (--database-url)")
        if not wait_until(lambda: len(sender.image_ids) > 0, 120):
            raise RuntimeError("nothing was ingested before the fault")
        fault_at = time.monotonic()
        system.proxy.down()
        time.sleep(outage_s)
        system.proxy.up()
        return fault_at

    return fault


def fault_rows(system: System, plan: Plan, phi: PhiRegistry) -> list[Row]:
    """Run every fault scenario that applies to this system's profile."""
    # (name, fault, sender's pause between files)
    scenarios: list[tuple[str, Callable[[System, CliSender], float], float]] = [
        ("worker SIGKILL mid-batch", kill_worker_mid_batch, 0.0),
        (f"redis crash+restart ({system.profile.redis}, AOF)", crash_redis, 0.0),
        (f"postgresql down {plan.outage_s:.0f} s", cut_database(plan.outage_s), 0.3),
    ]
    rows = []
    for n, (name, fault, pause) in enumerate(scenarios):
        if "postgresql" in name and system.proxy is None:
            continue  # SQLite has no server to lose; the PostgreSQL profile runs it
        try:
            rows.append(run_fault(system, name, plan, phi, 100_000 * (n + 1), fault, pause))
        except Exception as exc:
            log.exception("scenario %s failed", name)
            rows.append(Row(name, system.profile.name, failures=[f"{type(exc).__name__}: {exc}"]))
    from reliability.hung import HUNG_ROW, hung_worker_row  # it builds on run_fault

    try:
        rows.append(hung_worker_row(system, plan, phi, 100_000 * (len(scenarios) + 1)))
    except Exception as exc:
        log.exception("scenario %s failed", HUNG_ROW)
        rows.append(Row(HUNG_ROW, system.profile.name, failures=[f"{type(exc).__name__}: {exc}"]))
    from reliability.redisfull import redis_full_rows  # it builds on this module's Plan

    rows += redis_full_rows(system, plan, phi)
    return rows
