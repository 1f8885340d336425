"""``cxr-triage send-results``: the sender loop (a child of ``cxr-triage run``).

Each pass syncs the environment's destinations (every minute), queues what finished studies
owe (``pipeline.results.outbox.queue_results``), then sends what is due, recording each object's
outcome the moment it is known and renewing the lease on the rest. Critical alerts have a
loop of their own (every second), so a slow or hung PACS never holds one back. It needs only
the database: it opens no connection to Redis, which may be down.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pipeline import migrate
from pipeline.db import dispose_engines, session_factory, session_scope
from pipeline.results.claims import Outcome, claim_due, record, renew
from pipeline.results.destinations import ALERT_KINDS, PACS_KINDS, DestinationError, sync_env
from pipeline.results.outbox import queue_results
from pipeline.results.snapshots import ModelInfo, policy
from pipeline.settings import Settings
from pipeline.tables_results import Destination, OutboxItem, ResultObject

log = logging.getLogger(__name__)
SYNC_EVERY_S = 60.0
ALERT_EVERY_S = 1.0
# The frequent passes look at studies finished in the last RECENT_S; a full pass over every
# finished study runs at start and every FULL_PASS_EVERY_S, for anything older still owed.
RECENT_S = 600.0
FULL_PASS_EVERY_S = 300.0


def model_info(settings: Settings) -> ModelInfo:
    """The loaded weights' version, name and ranking policy (read without torch)."""
    from pipeline.classifier.weights import describe_weights, read_meta

    model = describe_weights(settings)
    meta = read_meta(settings.weights_path)
    temperature = meta.get("temperature")
    version, params = policy(model, float(temperature) if temperature is not None else None)
    return ModelInfo(
        str(model["version"]),
        f"cxr-triage {model.get('arch') or 'model'}",
        version,
        params,
        settings.weights_path,
    )


def send_pass(
    factory: sessionmaker[Session], settings: Settings, kinds: tuple[str, ...] | None = None
) -> dict[str, int]:
    """Send every due outbox row (of destinations of these ``kinds``) once; return counts by
    outcome. The claims not yet recorded are renewed at least every third of the lease."""
    from pipeline.results.payloads import build_payload

    lease_s = float(settings.outbox_lease_s)
    counts: dict[str, int] = defaultdict(int)
    with session_scope(factory) as session:
        claims = claim_due(session, kinds=kinds, lease_s=lease_s)
    if not claims:
        return dict(counts)
    held = dict(claims)
    renewed = [time.monotonic()]

    def keep() -> None:
        if time.monotonic() - renewed[0] >= lease_s / 3:
            with session_scope(factory) as s:
                renew(s, held, lease_s)
            renewed[0] = time.monotonic()

    def report(item_id: int, outcome: Outcome) -> None:
        with session_scope(factory) as s:
            counts[record(s, item_id, outcome, attempt=held.pop(item_id, None))] += 1
        if not outcome.ok:
            log.warning("outbox item %d not delivered: %s", item_id, outcome.error)
        keep()

    by_dest: dict[int, list[int]] = defaultdict(list)
    with session_scope(factory) as session:
        for item in session.query(OutboxItem).filter(OutboxItem.id.in_(list(claims))):
            by_dest[item.destination_id].append(item.id)
    for dest_id, item_ids in sorted(by_dest.items()):
        with session_scope(factory) as session:
            dest = session.get(Destination, dest_id)
            assert dest is not None
            session.expunge(dest)
            payloads: list[tuple[int, str, ResultObject, bytes]] = []
            for item_id in sorted(item_ids):
                row = session.get(OutboxItem, item_id)
                obj = session.get(ResultObject, row.object_id) if row else None
                if obj is None:
                    continue
                try:
                    payloads.append((item_id, obj.kind, obj, build_payload(session, obj)))
                except (LookupError, ValueError, KeyError) as exc:
                    payloads.append((item_id, "error", obj, str(exc).encode()))
                keep()
            for *_, obj, _ in payloads:
                session.expunge(obj)
        _send_destination(settings, dest, payloads, report)
    return dict(counts)


def _send_destination(
    settings: Settings,
    dest: Destination,
    payloads: list[tuple[int, str, ResultObject, bytes]],
    report: Any,
) -> None:
    from pipeline.results import senders
    from pipeline.results.payloads import oru_message

    good = []
    for item_id, kind, obj, data in payloads:
        if kind == "error":
            report(item_id, Outcome(False, f"cannot build: {data.decode()}", transient=False))
        else:
            good.append((item_id, obj, data))
    try:
        if dest.kind == "dicom":
            senders.send_dicom(settings, dest, [(i, d) for i, _, d in good], report)
        elif dest.kind == "dicomweb":
            for item_id, obj, data in good:
                study_uid = obj.snapshot["study_instance_uid"]
                senders.send_stow(settings, dest, study_uid, item_id, data, report)
        elif dest.kind == "webhook":
            for item_id, _, data in good:
                senders.send_webhook(settings, dest, item_id, data, report)
        elif dest.kind == "mllp":
            for item_id, obj, _ in good:
                senders.send_mllp(dest, item_id, oru_message(obj), report)
    except DestinationError as exc:  # e.g. a secret that no longer decrypts
        for item_id, _, _ in good:
            report(item_id, Outcome(False, str(exc)))


def _add(into: dict[str, Any], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


class Sender:
    """The loop's state: the session factory, the model it reports, when it last synced."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.factory = session_factory(settings)
        self.model = model_info(settings)
        self.synced = 0.0
        self.sync_lock = threading.Lock()
        self.full_at: dict[str, float] = {}  # loop -> monotonic time of its last full pass

    def sync(self) -> None:
        """Sync the environment's destinations (every minute)."""
        with self.sync_lock:
            if time.monotonic() - self.synced >= SYNC_EVERY_S or not self.synced:
                with session_scope(self.factory) as session:
                    sync_env(session, self.settings)
                self.synced = time.monotonic()

    def _done_since(self, loop: str) -> datetime | None:
        """None (a full pass) at start and every FULL_PASS_EVERY_S, else the recent window."""
        now = time.monotonic()
        if loop not in self.full_at or now - self.full_at[loop] >= FULL_PASS_EVERY_S:
            self.full_at[loop] = now
            return None
        return datetime.now(UTC) - timedelta(seconds=RECENT_S)

    def alerts(self) -> dict[str, Any]:
        """Queue and send the critical alerts owed (the alert loop's pass)."""
        self.sync()
        queued = queue_results(
            self.factory, self.model, kinds=ALERT_KINDS, done_since=self._done_since("alerts")
        )
        return {"queued": queued, "sent": send_pass(self.factory, self.settings, ALERT_KINDS)}

    def results(self) -> dict[str, Any]:
        """Queue and send the SRs and captures owed (the PACS loop's pass)."""
        self.sync()
        queued = queue_results(
            self.factory, self.model, kinds=PACS_KINDS, done_since=self._done_since("results")
        )
        return {"queued": queued, "sent": send_pass(self.factory, self.settings, PACS_KINDS)}

    def once(self) -> dict[str, Any]:
        """One pass of each: alerts first, then the PACS objects; counts added up."""
        out: dict[str, Any] = {"queued": {}, "sent": {}}
        for part in (self.alerts(), self.results()):
            _add(out["queued"], part["queued"])
            _add(out["sent"], part["sent"])
        return out

    def loop(self, stop: threading.Event, every: float) -> None:
        """Until ``stop``: the alert loop in a thread of its own, the PACS loop here."""

        def run(step: Any, pause: float) -> None:
            while not stop.is_set():
                try:
                    step()
                except Exception:  # the database away: log and try again next pass
                    log.exception("send-results pass failed; will retry")
                stop.wait(pause)

        alerts = threading.Thread(
            target=run, args=(self.alerts, min(every, ALERT_EVERY_S)), name="alerts", daemon=True
        )
        alerts.start()
        run(self.results, every)
        alerts.join(TIMEOUT_JOIN_S)

    def close(self) -> None:
        dispose_engines()


TIMEOUT_JOIN_S = 60.0


def cmd_send_results(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    sender = Sender(settings)
    try:
        if args.once:
            print(json.dumps(sender.once()) if args.json else sender.once(), flush=True)
            return 0
        stop = threading.Event()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(
            f"sending results every {args.every:g} s, alerts every "
            f"{min(args.every, ALERT_EVERY_S):g} s (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        sender.loop(stop, args.every)
    finally:
        sender.close()
    return 0


def sender_command(settings: Settings) -> list[str]:
    """The ``send-results`` child of ``cxr-triage run``."""
    return [sys.executable, "-m", "pipeline.cli.main", "send-results"]


def register(sub: Any) -> None:
    """Add ``send-results`` to the CLI."""
    p = sub.add_parser("send-results", help="send SR, CAM captures and alerts to destinations")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--every", type=float, default=2.0, help="seconds between passes (2)")
    p.add_argument("--json", action="store_true", help="with --once: one line of JSON")
    p.set_defaults(handler=cmd_send_results)
