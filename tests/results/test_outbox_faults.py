"""The outbox under faults, with real processes: ``cxr-triage send-results`` SIGKILLed mid-send
and restarted, the PACS (a real Orthanc) SIGKILLed mid-send and restarted, two senders at once
on PostgreSQL, and no Redis at all. Every object arrives once (counted by SOP Instance UID) and
every outbox row ends ``sent``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.cli.outbox import model_info
from pipeline.db import make_engine, make_session_factory, session_scope
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Destination, OutboxItem, ResultObject, utcnow
from pipeline.queue.dispatch import redis_client
from pipeline.results.destinations import Spec, apply, parse_url
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.results.outbox import Outcome, claim_due, queue_results, record, renew
from pipeline.settings import Settings
from tests import pacs
from tests.conftest import REPO, chest_like, dicom_bytes, settings_env

N_STUDIES = 8  # an SR and a capture each: 16 objects per destination


class RedisTrap:
    """A TCP port posing as Redis that counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def redis_trap() -> Iterator[RedisTrap]:
    trap = RedisTrap()
    yield trap
    trap.close()


@pytest.fixture
def studies(settings: Settings, database_url: str, tmp_path: Path) -> tuple[Settings, Any]:
    """``N_STUDIES`` DICOM studies ingested and classified (real Redis), on both databases."""
    settings = settings.with_(database_url=database_url)
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(N_STUDIES):
        (folder / f"s{n:02d}.dcm").write_bytes(dicom_bytes(chest_like(seed=n)))
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [folder], Limits())
    ids = [i.image_id for i in report.accepted]
    assert len(ids) == N_STUDIES
    result = classify_images(
        factory, redis_client(settings.redis_url), Classifier(settings.weights, "cpu", 1), ids
    )
    assert sorted(result.done) == sorted(ids)
    return settings, factory


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[pacs.OrthancServer]:
    if pacs.missing():
        pytest.skip(pacs.missing() or "")
    server = pacs.OrthancServer(tmp_path / "orthanc").start()
    yield server
    if server.proc is not None:
        server.proc.kill()  # its storage is thrown away: no need for a clean stop
        server.proc.wait()


def add_destination(factory: Any, settings: Settings, spec: Spec) -> int:
    with session_scope(factory) as session:
        row = apply(settings, Destination(source="console", enabled=True), spec)
        row.created_at = utcnow() - timedelta(days=1)  # before the studies finished
        session.add(row)
        session.flush()
        return int(row.id)


class SenderProcess:
    """A real ``cxr-triage send-results`` process."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli.main", "send-results", "--every", "0.5"],
                env=settings_env(settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def sender_factory(tmp_path: Path) -> Iterator[Callable[[Settings], SenderProcess]]:
    started: list[SenderProcess] = []

    def start(settings: Settings) -> SenderProcess:
        started.append(SenderProcess(settings, tmp_path / f"sender-{len(started)}.log"))
        return started[-1]

    yield start
    for sender in started:
        if sender.proc.poll() is None:
            sender.proc.kill()
            sender.proc.wait()


def wait_for(check: Callable[[], Any], what: str, timeout: float, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def stored_uids(orthanc: pacs.OrthancServer) -> list[str]:
    """SOP Instance UIDs of our SRs and captures in Orthanc, one entry per stored instance."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    tags = [orthanc.get(f"/instances/{i['ID']}/simplified-tags") for i in found]
    return sorted(t["SOPInstanceUID"] for t in tags if t.get("SOPClassUID") in (SOP_SR, SOP_SC))


def count_stored(orthanc: pacs.OrthancServer) -> int:
    try:
        return int(orthanc.get("/statistics")["CountInstances"])
    except OSError:
        return 0


def rows(factory: Any) -> list[OutboxItem]:
    with factory() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def ready_uids(factory: Any) -> list[str]:
    with factory() as session:
        return sorted(
            session.scalars(
                select(ResultObject.uid).where(
                    ResultObject.status == "ready", ResultObject.kind.in_(("sr", "sc"))
                )
            )
        )


def all_sent(factory: Any, n: int) -> Callable[[], bool]:
    return lambda: [r.status for r in rows(factory)] == ["sent"] * n


# --------------------------------------------------------------------------- the sender killed


def test_sender_sigkilled_mid_send_restarts_and_each_object_arrives_once(
    studies: tuple[Settings, Any],
    orthanc: pacs.OrthancServer,
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> None:
    settings, factory = studies
    add_destination(
        factory, settings, parse_url(f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    )
    # No Redis: the sender is pointed at a port that only counts connections.
    env = settings.with_(redis_url=redis_trap.url, outbox_lease_s=2)
    first = sender_factory(env)
    wait_for(
        lambda: count_stored(orthanc) >= 1 or first.proc.poll() is not None,
        "the first object in Orthanc",
        120,
    )
    first.kill()
    at_kill = count_stored(orthanc)
    n = 2 * N_STUDIES
    assert 1 <= at_kill < n, first.output()  # killed mid-send
    left = [r for r in rows(factory) if r.status != "sent"]
    assert len(rows(factory)) == n and left and {r.status for r in left} == {"sending"}
    second = sender_factory(env)
    wait_for(all_sent(factory, n), "every row sent after the restart", 120, every=0.2)
    assert second.proc.poll() is None  # still running; SIGTERM is tested below
    uids = stored_uids(orthanc)
    assert uids == ready_uids(factory) and len(uids) == len(set(uids)) == n
    assert count_stored(orthanc) == n  # nothing else, nothing twice
    attempts = [r.attempts for r in rows(factory)]
    # the rows the killed sender held were claimed once more after its lease lapsed
    assert attempts.count(2) == len(left) and attempts.count(1) == n - len(left)
    assert redis_trap.connections == 0, "the sender opened a connection to Redis"


# --------------------------------------------------------------------------- the PACS killed


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_pacs_sigkilled_mid_send_then_restarted_each_object_arrives_once(
    studies: tuple[Settings, Any],
    orthanc: pacs.OrthancServer,
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> None:
    settings, factory = studies
    add_destination(
        factory, settings, parse_url(f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    )
    sender = sender_factory(settings.with_(redis_url=redis_trap.url))
    wait_for(lambda: count_stored(orthanc) >= 1, "the first object in Orthanc", 120)
    assert orthanc.proc is not None
    orthanc.proc.kill()
    orthanc.proc.wait()
    orthanc.proc = None
    n = 2 * N_STUDIES
    failed = wait_for(
        lambda: [r for r in rows(factory) if r.status == "pending" and r.last_error],
        "the sender to see the PACS gone",
        60,
    )
    assert any(
        "association" in (r.last_error or "") or "C-STORE" in (r.last_error or "") for r in failed
    ), [r.last_error for r in failed]
    assert [r.status for r in rows(factory)].count("sent") < n
    orthanc.start()  # same ports, same storage: the PACS is back with what it had stored
    wait_for(all_sent(factory, n), "every row sent once the PACS is back", 120, every=0.2)
    assert sender.proc.poll() is None
    uids = stored_uids(orthanc)
    assert uids == ready_uids(factory) and len(uids) == len(set(uids)) == n
    assert count_stored(orthanc) == n
    assert max(r.attempts for r in rows(factory)) >= 2  # retried with backoff
    assert redis_trap.connections == 0


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
    assert {r.attempts for r in rows(factory)} == {1}  # no row was ever claimed twice


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
    assert len(claims) == 4 and sorted(ids) == sorted({r.id for r in rows(factory)})
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


# --------------------------------------------------------------------------- alerts come first


def test_a_hung_pacs_does_not_hold_back_a_critical_alert(
    populated: Any,
    settings: Settings,
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> None:
    """The PACS accepts the connection and never answers (the sender waits out its 30 s
    timeouts); the critical alert goes out on its own loop meanwhile."""
    from tests.results.test_results_out import MllpListener, make_critical

    study = make_critical(populated)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel accepts; nobody ever reads or answers
    listener = MllpListener()
    try:
        add_destination(
            populated, settings, parse_url(f"dicom://HUNG@127.0.0.1:{hung.getsockname()[1]}")
        )
        sender = sender_factory(settings.with_(redis_url=redis_trap.url))
        wait_for(
            lambda: {r.status for r in rows(populated)} == {"sending"},
            "the PACS rows claimed and stuck",
            60,
            every=0.1,
        )
        add_destination(populated, settings, parse_url(f"mllp://127.0.0.1:{listener.port}"))
        wait_for(lambda: listener.messages, "the alert at the MLLP listener", 25, every=0.1)
        with populated() as session:
            alert_row = (
                select(OutboxItem.status)
                .join(Destination, Destination.id == OutboxItem.destination_id)
                .where(Destination.kind == "mllp")
            )
            wait_for(
                lambda: (
                    session.scalar(alert_row.execution_options(populate_existing=True)) == "sent"
                ),
                "the ACK recorded",
                25,
                every=0.1,
            )
        by_kind = sorted((r.destination_id, r.status) for r in rows(populated))
        assert by_kind == [(1, "sending"), (1, "sending"), (2, "sent")]  # the PACS still hangs
        sender.kill()  # rather than wait out the hung association
    finally:
        listener.stop()
        hung.close()
    assert len(listener.messages) == 1 and "ACC-0001" in listener.messages[0]
    assert study.triage_class == "critical" and redis_trap.connections == 0
