"""``cxr-triage watch DIR`` and ``cxr-triage dicom-listen``: the long-running ingestion sources.

Both are also children of ``cxr-triage run`` when ``CXR_WATCH_DIR`` or ``CXR_DICOM_PORT`` is
set (``source_children``), restarted by its supervisor like the worker and the dashboard.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline import migrate
from pipeline.intake import Intake
from pipeline.settings import ConfigError, Settings

log = logging.getLogger(__name__)


def source_children(settings: Settings) -> list[tuple[str, list[str]]]:
    """The source processes ``cxr-triage run`` supervises under these settings."""
    cli = [sys.executable, "-m", "pipeline.cli"]
    children = []
    if settings.watch_dir is not None:
        children.append(("watch", [*cli, "watch", str(settings.watch_dir)]))
    if settings.dicom_port:
        children.append(
            ("dicom-listen", [*cli, "dicom-listen", "--port", str(settings.dicom_port)])
        )
    return children


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.watch import FolderWatcher

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    migrate.upgrade(settings.db_url)
    settle = settings.watch_settle_ms / 1000 if args.settle is None else args.settle
    intake = Intake(settings)
    watcher = FolderWatcher(folder, intake, settle_s=settle)
    try:
        if args.once:
            # Everything present and settled now: wait out one settle interval, then ingest.
            watcher.ready()
            threading.Event().wait(settle)
            items = watcher.scan_once()
            print(f"ingested {len(items)} files from {folder}")
        else:
            print(f"watching {folder.resolve()} (Ctrl-C stops)", flush=True)
            watcher.run(_stop_on_signals())
    finally:
        intake.close()
    return 0


def cmd_dicom_listen(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.dicom_scp import start_listener

    changes: dict[str, Any] = {}
    if args.ae_title:
        changes["dicom_ae_title"] = args.ae_title
    if args.allow is not None:
        changes["dicom_allowed_aes"] = tuple(a.strip() for a in args.allow.split(",") if a.strip())
    settings = settings.with_(**changes)
    port = args.port or settings.dicom_port or 11112
    migrate.upgrade(settings.db_url)
    # pynetdicom logs every association at INFO; keep its records to warnings and errors.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    intake = Intake(settings)
    server = start_listener(settings, intake, args.host or settings.host, port)
    allowed = ",".join(settings.dicom_allowed_aes) or "any"
    print(f"DICOM listener {settings.dicom_ae_title} on port {port}, calling AEs: {allowed}",
          flush=True)  # fmt: skip
    try:
        _stop_on_signals().wait()
    finally:
        server.shutdown()
        intake.close()
    return 0


def register(sub: Any) -> None:
    """Add the ``watch`` and ``dicom-listen`` commands."""
    w = sub.add_parser("watch", help="ingest files dropped into a folder")
    w.add_argument("folder")
    w.add_argument("--settle", type=float, default=None,
                   help="seconds a file must stay unchanged (default CXR_WATCH_SETTLE_MS)")  # fmt: skip
    w.add_argument("--once", action="store_true", help="ingest what is there, then exit")
    w.set_defaults(handler=cmd_watch)
    d = sub.add_parser("dicom-listen", help="DICOM C-ECHO and C-STORE listener")
    d.add_argument("--port", type=int, default=None, help="default CXR_DICOM_PORT, else 11112")
    d.add_argument("--host", default=None, help="bind address (default CXR_HOST)")
    d.add_argument("--ae-title", default=None, help="our AE title (default CXR_DICOM_AE_TITLE)")
    d.add_argument("--allow", default=None,
                   help="comma-separated calling AE titles (default CXR_DICOM_ALLOWED_AES: any)")  # fmt: skip
    d.set_defaults(handler=cmd_dicom_listen)
