"""Network partitions: the workers cut off from Redis, the dashboard from the database.

A system of its own whose workers reach Redis, and whose dashboard reaches PostgreSQL, each
through a proxy of their own (``System(partitionable=True)``); everything else (the DICOM
listener, the reconciler, the harness) keeps its direct links. While batches are in flight both
links are cut (connections reset, new ones refused) for ``Plan.partition_s``: in the full plan
longer than the shipped Redis visibility timeout (``Settings.visibility_timeout_s``, 600 s), so
kombu hands the messages the workers held at the cut out again after the heal, on top of what
the reconciler re-sent when the workers' heartbeats expired. Studies keep coming during the
partition: over DICOM (accepted, queued in Redis) and over HTTP (on PostgreSQL refused while the
dashboard cannot reach the database, the uploader retrying as a router would). After the heal
every study must end done, once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from pipeline.models import Image
from pipeline.settings import Settings
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.netsend import HttpSender, ScpSender
from reliability.samples import PhiRegistry, write_studies
from reliability.services import Profile
from reliability.supervise import supervised_row
from reliability.system import System

log = logging.getLogger(__name__)


def _dicom(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.suffix == ".dcm"]


def _processing(system: System, ids: list[int]) -> int:
    assert system.factory is not None
    with system.factory() as session:
        return int(
            session.scalar(
                select(func.count(Image.id)).where(Image.id.in_(ids), Image.status == "processing")
            )
            or 0
        )


def partition_row(profile: Profile, plan: Any, phi: PhiRegistry, workdir: Path) -> Row:
    """Cut workers-Redis (and dashboard-database on a server) mid-batch; heal; count."""
    visibility_s = Settings().visibility_timeout_s
    links = "workers-Redis" + (", dashboard-database" if profile.database_url else "")
    longer = "longer" if plan.partition_s > visibility_s else "shorter"
    row = Row(f"partition {plan.partition_s:.0f} s: {links}", profile.name)
    workdir.mkdir(parents=True, exist_ok=True)
    system = System(profile, workdir, partitionable=True)
    give_up = plan.partition_s + plan.recover_timeout_s
    with supervised_row(row, system, phi, "partition") as supervisor:
        assert system.factory is not None and system.worker_redis_proxy is not None
        before = work_counters(system.factory)
        feed = system.accounts["feed"][2]
        first = write_studies(workdir / "studies" / "before", plan.studies, phi, start=1_000_000)
        during = write_studies(
            workdir / "studies" / "during", plan.studies * 3 // 2, phi, start=1_100_000
        )
        during_http = [p for p in during if p.suffix == ".png"] + _dicom(during)[
            : plan.studies // 4
        ]
        during_scp = [p for p in _dicom(during) if p not in set(during_http)]
        sender = HttpSender(system.base_url, feed, first, threads=2, give_up_after_s=give_up)
        sender.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ids = list(sender.outcome.image_ids.values())
            if ids and _processing(system, ids):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("never saw a batch in flight")
        cut_at = time.monotonic()
        proxies = [p for p in (system.worker_redis_proxy, system.dashboard_db_proxy) if p]
        for proxy in proxies:
            proxy.down()
        http = HttpSender(system.base_url, feed, during_http, threads=2, give_up_after_s=give_up)
        scp = ScpSender(system.scp_port, during_scp, give_up_after_s=give_up)
        http.start()
        scp.start()
        time.sleep(max(0.0, plan.partition_s - (time.monotonic() - cut_at)))
        healed_at = time.monotonic()
        for proxy in proxies:
            proxy.up()
        for s in (sender, http, scp):
            s.join(give_up)
        with system.factory() as session:
            scp_ids = list(
                session.scalars(
                    select(Image.id).where(Image.sop_uid.in_(list(scp.outcome.sop_uids.values())))
                )
            )
        ids = sorted(
            {*sender.outcome.image_ids.values(), *http.outcome.image_ids.values(), *scp_ids}
        )
        finished = wait_final(system.factory, ids, plan.recover_timeout_s)
        row.recover_s = time.monotonic() - healed_at if finished else None
        fill(row, system.factory, ids, len(first) + len(during_http) + len(during_scp), before)
        for s in (sender, http, scp):
            row.failures += s.outcome.errors[:3]
        if not finished:
            row.failures.append(f"not all final {plan.recover_timeout_s:.0f} s after the heal")
        if row.done != row.sent:
            row.failures.append(f"{row.sent - row.done} studies not done")
        assert system.dashboard is not None
        crashed = system.dashboard.log_path.read_text(errors="replace").count("Exception on ")
        if crashed:  # cut off from its database it must say 503, not fail with a traceback
            row.failures.append(f"the dashboard answered {crashed} requests with a 500")
        row.note = (
            f"{longer} than the shipped visibility timeout ({visibility_s} s); recover "
            f"s from the heal; uploader retried {http.outcome.retries}x; "
            f"{supervisor.summary()}; shipped timeouts"
        )
    return row
