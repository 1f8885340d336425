"""The soak: many studies at a steady rate over HTTP and DICOM on a fresh system.

A system of its own (shipped settings, run's restart policy) receives ``Plan.soak_studies``
studies at ``Plan.soak_rate`` per second: two thirds uploaded over HTTP (two connections), one
third by C-STORE (one association), each sent at its scheduled time, generated as it goes
(nothing written to disk first). The row reports throughput, p50/p95 latency (received to
result, the image's ``latency_ms``), and the resident memory (RSS, a process with its children)
of every process at the start (after the first 5 % of the studies), the middle and the end:
Redis, each worker, the dashboard (gunicorn, its workers included), the DICOM listener and
the harness process that runs the reconciler as ``run`` does.

The bound the row checks (documented in the README): from the middle to the end no product
process grows by more than ``GROWTH_BOUND`` of its middle RSS plus ``GROWTH_SLACK_MB``. The
start-to-middle rise is warm-up (allocator arenas, the model's buffers, SQLite's cache) and
is reported, not bounded. The harness process is reported only: it also holds the senders.

Then the reconciler's cost: the wall time of one full pass (``reconcile_once`` with the
shipped settings) over the database the soak left, and over the same studies turned into a
backlog (every soak image ``queued`` as if the workers were behind; their states are put back
after the timing). Each is the median of three passes.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select, update

from pipeline.models import Image, utcnow
from pipeline.service.recovery import reconcile_once
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.paced import PacedSender
from reliability.samples import PhiRegistry
from reliability.services import Profile
from reliability.supervise import supervised_row
from reliability.system import System

log = logging.getLogger(__name__)
GROWTH_BOUND = 0.25  # of the middle RSS
GROWTH_SLACK_MB = 32.0


def _rss_mb(pid: int) -> float:
    """RSS of a process and its descendants, in MB; 0 when it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


def memory(system: System) -> dict[str, float]:
    """Process name -> RSS in MB, now."""
    out: dict[str, float] = {}
    if system.redis.process is not None:
        out["redis"] = _rss_mb(system.redis.process.pid)
    for svc in (*system.workers, system.dashboard, system.scp):
        if svc is not None and svc.proc is not None:
            out[svc.name] = _rss_mb(svc.proc.pid)
    out["harness+reconciler"] = psutil.Process(os.getpid()).memory_info().rss / 1e6
    return out


def _pass_s(system: System) -> float:
    """Median wall time of three full reconciler passes with the shipped settings."""
    assert system.settings is not None
    times = []
    for _ in range(3):
        started = time.perf_counter()
        reconcile_once(system.settings, system.redis.url)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reconciler_cost(system: System, ids: list[int]) -> tuple[float, float]:
    """(pass seconds over the soak's database, pass seconds with its studies as a backlog)."""
    assert system.factory is not None
    settled = _pass_s(system)
    with system.factory() as session:
        saved = session.execute(
            select(Image.id, Image.status, Image.queued_at).where(Image.id.in_(ids))
        ).all()
        # Queued "now" as far as the passes can tell (a timestamp ahead of them), so neither
        # these passes nor the system's own reconciler re-send them while they are timed.
        session.execute(
            update(Image)
            .where(Image.id.in_(ids))
            .values(status="queued", queued_at=utcnow() + timedelta(hours=1))
            .execution_options(synchronize_session=False)
        )
        session.commit()
    try:
        backlog = _pass_s(system)
    finally:
        with system.factory() as session:  # put every image back as it was (by primary key)
            session.execute(
                update(Image), [{"id": i, "status": st, "queued_at": q} for i, st, q in saved]
            )
            session.commit()
    return settled, backlog


def _fmt(mem: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in mem.items())


def soak_row(profile: Profile, plan: Any, phi: PhiRegistry, workdir: Path) -> Row:
    """Plan.soak_studies at Plan.soak_rate/s over HTTP and DICOM; memory and reconciler cost."""
    n, rate = plan.soak_studies, plan.soak_rate
    row = Row(f"soak: {n} studies at {rate:.0f}/s, HTTP + DICOM", profile.name)
    workdir.mkdir(parents=True, exist_ok=True)
    system = System(profile, workdir)
    with supervised_row(row, system, phi, "soak") as supervisor:
        assert system.factory is not None
        before = work_counters(system.factory)
        numbers = list(range(2_000_000, 2_000_000 + n))
        http_a, http_b, scp_n = numbers[0::3], numbers[1::3], numbers[2::3]
        give_up = plan.recover_timeout_s
        senders = [
            PacedSender(system, "http", http_a, rate / 3, phi, give_up),
            PacedSender(system, "http", http_b, rate / 3, phi, give_up),
            PacedSender(system, "scp", scp_n, rate / 3, phi, give_up),
        ]
        t0 = time.monotonic()
        for s in senders:
            s.start(t0)
        samples: dict[str, dict[str, float]] = {}
        for label, share in (("start", 0.05), ("middle", 0.5)):
            while sum(s.sent for s in senders) < n * share and any(
                s._thread.is_alive() for s in senders
            ):
                time.sleep(0.5)
            samples[label] = memory(system)
        for s in senders:
            s.join(n / rate + give_up)
        sent_s = time.monotonic() - t0
        sent = sum(s.sent for s in senders)
        with system.factory() as session:
            sops = [u for s in senders for u in s.sop_uids]
            scp_ids = [
                i
                for start in range(0, len(sops), 5000)
                for i in session.scalars(
                    select(Image.id).where(Image.sop_uid.in_(sops[start : start + 5000]))
                )
            ]
        ids = sorted({*(i for s in senders for i in s.image_ids), *scp_ids})
        finished = wait_final(system.factory, ids, plan.recover_timeout_s)
        total_s = time.monotonic() - t0
        samples["end"] = memory(system)
        fill(row, system.factory, ids, n, before)
        row.recover_s = total_s
        for s in senders:
            row.failures += s.errors[:3]
        if not finished:
            row.failures.append("not all final")
        if row.done != row.sent:
            row.failures.append(f"{row.sent - row.done} studies not done")
        with system.factory() as session:
            latencies = sorted(
                float(x) / 1000
                for x in session.scalars(
                    select(Image.latency_ms).where(Image.id.in_(ids), Image.latency_ms.is_not(None))
                )
                if x is not None
            )
        p50 = statistics.median(latencies) if latencies else 0.0
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
        grown = []
        for name, middle in samples["middle"].items():
            end = samples["end"].get(name, 0.0)
            if name != "harness+reconciler" and end > middle * (1 + GROWTH_BOUND) + GROWTH_SLACK_MB:
                grown.append(f"{name} grew {middle:.0f} -> {end:.0f} MB")
        row.failures += grown
        settled_s, backlog_s = reconciler_cost(system, ids)
        late = max(s.late_s for s in senders)
        row.note = (
            f"{n / total_s:.1f} studies/s end to end, sent at {sent / sent_s:.1f}/s "
            f"(at most {late:.1f} s behind schedule); latency p50 {p50:.1f} s, p95 "
            f"{p95:.1f} s; RSS MB start: {_fmt(samples['start'])}; middle: "
            f"{_fmt(samples['middle'])}; end: {_fmt(samples['end'])}; bound middle->end "
            f"+{GROWTH_BOUND:.0%} +{GROWTH_SLACK_MB:.0f} MB; reconciler pass "
            f"{settled_s * 1000:.0f} ms over {len(ids)} done, {backlog_s * 1000:.0f} ms "
            f"with {len(ids)} queued; {supervisor.summary()}"
        )
    return row
