"""Scenarios through the network ingest paths: load over HTTP + DICOM, a dashboard restart
during uploads, and bad requests (path traversal, oversized, malformed multipart)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sqlalchemy import select

from pipeline.models import Image
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.netsend import HttpSender, ScpSender, multipart, post, upload
from reliability.samples import PhiRegistry, chest_like, png_bytes, write_studies
from reliability.system import System


def _sop_ids(system: System, sops: dict[Path, str]) -> dict[Path, int]:
    assert system.factory is not None
    with system.factory() as session:
        found = dict(
            session.execute(
                select(Image.sop_uid, Image.id).where(Image.sop_uid.in_(list(sops.values())))
            ).all()
        )
    return {p: found[s] for p, s in sops.items() if s in found}


def _dicom_only(folder: Path, n: int, phi: PhiRegistry, start: int) -> list[Path]:
    paths = write_studies(folder, n * 3 // 2 + 2, phi, start=start)
    return [p for p in paths if p.suffix == ".dcm"][:n]


def load_row(system: System, n: int, phi: PhiRegistry, timeout: float) -> Row:
    """n studies at once: half uploaded over HTTP (4 connections), half by DICOM C-STORE."""
    assert system.factory is not None
    row = Row(f"load: {n} studies, HTTP + DICOM at once", system.profile.name)
    http_paths = write_studies(system.workdir / "load" / "http", n // 2, phi, start=500_000)
    scp_paths = _dicom_only(system.workdir / "load" / "scp", n - n // 2, phi, start=600_000)
    before = work_counters(system.factory)
    started = time.monotonic()
    feed = system.accounts["feed"][2]
    http = HttpSender(system.base_url, feed, http_paths, threads=4, give_up_after_s=timeout)
    scp = ScpSender(system.scp_port, scp_paths, give_up_after_s=timeout)
    http.start()
    scp.start()
    http.join(timeout)
    scp.join(timeout)
    sent_s = time.monotonic() - started
    ids = {**http.outcome.image_ids, **_sop_ids(system, scp.outcome.sop_uids)}
    image_ids = sorted(set(ids.values()))
    finished = wait_final(system.factory, image_ids, timeout)
    total_s = time.monotonic() - started
    fill(row, system.factory, image_ids, n, before)
    row.failures += (http.outcome.errors + scp.outcome.errors)[:5]
    if not finished:
        row.failures.append("not all final")
    row.recover_s = total_s
    with system.factory() as session:
        latencies = [
            float(x)
            for x in session.scalars(
                select(Image.latency_ms).where(
                    Image.id.in_(image_ids), Image.latency_ms.is_not(None)
                )
            )
            if x is not None
        ]
    p95 = statistics.quantiles(latencies, n=20)[-1] / 1000 if len(latencies) >= 20 else None
    row.note = (
        f"{n / total_s:.1f} studies/s end to end, ingest {n / sent_s:.1f}/s; "
        f"latency p50 {statistics.median(latencies) / 1000 if latencies else 0:.1f} s, "
        f"p95 {p95 or 0:.1f} s"
    )
    return row


def dashboard_restart_row(system: System, n: int, phi: PhiRegistry, timeout: float) -> Row:
    """Kill the dashboard (SIGKILL) while uploads are in flight, then start it again."""
    assert system.factory is not None and system.dashboard is not None
    row = Row("dashboard killed+restarted during uploads", system.profile.name)
    paths = write_studies(system.workdir / "studies" / "dashboard", n, phi, start=700_000)
    before = work_counters(system.factory)
    sender = HttpSender(
        system.base_url, system.accounts["feed"][2], paths, threads=2, give_up_after_s=timeout
    ).start()
    deadline = time.monotonic() + timeout
    while len(sender.outcome.image_ids) < max(1, n // 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    fault_at = time.monotonic()
    system.dashboard.kill()
    system.dashboard.start()
    system.wait_dashboard()
    sender.join(timeout)
    ids = sorted(set(sender.outcome.image_ids.values()))
    finished = wait_final(system.factory, ids, timeout)
    row.recover_s = time.monotonic() - fault_at if finished else None
    fill(row, system.factory, ids, n, before)
    row.failures += sender.outcome.errors[:5]
    row.note = f"uploader retried {sender.outcome.retries}x"
    return row


def http_bad_requests_row(system: System) -> Row:
    """Path traversal names, an oversized upload, malformed and mistyped bodies, no token."""
    assert system.factory is not None and system.settings is not None
    row = Row("bad HTTP uploads", system.profile.name)
    feed = system.accounts["feed"][2]
    auth = {"Authorization": f"Bearer {feed}"}
    checks: list[tuple[str, int, int]] = []  # (what, expected status, got)
    traversal = ["../../../../tmp/cxr-evil.png", "..\\..\\cxr-evil2.png", "/etc/cxr-evil3.png"]
    stored_names = []
    for n, name in enumerate(traversal):
        status, doc = upload(system.base_url, feed, name, png_bytes(chest_like(96, 800_000 + n)))
        checks.append((f"path traversal name {name!r}", 202, status))
        if doc.get("image_id"):
            with system.factory() as session:
                stored_names.append(session.get(Image, doc["image_id"]).filename)  # type: ignore[union-attr]
    if any(("/" in (s or "") or "\\" in (s or "") or ".." in (s or "")) for s in stored_names):
        row.failures.append(f"a stored name keeps a path: {stored_names}")
    too_big = b"\0" * (system.settings.max_request_mb * 1024 * 1024 + 1)
    body, ctype = multipart("big.dcm", too_big)
    checks.append(
        (
            "body over CXR_MAX_REQUEST_MB",
            413,
            _status(system, body, ctype, auth, refused_unread=True),
        )
    )
    body, ctype = multipart("file.dcm", b"\0" * (system.settings.max_file_mb * 1024 * 1024 + 1))
    checks.append(("file over CXR_MAX_FILE_MB", 413, _status(system, body, ctype, auth)))
    good, ctype = multipart("x.png", png_bytes(chest_like(96, 800_010)))
    truncated = good[: len(good) // 2]
    checks.append(("multipart cut off mid-file", 400, _status(system, truncated, ctype, auth)))
    checks.append(
        ("multipart without a boundary", 400, _status(system, good, "multipart/form-data", auth))
    )
    checks.append(("not multipart", 415, _status(system, b"{}", "application/json", auth)))
    checks.append(("no token", 401, _status(system, good, ctype, {})))
    rad = {"Authorization": f"Bearer {system.accounts['radiologist'][2]}"}
    checks.append(("a radiologist's token", 403, _status(system, good, ctype, rad)))
    row.sent = len(checks)
    row.failures += [
        f"{what}: expected {want}, got {got}" for what, want, got in checks if want != got
    ]
    row.note = f"{row.sent - len(row.failures)}/{row.sent} answered as documented"
    return row


def _status(
    system: System, body: bytes, ctype: str, headers: dict[str, str], refused_unread: bool = False
) -> int:
    try:
        return post(system.base_url, "/api/studies", body, {**headers, "Content-Type": ctype})[0]
    except OSError:
        # A body over the request limit may be refused before it is read: the connection
        # closes while we are still sending. Anywhere else a reset is a failure.
        return 413 if refused_unread else 0
