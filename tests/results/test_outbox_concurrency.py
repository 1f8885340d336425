"""Two senders at once on PostgreSQL never send a row twice; concurrent claims are disjoint and a
lapsed claim is fenced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from pipeline.cli.outbox import model_info
from pipeline.db import session_scope
from pipeline.models import utcnow
from pipeline.results.claims import Outcome, claim_due, record, renew
from pipeline.results.destinations import parse_url
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.results.outbox import queue_results
from pipeline.settings import Settings
from pipeline.tables_results import OutboxItem
from tests import pacs
from tests.results.support import (
    N_STUDIES,
    RedisTrap,
    SenderProcess,
    add_destination,
    all_sent,
    outbox,
    ready_uids,
    wait_for,
)

# --------------------------------------------------------------------------- two senders at once


class RecordingSCP:
    """A real Storage SCP (pynetdicom) that keeps every C-STORE it receives, duplicates too."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        self.received: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="RECORDER")
        for sop in (SOP_SR, SOP_SC):
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        self.port = pacs.free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(0.01)  # a PACS takes a moment per object: the senders overlap
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_senders_at_once_never_send_a_row_twice(
    studies: tuple[Settings, Any],
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> None:
    settings, factory = studies
    scps = [RecordingSCP() for _ in range(3)]
    try:
        for scp in scps:
            add_destination(factory, settings, parse_url(f"dicom://RECORDER@127.0.0.1:{scp.port}"))
        env = settings.with_(redis_url=redis_trap.url)
        senders = [sender_factory(env), sender_factory(env)]  # both queue and send
        n = 2 * N_STUDIES * len(scps)
        wait_for(all_sent(factory, n), "every row sent", 180, every=0.2)
        assert [s.stop() for s in senders] == [0, 0]
    finally:
        for scp in scps:
            scp.stop()
    uids = ready_uids(factory)
    assert len(uids) == 2 * N_STUDIES  # one SR and one capture per study, made once
    for scp in scps:
        assert sorted(scp.received) == uids  # each object once per destination
    assert {r.attempts for r in outbox(factory)} == {1}  # no row was ever claimed twice


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_claims_are_disjoint_and_a_lapsed_claim_is_fenced(
    studies: tuple[Settings, Any],
) -> None:
    settings, factory = studies
    for port in (1, 2, 3):
        add_destination(factory, settings, parse_url(f"dicom://P{port}@127.0.0.1:{port}"))
    queue_results(factory, model_info(settings))
    n = 2 * N_STUDIES * 3
    barrier = threading.Barrier(4)
    claims: list[dict[int, int]] = []

    def claim() -> None:
        barrier.wait()
        with session_scope(factory) as session:
            claims.append(claim_due(session, limit=n))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [i for c in claims for i in c]
    assert len(claims) == 4 and sorted(ids) == sorted({r.id for r in outbox(factory)})
    assert len(ids) == len(set(ids)) == n  # every row claimed, by exactly one
    # A sender whose lease lapsed and whose row another claimed can neither renew nor record.
    (item_id, attempt), *_ = next(c for c in claims if c).items()
    with session_scope(factory) as session:
        session.get(OutboxItem, item_id).claimed_until = utcnow() - timedelta(seconds=1)
    with session_scope(factory) as session:
        again = claim_due(session, limit=n)
    assert again == {item_id: attempt + 1}
    with session_scope(factory) as session:
        assert renew(session, {item_id: attempt}) == 0
        assert record(session, item_id, Outcome(True), attempt=attempt) == "gone"
    with session_scope(factory) as session:
        assert renew(session, again) == 1
        assert record(session, item_id, Outcome(True), attempt=attempt + 1) == "sent"
