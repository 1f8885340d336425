"""The data directory's disk full: a system of its own on a small tmpfs, filled to the last page.

The system's data (SQLite, the data dir, Redis's AOF) and its processes' TMPDIR (the HTTP
upload spool) live on a tmpfs of ``Plan.disk_mb`` MB mounted for the row (it needs root, as
mounting does). Studies are sent over HTTP first, and while they are being classified a filler
file takes every free byte: the kernel answers ENOSPC to every process writing there, SQLite says
"database or disk is full", Redis can no longer append to its AOF. Then the same kind of studies
go through each ingest path (HTTP upload, STOW-RS, C-STORE, ``cxr-triage ingest``), the filler
topped up before each. Every answer must be an acceptance (the study then ends done) or the
protocol's full-disk error: HTTP 507, DICOM 0xA700, ``ingest`` exit 4 with a message. Nothing
may be half-written: no study without its image, no image of a refused file, no queued image
without its stored preview, SQLite's integrity check ok, no spool file left. Then the filler is
deleted (space returns), the refused files are sent again as their senders would, new studies
too, and every study of the row must end done.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.models import Image
from reliability import one_shot
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.netsend import HttpSender, ScpSender, upload
from reliability.samples import PhiRegistry, write_studies
from reliability.services import Profile
from reliability.smalldisk import SmallDisk, half_written, stored_sops
from reliability.supervise import supervised_row
from reliability.system import System

log = logging.getLogger(__name__)
OUT_OF_RESOURCES = 0xA700
EXIT_STORAGE_FULL = 4


class _Tally:
    """The answers of one path while the disk was full: accepted, refused as documented, other."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # path -> [accepted, refused, unexpected]
        self.unexpected: list[str] = []

    def add(self, path: str, outcome: str, detail: str = "") -> None:
        counts = self.counts.setdefault(path, [0, 0, 0])
        counts[("accepted", "refused", "unexpected").index(outcome)] += 1
        if outcome == "unexpected":
            self.unexpected.append(f"{path}: {detail}")

    @property
    def refused(self) -> int:
        return sum(c[1] for c in self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{p} {c[1]}/{sum(c)} refused" for p, c in self.counts.items())


def _while_full(
    system: System, disk: SmallDisk, files: list[Path], tally: _Tally, phi: PhiRegistry
) -> tuple[dict[Path, int], set[Path], set[Path]]:
    """Send files through every path with the disk full.

    Returns (accepted file -> image id, refused files to send again, the refused of which
    nothing may have been stored: those answered one by one, or a whole request refused).
    """
    feed = system.accounts["feed"][2]
    quarter = max(1, len(files) // 4)
    http, stow, scp, cli = (
        files[:quarter],
        files[quarter : 2 * quarter],
        files[2 * quarter : 3 * quarter],
        files[3 * quarter :],
    )
    accepted_sops: dict[Path, str] = {}
    refused: set[Path] = set()
    strict: set[Path] = set()
    disk.fill()
    for path in http:
        status, doc = upload(system.base_url, feed, path.name, path.read_bytes())
        if status in (200, 202) and doc.get("image_id"):
            accepted_sops[path] = one_shot.sop_uid(path)
            tally.add("HTTP", "accepted")
        elif status == 507 and "full" in str(doc.get("error", "")):
            refused.add(path)
            strict.add(path)
            tally.add("HTTP", "refused")
        else:
            tally.add("HTTP", "unexpected", f"HTTP {status} {doc.get('error', '')}"[:120])
    disk.fill()
    status, failed = one_shot.stow(system, stow)
    if status == 200:
        accepted_sops.update({p: one_shot.sop_uid(p) for p in stow})
        tally.add("STOW-RS", "accepted")
    elif status == 507 or (status == 202 and failed and set(failed) == {OUT_OF_RESOURCES}):
        # 202: the parts stored before the disk filled stand; the rest failed with 0xA700.
        refused.update(stow)  # resent below; the stored ones come back as duplicates
        if status == 507:
            strict.update(stow)
        tally.add("STOW-RS", "refused")
    else:
        tally.add("STOW-RS", "unexpected", f"HTTP {status}, failed parts {failed}")
    disk.fill()
    for path, code in zip(scp, one_shot.c_store(system.scp_port, scp), strict=True):
        if code == 0:
            accepted_sops[path] = one_shot.sop_uid(path)
            tally.add("C-STORE", "accepted")
        elif code == OUT_OF_RESOURCES:
            refused.add(path)
            strict.add(path)
            tally.add("C-STORE", "refused")
        else:
            tally.add("C-STORE", "unexpected", f"status 0x{code:04X}")
    disk.fill()
    folder = cli[0].parent.parent / "cli-while-full"
    folder.mkdir(parents=True, exist_ok=True)
    for path in cli:
        os.replace(path, folder / path.name)
    cli = [folder / p.name for p in cli]
    code, doc, err = one_shot.cli_ingest(system, folder)
    if code == 0 and doc.get("accepted") == len(cli):
        accepted_sops.update({p: one_shot.sop_uid(p) for p in cli})
        tally.add("ingest", "accepted")
    elif code == EXIT_STORAGE_FULL and "full" in err and "full" in str(doc.get("error", "")):
        refused.update(cli)  # some may have been stored first: they come back as duplicates
        tally.add("ingest", "refused")
    else:
        tally.add("ingest", "unexpected", f"exit {code}: {err.strip()[-160:]}")
    assert system.factory is not None
    with system.factory() as session:
        by_sop = dict(
            session.execute(
                select(Image.sop_uid, Image.id).where(
                    Image.sop_uid.in_(list(accepted_sops.values()))
                )
            ).all()
        )
    ids = {p: by_sop[s] for p, s in accepted_sops.items() if s in by_sop}
    missing = sorted(p.name for p in accepted_sops if p not in ids)
    if missing:
        tally.unexpected.append(f"{len(missing)} accepted files have no image: {missing[:3]}")
    return ids, refused, strict


def disk_full_row(profile: Profile, plan: Any, phi: PhiRegistry, workdir: Path) -> Row:
    """Fill the data directory's disk mid-run, send through every path, free it, recover."""
    row = Row(
        f"disk full ({plan.disk_mb} MB tmpfs: data dir, SQLite, Redis AOF, spool)", profile.name
    )
    if profile.database_url is not None:
        row.scenario = f"disk full ({plan.disk_mb} MB tmpfs: data dir, Redis AOF, spool)"
    workdir.mkdir(parents=True, exist_ok=True)
    disk = SmallDisk(workdir / "disk", plan.disk_mb)
    try:
        disk.mount()
    except (OSError, subprocess.CalledProcessError) as exc:
        why = getattr(exc, "stderr", "") or str(exc)
        row.failures.append(f"cannot mount a tmpfs (needs root): {why.strip()[:120]}")
        return row
    system = System(profile, workdir, data_root=disk.path)
    spool = disk.path / "tmp"
    spool.mkdir()
    system.extra_env = {"TMPDIR": str(spool)}
    try:
        with supervised_row(row, system, phi, "disk full") as supervisor:
            system.shipped_timeouts = True  # what a department runs: the 600 s stuck timeout
            assert system.factory is not None
            before = work_counters(system.factory)
            feed = system.accounts["feed"][2]
            studies = system.workdir / "studies"
            first = write_studies(studies / "before", plan.disk_studies, phi, start=900_000)
            full_files = one_shot.dicom_only(
                write_studies(studies / "full", plan.disk_studies * 3 // 2 + 4, phi, start=910_000)
            )[: max(8, plan.disk_studies // 2)]
            after = write_studies(studies / "after", plan.disk_studies // 2, phi, start=920_000)
            # Accepted before the disk fills; still being classified when it does.
            sender = HttpSender(
                system.base_url, feed, first, threads=2, give_up_after_s=plan.recover_timeout_s
            ).start()
            sender.join(plan.recover_timeout_s)
            tally = _Tally()
            full_ids, refused, strict = _while_full(system, disk, full_files, tally, phi)
            stored_refused = stored_sops(system, {one_shot.sop_uid(p) for p in refused - strict})
            problems = half_written(system, {one_shot.sop_uid(p) for p in strict}, spool)
            space_at = time.monotonic()
            disk.release()
            # Senders send the refused files again, and new studies come in.
            again = HttpSender(
                system.base_url,
                feed,
                sorted(refused),
                threads=2,
                give_up_after_s=plan.recover_timeout_s,
            ).start()
            new_http = HttpSender(
                system.base_url,
                feed,
                after[: len(after) // 2],
                threads=2,
                give_up_after_s=plan.recover_timeout_s,
            ).start()
            new_scp = ScpSender(
                system.scp_port,
                one_shot.dicom_only(after[len(after) // 2 :]),
                give_up_after_s=plan.recover_timeout_s,
            ).start()
            for s in (again, new_http, new_scp):
                s.join(plan.recover_timeout_s)
            with system.factory() as session:
                sops = list(new_scp.outcome.sop_uids.values())
                scp_ids = dict(
                    session.execute(
                        select(Image.sop_uid, Image.id).where(Image.sop_uid.in_(sops))
                    ).all()
                )
            ids = {
                *sender.outcome.image_ids.values(),
                *full_ids.values(),
                *again.outcome.image_ids.values(),
                *new_http.outcome.image_ids.values(),
                *scp_ids.values(),
            }
            finished = wait_final(system.factory, sorted(ids), plan.recover_timeout_s)
            row.recover_s = time.monotonic() - space_at if finished else None
            sent = len(first) + len(full_files) + len(after[: len(after) // 2]) + len(new_scp.paths)
            fill(row, system.factory, sorted(ids), sent, before)
            row.failures += tally.unexpected + problems
            for s in (sender, again, new_http, new_scp):
                row.failures += s.outcome.errors[:3]
            if not tally.refused:
                row.failures.append("no path refused anything: the disk never filled for ingest")
            if not finished:
                row.failures.append(
                    f"not all final {plan.recover_timeout_s:.0f} s after space returned"
                )
            if row.done != row.sent:
                row.failures.append(f"{row.sent - row.done} studies not done")
            row.note = (
                f"while full: {tally.summary()}; {len(stored_refused)} of the refused had "
                "been stored before the disk filled mid-request; nothing half-written; "
                f"shipped timeouts; {supervisor.summary()}"
            )
    finally:
        disk.unmount()
    return row
