"""Persist first: work the queue lost is re-sent from the database."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from sqlalchemy import func, select

from pipeline.cli.main import reconcile_once
from pipeline.db import make_engine, make_session_factory
from pipeline.models import Image, Prediction, Study
from pipeline.queue.dispatch import payload_key, put_payloads, redis_client
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def wait_all_final(factory, timeout: float = 120) -> dict[str, int]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as session:
            counts = dict(
                session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
            )
        if not set(counts) & {"queued", "processing", "received"}:
            return counts
        time.sleep(0.3)
    raise TimeoutError(f"studies not final: {counts}")


def test_ingest_without_a_system_is_processed_once_the_reconciler_runs(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    offline = settings.with_(redis_url=None)
    proc = run_cli(["ingest", str(study_folder), "--json"], offline)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["accepted"] == 3 and {s["status"] for s in doc["studies"]} == {"queued", "rejected"}
    assert "will be classified when `cxr-triage run` starts" in proc.stderr

    worker_factory(settings)
    # What `cxr-triage run` does at start: re-send everything queued whose payload is absent.
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0) == {
        "requeued": 3,
        "failed": 0,
    }
    factory = make_session_factory(make_engine(settings.db_url))
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    # Nothing is left to re-send, and a second pass sends nothing twice.
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0) == {
        "requeued": 0,
        "failed": 0,
    }


def test_flushall_loses_nothing_and_nothing_is_doubled(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    # Ingest while no worker runs, so the messages sit in Redis; then Redis loses everything.
    proc = run_cli(["ingest", str(study_folder), "--json"], settings)
    assert proc.returncode == 0, proc.stderr
    client = redis.Redis.from_url(settings.redis_url)
    assert client.llen("cxr.live") == 3
    # A queued image whose message is in Redis is waiting, not lost: not re-sent.
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 0
    client.flushall()
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 3
    # The re-sent messages are in Redis again, so an immediate second pass sends nothing.
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 0
    worker_factory(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 3
        assert session.scalar(select(func.count(Image.id)).where(Image.status == "done")) == 3
    client.close()


def test_a_payload_whose_message_was_never_sent_is_re_sent(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    # The sender died after writing the payloads, before publishing the messages.
    offline = settings.with_(redis_url=None)
    assert run_cli(["ingest", str(study_folder), "--json"], offline).returncode == 0
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        queued = list(session.scalars(select(Image.id).where(Image.status == "queued")))
    assert len(queued) == 3
    client = redis_client(settings.redis_url)
    put_payloads(client, {i: np.zeros((8, 8), np.uint8) for i in queued}, 600)
    assert client.llen("cxr.live") == 0
    assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 3
    assert client.llen("cxr.live") == 3
    worker_factory(settings)
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    assert client.exists(*[payload_key(i) for i in queued]) == 0  # finished: payloads dropped
    client.close()


def _all_done_with_one_result_each(settings, worker_factory) -> None:  # type: ignore[no-untyped-def]
    """Start a worker; the study folder's 3 images end done with one prediction each."""
    worker_factory(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 3


def test_a_message_held_by_a_consumer_is_waiting_and_one_lost_in_between_is_re_sent(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    """kombu takes a message off its queue (BRPOP) and then records it as unacknowledged in a
    second round trip; a Redis crash between the two loses the message while its payload
    stays. A message held unacknowledged is in flight; one in neither place is re-sent."""
    from kombu import Connection

    assert run_cli(["ingest", str(study_folder), "--json"], settings).returncode == 0
    client = redis_client(settings.redis_url)
    assert client.llen("cxr.live") == 3
    with Connection(settings.redis_url) as conn:
        held = conn.SimpleQueue("cxr.live", no_ack=False).get(timeout=10)  # reserved, not acked
        assert client.llen("cxr.live") == 2 and client.hlen("unacked") == 1
        assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 0
        # The crash window: the message is neither queued nor recorded as unacknowledged.
        client.delete("unacked", "unacked_index")
        assert reconcile_once(settings, settings.redis_url, stuck_after_s=0)["requeued"] == 1
        assert held.payload is not None
    _all_done_with_one_result_each(settings, worker_factory)
    client.close()


def test_a_message_a_dead_worker_held_unclaimed_is_re_sent_after_the_grace(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    """A worker SIGKILLed while buffering a batch leaves its messages in kombu's unacked hash,
    never claimed; kombu would hand them out again only after its visibility timeout (at least
    300 s). Once held longer than the grace they are re-sent, and each image gets one result."""
    from kombu import Connection

    assert run_cli(["ingest", str(study_folder), "--json"], settings).returncode == 0
    client = redis_client(settings.redis_url)
    with Connection(settings.redis_url) as conn:
        held = conn.SimpleQueue("cxr.live", no_ack=False).get(timeout=10)  # then never acked
        assert client.hlen("unacked") == 1
        fresh = reconcile_once(settings, settings.redis_url, stuck_after_s=0, held_after_s=30)
        assert fresh["requeued"] == 0  # held for less than the grace: a live worker's buffer
        time.sleep(1.5)
        stale = reconcile_once(settings, settings.redis_url, stuck_after_s=0, held_after_s=1)
        assert stale["requeued"] == 1
        assert held.payload is not None
        assert client.llen("cxr.live") == 3  # the two never taken, and the re-sent one
    _all_done_with_one_result_each(settings, worker_factory)
    client.close()


def test_users_cli(settings) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.conftest import REPO, settings_env

    def users(*args: str, stdin: str = "") -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli.main", "users", *args],
            input=stdin,
            env=settings_env(settings),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = users(
        "create", "alice", "--role", "radiologist", "--password-stdin", stdin="s3cret-pass\n"
    )
    assert ok.returncode == 0 and "created radiologist alice" in ok.stdout
    again = users("create", "alice", "--role", "admin", "--password-stdin", stdin="another-pass\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    short = users("create", "bob", "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    token = users("token", "alice")
    assert token.returncode == 0 and token.stdout.strip().startswith("cxr_")


def test_expired_claims_are_those_of_workers_without_a_heartbeat_or_restarted_since() -> None:
    """The heartbeat rule alone: a claim is dead when its worker's heartbeat has expired, or
    when the heartbeat under that name comes from a process started after the claim."""
    from datetime import UTC, datetime

    from pipeline.queue.reconcile import expired_claims

    t = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC).timestamp()
    at = datetime.fromtimestamp(t, UTC)
    claims = [
        (1, "alive@h", at),  # its worker beats, and started before the claim
        (2, "gone@h", at),  # no heartbeat: the key expired
        (3, "restarted@h", at),  # the process beating under the name started after the claim
        (4, "legacy@h", at),  # a heartbeat without a start time: alive
    ]
    beats = {"alive@h": t - 60, "gone@h": None, "restarted@h": t + 5, "legacy@h": 0.0}
    assert expired_claims(claims, beats) == [2, 3]
    assert expired_claims(claims, {}) == [1, 2, 3, 4]  # no heartbeat from anyone


def test_what_dead_workers_claimed_is_re_sent_at_once_and_nothing_finished_is(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """requeue_dead_workers on a real database and Redis, far inside the stuck timeout: the
    claims of a worker named dead and of one whose heartbeat expired go back to the queue with
    a fresh message; a live worker's claim and a done image stay as they are."""
    from pipeline.cli.main import rescue_dead_workers
    from pipeline.models import utcnow
    from pipeline.queue.dispatch import HEARTBEAT_PREFIX

    assert (
        run_cli(["ingest", str(study_folder), "--json"], settings.with_(redis_url=None)).returncode
        == 0
    )
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        images = list(session.scalars(select(Image).where(Image.status == "queued")))
        assert len(images) == 3
        # A final image under the dead worker's name (its work was done) is never touched.
        final = session.scalars(select(Image).where(Image.status == "rejected")).one()
        final.worker = "killed@h"
        now = utcnow()
        for img, (status, worker) in zip(
            images,
            [("processing", "killed@h"), ("processing", "silent@h"), ("processing", "busy@h")],
            strict=True,
        ):
            img.status, img.worker, img.started_at, img.attempts = status, worker, now, 1
        session.commit()
        ids = [i.id for i in images]
    client = redis_client(settings.redis_url)
    client.set(f"{HEARTBEAT_PREFIX}busy@h", json.dumps({"since": time.time() - 60}), ex=15)
    client.set(f"{HEARTBEAT_PREFIX}killed@h", json.dumps({"since": time.time() - 60}), ex=15)
    assert settings.stuck_after_s == 600  # the shipped default: the timeout is not what acts
    # killed@h still beats (its key has not expired yet), but its supervisor saw it exit.
    assert rescue_dead_workers(settings, settings.redis_url, dead=("killed@h",)) == {
        "requeued": 2,
        "failed": 0,
    }
    with factory() as session:
        state = {i.id: (i.status, i.worker) for i in session.scalars(select(Image))}
    assert state == {
        ids[0]: ("queued", None),
        ids[1]: ("queued", None),
        ids[2]: ("processing", "busy@h"),
        final.id: ("rejected", "killed@h"),
    }
    assert client.llen("cxr.live") == 2
    # Sent once: the re-sent images are queued with a message now, not claimed by anyone.
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 0
    client.delete(f"{HEARTBEAT_PREFIX}busy@h")  # busy@h stops beating: now it is dead too
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 1
    assert client.llen("cxr.live") == 3
    client.close()


def test_a_dead_worker_that_had_finished_its_batch_has_nothing_re_sent(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    """Images a worker finished are done: its death re-sends none of them."""
    from pipeline.cli.main import rescue_dead_workers

    assert run_cli(["ingest", str(study_folder), "--json"], settings).returncode == 0
    worker = worker_factory(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    with factory() as session:
        names = set(session.scalars(select(Image.worker).where(Image.status == "done")))
    assert len(names) == 1 and None not in names  # each done image names its worker
    worker.stop()
    assert rescue_dead_workers(settings, settings.redis_url, dead=tuple(names)) == {
        "requeued": 0,
        "failed": 0,
    }
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 3


def test_a_worker_whose_batch_runs_past_the_hung_timeout_has_its_claims_re_sent(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """A worker that still beats, but whose heartbeat says its batch started more than
    CXR_HUNG_AFTER_S ago (a forward pass that never returns), is hung: its claims are re-sent.
    One whose batch started just now keeps its claims."""
    from pipeline.cli.main import rescue_dead_workers
    from pipeline.models import utcnow
    from pipeline.queue.dispatch import HEARTBEAT_PREFIX

    assert settings.hung_after_s == 30  # the shipped default
    assert (
        run_cli(["ingest", str(study_folder), "--json"], settings.with_(redis_url=None)).returncode
        == 0
    )
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        images = list(session.scalars(select(Image).where(Image.status == "queued")))
        for img, worker in zip(images, ["stalled@h", "working@h", "idle@h"], strict=True):
            img.status, img.worker, img.started_at, img.attempts = "processing", worker, utcnow(), 1
        session.commit()
        ids = [i.id for i in images]
    client = redis_client(settings.redis_url)
    start = time.time() - 120
    for name, busy in (
        ("stalled@h", time.time() - 31),
        ("working@h", time.time() - 2),
        ("idle@h", None),
    ):
        client.set(
            f"{HEARTBEAT_PREFIX}{name}", json.dumps({"since": start, "busy_since": busy}), ex=15
        )
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 1
    with factory() as session:
        state = {i.id: (i.status, i.worker) for i in session.scalars(select(Image)) if i.id in ids}
    assert state == {
        ids[0]: ("queued", None),
        ids[1]: ("processing", "working@h"),
        ids[2]: ("processing", "idle@h"),
    }
    for name in ("stalled@h", "working@h", "idle@h"):
        client.delete(f"{HEARTBEAT_PREFIX}{name}")
    client.close()
