"""Work in flight: model-ready payloads in Redis and task messages sent by name.

The payload is the uint8 model input (a few tens of kB). It is rebuilt from the preview stored
in the database whenever Redis has lost it, so Redis holds nothing that cannot be recreated.
What is in flight (messages waiting or held, worker heartbeats) is read by pipeline.queue.inflight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis

log = logging.getLogger(__name__)

TASK_CLASSIFY = "cxr.classify_image"
QUEUES = {"live": "cxr.live", "bulk": "cxr.bulk"}
PAYLOAD_PREFIX = "cxr:payload:"
HEARTBEAT_PREFIX = "cxr:worker:"
# Each worker process refreshes its key every HEARTBEAT_TTL_S / 3 seconds; a worker whose key
# has expired is dead (or frozen), and the reconciler re-sends what it had claimed. The key also
# says since when the worker's current batch runs: past CXR_HUNG_AFTER_S the worker is hung.
HEARTBEAT_TTL_S = 15


class QueueFull(Exception):
    """Redis is at its ``maxmemory`` and refuses writes (``noeviction``): nothing more can be
    queued for the workers until they drain it or it is given more memory. Sources refuse new
    files with a retryable error (HTTP 503, DICOM 0xA700, ``ingest`` exit status 5); what was
    accepted before stays queued in the database and is sent once there is room."""

    def __init__(self) -> None:
        super().__init__(
            "the work queue (Redis) is full: it is at its maxmemory and refuses "
            "writes; the file was not stored; send it again later"
        )
        self.report: Any = None  # ingest_paths: what was stored before the queue filled


def is_queue_full(exc: BaseException | None) -> bool:
    """True when exc, or an error it wraps, is Redis refusing a write at its maxmemory."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (QueueFull, redis.exceptions.OutOfMemoryError)):
            return True
        if str(exc).startswith("OOM command not allowed"):  # as kombu or celery relay it
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def queue_has_room(client: redis.Redis) -> bool:
    """False when Redis is at its maxmemory with the noeviction policy (writes fail).

    True when Redis does not answer: a source stores the file and it is sent once Redis is back.
    """
    try:
        info: Any = client.info("memory")
    except redis.exceptions.RedisError:
        return True
    limit = int(info.get("maxmemory", 0) or 0)
    if not limit or info.get("maxmemory_policy", "noeviction") != "noeviction":
        return True
    return int(info.get("used_memory", 0)) < limit


def lane_queues() -> list[Any]:
    """One direct exchange and routing key per lane, so a message lands in exactly one queue."""
    from kombu import Exchange, Queue

    return [
        Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES.values()
    ]


def redis_client(url: str) -> redis.Redis:
    """A Redis client with bounded timeouts."""
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def payload_key(image_id: int) -> str:
    return f"{PAYLOAD_PREFIX}{image_id}"


def put_payload(client: redis.Redis, image_id: int, array: np.ndarray, ttl_s: int) -> None:
    """Store a square uint8 model input under the image's key."""
    client.set(payload_key(image_id), array.astype(np.uint8).tobytes(), ex=ttl_s)


def put_payloads(client: redis.Redis, arrays: Mapping[int, np.ndarray], ttl_s: int) -> None:
    """Store many model inputs in one round trip."""
    if not arrays:
        return
    with client.pipeline(transaction=False) as pipe:
        for image_id, array in arrays.items():
            pipe.set(payload_key(image_id), array.astype(np.uint8).tobytes(), ex=ttl_s)
        pipe.execute()


def get_payloads(client: redis.Redis, image_ids: Sequence[int], size: int) -> list[Any]:
    """Fetch payloads in one round trip; None where a payload is missing or malformed."""
    if not image_ids:
        return []
    raw = client.mget([payload_key(i) for i in image_ids])
    out: list[np.ndarray | None] = []
    for blob in raw:
        if not isinstance(blob, bytes) or len(blob) != size * size:
            out.append(None)
        else:
            out.append(np.frombuffer(blob, dtype=np.uint8).reshape(size, size))
    return out


def delete_payloads(client: redis.Redis, image_ids: Iterable[int]) -> None:
    """Drop payloads of finished images."""
    keys = [payload_key(i) for i in image_ids]
    if keys:
        client.delete(*keys)


def _publish_batch(producer: Any) -> Any:
    """kombu's publish batch (Redis: one pipelined round trip for a chunk's messages).

    Messages buffered here are sent when the block ends without an error; on an error the
    unsent ones are dropped and the error propagates, so the caller treats the lot as unsent
    (their rows stay queued for the reconciler). A kombu without batches publishes one by one.
    """
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else contextlib.nullcontext()


_CELERY_IMPORT = threading.Lock()


class Dispatcher:
    """Sends classification tasks by name, so pipeline code never imports the worker."""

    def __init__(self, broker_url: str) -> None:
        # celery's package swaps itself for a lazy module on first import; two threads importing
        # it at once can see it half made ("cannot import name 'Celery'"), so one at a time
        with _CELERY_IMPORT:
            from celery import Celery  # a producer only; the worker defines the task

        self.broker_url = broker_url
        self._app = Celery("cxr_triage_producer", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            broker_connection_retry_on_startup=True,
            broker_connection_max_retries=3,
            task_queues=lane_queues(),
        )

    def send(self, image_ids: Iterable[int], lane: str = "live") -> int:
        """Send one task message per image onto the lane's queue; return how many were sent."""
        queue = QUEUES.get(lane, QUEUES["live"])
        sent = 0
        with self._app.producer_or_acquire() as producer, _publish_batch(producer):
            for image_id in image_ids:
                self._app.send_task(
                    TASK_CLASSIFY,
                    args=[int(image_id)],
                    queue=queue,
                    routing_key=queue,
                    producer=producer,
                    ignore_result=True,
                )
                sent += 1
        return sent

    def close(self) -> None:
        self._app.close()
