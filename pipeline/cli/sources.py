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
from pipeline.ingest.intake import Intake
from pipeline.settings import ConfigError, Settings

log = logging.getLogger(__name__)


def source_children(settings: Settings) -> list[tuple[str, list[str]]]:
    """The source processes ``cxr-triage run`` supervises under these settings."""
    cli = [sys.executable, "-m", "pipeline.cli.main"]
    children = []
    if settings.watch_dir is not None:
        children.append(("watch", [*cli, "watch", str(settings.watch_dir)]))
    if settings.dicom_port:
        children.append(
            ("dicom-listen", [*cli, "dicom-listen", "--port", str(settings.dicom_port)])
        )
    if settings.pull_from:
        children.append(("pull", [*cli, "pull", "--every", str(settings.pull_every_s)]))
    return children


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ingest.watch import FolderWatcher

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
    from pipeline.ingest.scp import start_listener

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
    print(
        f"DICOM listener {settings.dicom_ae_title} on port {port}, calling AEs: {allowed}",
        flush=True,
    )
    try:
        _stop_on_signals().wait()
    finally:
        server.shutdown()
        intake.close()
    return 0


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from pipeline.ingest.pull import pull_once
    from pipeline.settings import parse_node, parse_since

    source = args.source or settings.pull_from
    if not source:
        raise ConfigError("name the PACS: --from dicom://AE_TITLE@host:port (or CXR_PULL_FROM)")
    node = parse_node(source)
    since_text = args.since or settings.pull_since
    parse_since(since_text)  # a bad value fails before anything is asked
    modalities = settings.modalities
    if args.modality:
        modalities = tuple(m.strip().upper() for m in args.modality.split(",") if m.strip())
    migrate.upgrade(settings.db_url)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    intake = Intake(settings, lane=args.lane)
    stop = _stop_on_signals() if args.every else threading.Event()
    status = 0
    try:
        while True:
            try:
                report = pull_once(
                    intake,
                    node,
                    parse_since(since_text),
                    modalities,
                    move_to=args.move_to,
                    calling_ae=args.ae_title,
                )
                doc = report.as_json()
            except (ConnectionError, OSError, RuntimeError) as exc:
                doc, status = {"error": f"{type(exc).__name__}: {exc}"}, 2
            if args.every:
                log.info("pull from %s: %s", node, doc)
            elif args.json:
                print(json.dumps(doc))
            elif "error" in doc:
                print(f"cxr-triage pull: {doc['error']}", file=sys.stderr)
            else:
                print(
                    f"{doc['studies']} studies, {doc['instances']} instances in "
                    f"{', '.join(modalities)} since {since_text}: {doc['already_held']} already "
                    f"held, {doc['retrieved']} retrieved {doc['ingested']}, "
                    f"{doc['failed']} failed at the PACS"
                )
            if not args.every or stop.wait(args.every):
                break
    finally:
        intake.close()
    return status if not args.every else 0


def register(sub: Any) -> None:
    """Add the ``watch``, ``dicom-listen`` and ``pull`` commands."""
    w = sub.add_parser("watch", help="ingest files dropped into a folder")
    w.add_argument("folder")
    w.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds a file must stay unchanged (default CXR_WATCH_SETTLE_MS)",
    )
    w.add_argument("--once", action="store_true", help="ingest what is there, then exit")
    w.set_defaults(handler=cmd_watch)
    d = sub.add_parser("dicom-listen", help="DICOM C-ECHO and C-STORE listener")
    d.add_argument("--port", type=int, default=None, help="default CXR_DICOM_PORT, else 11112")
    d.add_argument("--host", default=None, help="bind address (default CXR_HOST)")
    d.add_argument("--ae-title", default=None, help="our AE title (default CXR_DICOM_AE_TITLE)")
    d.add_argument(
        "--allow",
        default=None,
        help="comma-separated calling AE titles (default CXR_DICOM_ALLOWED_AES: any)",
    )
    d.set_defaults(handler=cmd_dicom_listen)
    p = sub.add_parser("pull", help="query a PACS and ingest the studies not seen yet")
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="dicom://AE@HOST:PORT",
        help="the PACS (default CXR_PULL_FROM)",
    )
    p.add_argument(
        "--since", default=None, help="30m, 12h, 2d, 1w or YYYYMMDD (default CXR_PULL_SINCE, 1d)"
    )
    p.add_argument(
        "--modality",
        default=None,
        help="comma-separated modalities (default CXR_MODALITIES: CR,DX)",
    )
    p.add_argument(
        "--move-to",
        default=None,
        metavar="AE",
        help="retrieve by C-MOVE to this AE (our listener) instead of C-GET",
    )
    p.add_argument("--ae-title", default=None, help="our calling AE (default CXR_DICOM_AE_TITLE)")
    p.add_argument("--lane", choices=("live", "bulk"), default="live")
    p.add_argument(
        "--every",
        type=int,
        default=0,
        metavar="SECONDS",
        help="repeat every SECONDS until stopped (what `run` starts)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line: what was found and done")
    p.set_defaults(handler=cmd_pull)
