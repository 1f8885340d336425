"""Redis at its ``maxmemory`` with ``noeviction``: senders are refused, nothing accepted is lost.

Mid-run the harness lowers Redis's ``maxmemory`` below what it uses (policy ``noeviction``, as
a production Redis with a memory limit is set up), so Redis refuses every write. While it is
full, each ingest path must answer with its protocol's retryable error and store nothing: HTTP
``POST /api/studies`` and STOW-RS 503 with Retry-After, C-STORE 0xA700 (out of resources),
``cxr-triage ingest`` exit status 5 with its one JSON line. A CLI sender already running keeps
retrying its chunk. Then the limit is lifted, the refused files are sent again (as the senders
would after Retry-After), and every study accepted before, during and after ends done with one
result. The system runs under the harness's supervisor, as under ``cxr-triage run``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pydicom
import redis
from sqlalchemy import func, select

from pipeline.models import Image
from reliability.faults import Plan
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.netsend import upload
from reliability.one_shot import c_store, cli_ingest, stow
from reliability.samples import PhiRegistry, write_studies
from reliability.sender import CliSender
from reliability.supervise import Supervising
from reliability.system import System

log = logging.getLogger(__name__)
ROW = "redis full (maxmemory, noeviction) mid-run"
HELD_FULL_S = 8.0  # how long Redis stays full: shorter than the 15 s heartbeat TTL


def _image_ids(system: System, paths: list[Path]) -> list[int]:
    """Images stored from these files: DICOM by SOP Instance UID, the others by file name."""
    assert system.factory is not None
    sops = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in paths
        if p.suffix == ".dcm"
    ]
    names = [p.name for p in paths if p.suffix != ".dcm"]
    with system.factory() as session:
        return list(
            session.scalars(
                select(Image.id).where(Image.sop_uid.in_(sops) | Image.filename.in_(names))
            )
        )


def redis_full_row(system: System, plan: Plan, phi: PhiRegistry, offset: int) -> Row:
    """Fill Redis mid-run, send through every path, lift the limit, resend, recover."""
    assert system.factory is not None and system.settings is not None
    row = Row(ROW, system.profile.name)
    root = system.workdir / "studies" / "redisfull"
    background = write_studies(root / "background", plan.studies, phi, start=offset)
    refused_http = write_studies(root / "http", 3, phi, start=offset + 10_000)
    refused_stow = [
        p for p in write_studies(root / "stow", 3, phi, start=offset + 20_000) if p.suffix == ".dcm"
    ][:1]
    refused_scp = [
        p for p in write_studies(root / "scp", 6, phi, start=offset + 30_000) if p.suffix == ".dcm"
    ][:3]
    refused_cli = write_studies(root / "cli", 2, phi, start=offset + 40_000)
    client = redis.Redis.from_url(system.redis.url)
    before = work_counters(system.factory)
    feed = system.accounts["feed"][2]
    checks: list[str] = []
    restore_at = 0.0
    refused = [*refused_http, *refused_stow, *refused_scp, *refused_cli]
    cli_dir = root / "cli-send"
    cli_dir.mkdir(exist_ok=True)
    for p in refused_cli:
        shutil.copy(p, cli_dir / p.name)
    with Supervising(system) as supervisor:
        sender = CliSender(system, background, chunk=8, pause_s=0.5).start()
        try:
            if not _wait_done(system, sender, 120):
                raise RuntimeError("no study finished before the fault")
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", str(max(1, used // 2)))
            full_at = time.monotonic()
            time.sleep(1.5)  # the sources' room check (once a second) sees it
            codes = [upload(system.base_url, feed, p.name, p.read_bytes()) for p in refused_http]
            ok_http = sum(1 for status, doc in codes if status == 503)
            checks.append(f"HTTP {ok_http}/{len(codes)} 503")
            status, _ = stow(system, refused_stow)
            checks.append(f"STOW-RS {'503' if status == 503 else status}")
            scp = c_store(system.scp_port, refused_scp)
            checks.append(f"C-STORE {sum(1 for s in scp if s == 0xA700)}/{len(scp)} 0xA700")
            code, doc, _ = cli_ingest(system, cli_dir)
            checks.append(f"ingest exit {code}{' with its JSON line' if doc.get('error') else ''}")
            if ok_http != len(codes) or status != 503 or any(s != 0xA700 for s in scp):
                row.failures.append(
                    "a sender was not refused with a retryable error: " + ", ".join(checks)
                )
            if code != 5 or "_lines" in doc or not doc.get("error"):
                row.failures.append(f"cxr-triage ingest exited {code} ({doc})")
            if stored := _image_ids(system, refused):
                row.failures.append(f"{len(stored)} refused files were stored")
            time.sleep(max(0.0, HELD_FULL_S - (time.monotonic() - full_at)))
        finally:
            client.config_set("maxmemory", "0")  # room again: as if the operator raised it
            restore_at = time.monotonic()
        time.sleep(1.5)  # the sources' room check notices
        # The senders send again what was refused.
        for p in refused_http:
            status, doc = upload(system.base_url, feed, p.name, p.read_bytes())
            if status >= 300:
                row.failures.append(f"HTTP resend answered {status}")
        status, _ = stow(system, refused_stow)
        if status != 200:
            row.failures.append(f"STOW-RS resend answered {status}")
        if any(s != 0 for s in c_store(system.scp_port, refused_scp)):
            row.failures.append("a C-STORE resend failed")
        code, doc, _ = cli_ingest(system, cli_dir)
        if code != 0:
            row.failures.append(f"cxr-triage ingest resend exited {code}")
        sender.join(plan.recover_timeout_s)
        extra_ids = _image_ids(system, refused)
        if len(extra_ids) != len(refused):
            row.failures.append(f"{len(refused) - len(extra_ids)} resent files not stored")
        ids = sorted({*sender.image_ids.values(), *extra_ids})
        finished = wait_final(system.factory, ids, plan.recover_timeout_s)
    row.recover_s = time.monotonic() - restore_at if finished else None
    sent = len(background) + len(refused)
    fill(row, system.factory, ids, sent, before)
    row.failures += sender.errors
    if not finished:
        row.failures.append(f"not all final after {plan.recover_timeout_s:.0f} s")
    notes = [
        f"while full: {', '.join(checks)}; nothing refused was stored",
        f"CLI sender retried {sender.retries}x",
        "shipped timeouts",
    ]
    if supervisor.restarts:
        notes.append(supervisor.summary())
    row.note = "; ".join(notes)
    client.close()
    return row


def _wait_done(system: System, sender: CliSender, timeout: float) -> bool:
    assert system.factory is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = list(sender.image_ids.values())
        if ids:
            with system.factory() as session:
                if session.scalar(
                    select(func.count(Image.id)).where(Image.id.in_(ids), Image.status == "done")
                ):
                    return True
        time.sleep(0.05)
    return False


def redis_full_rows(system: System, plan: Plan, phi: PhiRegistry) -> list[Row]:
    """The row, or its failure as a row."""
    try:
        return [redis_full_row(system, plan, phi, 700_000)]
    except Exception as exc:
        log.exception("scenario %s failed", ROW)
        return [Row(ROW, system.profile.name, failures=[f"{type(exc).__name__}: {exc}"])]
