"""A worker frozen (SIGSTOP) mid-batch: its batch re-run elsewhere, then it is woken."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from sqlalchemy import func, select

from pipeline.models import FINAL_STATES, Batch, Image
from pipeline.service.supervisor import worker_nodename
from reliability.faults import Plan, run_fault, wait_until
from reliability.metrics import Row, fill, work_counters
from reliability.samples import PhiRegistry
from reliability.sender import CliSender
from reliability.system import System

HUNG_ROW = "worker hung (SIGSTOP mid-batch), woken after its batch was re-run"


def _claims_of(system: System, worker: str) -> list[int]:
    assert system.factory is not None
    with system.factory() as session:
        return list(
            session.scalars(
                select(Image.id).where(Image.status == "processing", Image.worker == worker)
            )
        )


def hung_worker_row(system: System, plan: Plan, phi: PhiRegistry, offset: int) -> Row:
    """SIGSTOP a worker holding a claimed batch; SIGCONT it once another worker re-ran it.

    The frozen process stops beating; under the shipped settings its heartbeat expires
    (15 s TTL) and the 5 s dead-worker check re-sends its claims, which the other worker runs.
    Woken, the frozen worker finishes its forward pass and finds its claims gone: it must
    write no result, change no final state and leave nothing ``processing``.
    """
    worker = system.worker
    assert worker is not None and worker.proc is not None and system.factory is not None
    name = worker_nodename(worker.command)
    assert name is not None
    seen: dict[str, Any] = {}

    def freeze(system: System, sender: CliSender) -> float:
        if not wait_until(lambda: bool(_claims_of(system, name)), 120):
            raise RuntimeError("the worker never held a claimed batch")
        assert worker.proc is not None
        seen["sender"] = sender
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        fault_at = time.monotonic()
        seen["held"] = held = _claims_of(system, name)
        # Its batch is re-run elsewhere: every image it held ends final, by another worker.
        assert system.factory is not None
        if not wait_until(lambda: _count_final(system, held) == len(held), plan.recover_timeout_s):
            os.killpg(worker.proc.pid, signal.SIGCONT)
            raise RuntimeError("the frozen worker's batch was not re-run")
        seen["rerun_s"] = time.monotonic() - fault_at
        seen["before_wake"] = _final_state(system, held)
        os.killpg(worker.proc.pid, signal.SIGCONT)
        return fault_at

    before = work_counters(system.factory)
    dropped_before = _dropped(system)
    # Sent in small paced chunks: many batches, so the watched worker (one of two) surely
    # claims one while it is looked at; three quick chunks of 16 could all go to the other
    # (a run in five saw no claim).
    row = run_fault(system, HUNG_ROW, plan, phi, offset, freeze, pause_s=0.2, chunk=4)
    held = seen.get("held", [])
    if not held:
        return row
    # The woken worker finishes its batch: wait for it to commit (or drop) what it computed.
    woken = wait_until(lambda: _dropped(system) > dropped_before, 60)
    after = _final_state(system, held)
    if after != seen["before_wake"]:
        changed = sum(1 for i in held if after.get(i) != seen["before_wake"].get(i))
        row.failures.append(f"the woken worker changed {changed} final states")
    if any(w == name for _, w in after.values()):
        row.failures.append("a result of the frozen worker was written after its claims went")
    if not worker.alive():
        row.failures.append("the woken worker died")
    sender: CliSender = seen["sender"]
    # Counted again now that the woken worker's batch is over: a late write would show here.
    fill(row, system.factory, sorted(set(sender.image_ids.values())), len(sender.paths), before)
    row.note = (
        f"{len(held)} claimed images re-run elsewhere {seen['rerun_s']:.1f} s after "
        f"SIGSTOP; woken, it dropped {_dropped(system) - dropped_before} results "
        f"{'' if woken else '(none seen) '}and wrote none; shipped timeouts"
    )
    return row


def _count_final(system: System, ids: list[int]) -> int:
    assert system.factory is not None
    with system.factory() as session:
        return int(
            session.scalar(
                select(func.count(Image.id)).where(
                    Image.id.in_(ids), Image.status.in_(FINAL_STATES)
                )
            )
            or 0
        )


def _final_state(system: System, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    assert system.factory is not None
    with system.factory() as session:
        return {
            i: (st, w)
            for i, st, w in session.execute(
                select(Image.id, Image.status, Image.worker).where(Image.id.in_(ids))
            )
        }


def _dropped(system: System) -> int:
    """Results computed and dropped so far: batch images neither written done nor failed."""
    assert system.factory is not None
    with system.factory() as session:
        return int(
            session.scalar(
                select(func.coalesce(func.sum(Batch.size - Batch.done - Batch.failed), 0))
            )
            or 0
        )
