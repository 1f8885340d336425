"""Work in flight: model-ready payloads in Redis and task messages sent by name.

The payload is the uint8 model input (a few tens of kB). It is rebuilt from the preview stored
in the database whenever Redis has lost it, so Redis holds nothing that cannot be recreated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis

log = logging.getLogger(__name__)

TASK_CLASSIFY = "cxr.classify_image"
QUEUES = {"live": "cxr.live", "bulk": "cxr.bulk"}
PAYLOAD_PREFIX = "cxr:payload:"
# Set once an image's task message has been published. Redis applies (and its AOF logs)
# commands in order, so a marker that survived a crash or restart means its message did too;
# a payload alone does not: the sender may have died, or Redis lost its last second of writes,
# between the payload and the message.
SENT_PREFIX = "cxr:sent:"
HEARTBEAT_PREFIX = "cxr:worker:"
HEARTBEAT_TTL_S = 30


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


def sent_key(image_id: int) -> str:
    return f"{SENT_PREFIX}{image_id}"


def mark_sent(client: redis.Redis, image_ids: Sequence[int], ttl_s: int) -> None:
    """Record that these images' task messages are published."""
    if not image_ids:
        return
    with client.pipeline(transaction=False) as pipe:
        for image_id in image_ids:
            pipe.set(sent_key(image_id), b"1", ex=ttl_s)
        pipe.execute()


def sent_images(client: redis.Redis, image_ids: Sequence[int]) -> set[int]:
    """Those of these images whose task message is known to be published."""
    if not image_ids:
        return set()
    with client.pipeline(transaction=False) as pipe:
        for image_id in image_ids:
            pipe.exists(sent_key(image_id))
        found = pipe.execute()
    return {i for i, n in zip(image_ids, found, strict=True) if n}


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
    """Drop the payloads (and sent markers) of finished images."""
    ids = list(image_ids)
    keys = [payload_key(i) for i in ids] + [sent_key(i) for i in ids]
    if keys:
        client.delete(*keys)


class Dispatcher:
    """Sends classification tasks by name, so pipeline code never imports the worker."""

    def __init__(self, broker_url: str) -> None:
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
        with self._app.producer_or_acquire() as producer:
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
