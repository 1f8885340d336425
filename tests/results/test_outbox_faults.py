"""The outbox under faults, with real processes: ``cxr-triage send-results`` SIGKILLed mid-send
and restarted, and the PACS (a real Orthanc) SIGKILLed mid-send and restarted, with no Redis at
all. Every object arrives once (counted by SOP Instance UID) and every outbox row ends ``sent``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.settings import Settings
from tests import pacs
from tests.results.support import (
    N_STUDIES,
    RedisTrap,
    SenderProcess,
    add_destination,
    all_sent,
    count_stored,
    dicom_dest,
    outbox,
    ready_uids,
    stored_uids,
    wait_for,
)


@dataclass
class Owed:
    """``N_STUDIES`` studies owed to a real Orthanc, and senders to start with no Redis."""

    settings: Settings  # the senders': Redis is a port that only counts connections
    factory: Any
    orthanc: pacs.OrthancServer
    redis_trap: RedisTrap
    start_sender: Callable[[Settings], SenderProcess]


@pytest.fixture
def owed(
    studies: tuple[Settings, Any],
    orthanc: pacs.OrthancServer,
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> Owed:
    settings, factory = studies
    add_destination(factory, settings, dicom_dest(orthanc))
    no_redis = settings.with_(redis_url=redis_trap.url)
    return Owed(no_redis, factory, orthanc, redis_trap, sender_factory)


# --------------------------------------------------------------------------- the sender killed


def test_sender_sigkilled_mid_send_restarts_and_each_object_arrives_once(owed: Owed) -> None:
    factory, orthanc = owed.factory, owed.orthanc
    env = owed.settings.with_(outbox_lease_s=2)
    first = owed.start_sender(env)
    wait_for(
        lambda: count_stored(orthanc) >= 1 or first.proc.poll() is not None,
        "the first object in Orthanc",
        120,
    )
    first.kill()
    at_kill = count_stored(orthanc)
    n = 2 * N_STUDIES
    assert 1 <= at_kill < n, first.output()  # killed mid-send
    left = [r for r in outbox(factory) if r.status != "sent"]
    assert len(outbox(factory)) == n and left and {r.status for r in left} == {"sending"}
    second = owed.start_sender(env)
    wait_for(all_sent(factory, n), "every row sent after the restart", 120, every=0.2)
    assert second.proc.poll() is None  # still running; SIGTERM is tested below
    uids = stored_uids(orthanc)
    assert uids == ready_uids(factory) and len(uids) == len(set(uids)) == n
    assert count_stored(orthanc) == n  # nothing else, nothing twice
    attempts = [r.attempts for r in outbox(factory)]
    # the rows the killed sender held were claimed once more after its lease lapsed
    assert attempts.count(2) == len(left) and attempts.count(1) == n - len(left)
    assert owed.redis_trap.connections == 0, "the sender opened a connection to Redis"


# --------------------------------------------------------------------------- the PACS killed


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_pacs_sigkilled_mid_send_then_restarted_each_object_arrives_once(owed: Owed) -> None:
    factory, orthanc = owed.factory, owed.orthanc
    sender = owed.start_sender(owed.settings)
    wait_for(lambda: count_stored(orthanc) >= 1, "the first object in Orthanc", 120)
    assert orthanc.proc is not None
    orthanc.proc.kill()
    orthanc.proc.wait()
    orthanc.proc = None
    n = 2 * N_STUDIES
    failed = wait_for(
        lambda: [r for r in outbox(factory) if r.status == "pending" and r.last_error],
        "the sender to see the PACS gone",
        60,
    )
    assert any(
        "association" in (r.last_error or "") or "C-STORE" in (r.last_error or "") for r in failed
    ), [r.last_error for r in failed]
    assert [r.status for r in outbox(factory)].count("sent") < n
    orthanc.start()  # same ports, same storage: the PACS is back with what it had stored
    wait_for(all_sent(factory, n), "every row sent once the PACS is back", 120, every=0.2)
    assert sender.proc.poll() is None
    uids = stored_uids(orthanc)
    assert uids == ready_uids(factory) and len(uids) == len(set(uids)) == n
    assert count_stored(orthanc) == n
    assert max(r.attempts for r in outbox(factory)) >= 2  # retried with backoff
    assert owed.redis_trap.connections == 0
