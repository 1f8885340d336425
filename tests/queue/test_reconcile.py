"""Persist first: work the queue lost is re-sent from the database."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.models import Image, Prediction
from pipeline.queue.dispatch import payload_key, put_payloads, redis_client
from pipeline.service.recovery import reconcile_once
from tests.conftest import run_cli
from tests.queue.ingested import ingest_offline, wait_all_final

pytestmark = pytest.mark.e2e


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
    factory = ingest_offline(settings, study_folder)
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
