"""Work in flight: model-ready payloads in Redis and task messages sent by name.

The payload is the uint8 model input (a few tens of kB). It is rebuilt from the preview stored
in the database whenever Redis has lost it, so Redis holds nothing that cannot be recreated.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis

log = logging.getLogger(__name__)

TASK_CLASSIFY = "cxr.classify_image"
QUEUES = {"live": "cxr.live", "bulk": "cxr.bulk"}
PAYLOAD_PREFIX = "cxr:payload:"
# kombu's Redis transport: a reserved, unacknowledged message lives in this hash (delivery tag
# -> [message, exchange, routing key]) until acked or restored; priority sub-queues are named
# "<queue><sep><priority>".
KOMBU_UNACKED_KEY = "unacked"
KOMBU_UNACKED_INDEX_KEY = "unacked_index"  # delivery tag -> time it was handed to a consumer
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)
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


def _image_id_of(raw: bytes | str) -> int | None:
    """The image id a raw kombu message (Celery protocol 2 or 1) carries, if it is ours."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task", TASK_CLASSIFY) != TASK_CLASSIFY:
            return None
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded: Any = json.loads(body) if isinstance(body, (bytes, str)) else body
        args: Any = decoded["args"] if isinstance(decoded, dict) else decoded[0]
        return int(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def images_in_flight(
    client: redis.Redis, page: int = 1000, held_at_most_s: float | None = None
) -> set[int]:
    """Image ids whose task message is in Redis now: waiting in a lane or held by a worker.

    Reads every lane queue (and its priority sub-queues) in pages, then the transport's
    unacknowledged hash. A message that moves from a queue to a worker during the scan is seen
    in one or the other, because the queues are read first.

    With ``held_at_most_s``, a message a consumer has held unacknowledged for longer than that
    does not count: a live worker prefetches one batch and claims it within
    ``CXR_BATCH_WAIT_MS``, so such a message was held by a worker that died while buffering it,
    and kombu would hand it out again only after its visibility timeout.
    """
    found: set[int] = set()
    stale: set[bytes] = set()
    if held_at_most_s is not None:
        cutoff = time.time() - held_at_most_s
        held: Any = client.zrangebyscore(KOMBU_UNACKED_INDEX_KEY, "-inf", cutoff)
        stale = {t if isinstance(t, bytes) else str(t).encode() for t in held}
    names = [
        q
        for name in QUEUES.values()
        for q in (name, *(f"{name}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS))
    ]
    for name in names:
        start = 0
        while chunk := client.lrange(name, start, start + page - 1):
            found.update(i for i in map(_image_id_of, chunk) if i is not None)
            if len(chunk) < page:
                break
            start += page
    for tag, entry in client.hscan_iter(KOMBU_UNACKED_KEY, count=page):
        if tag in stale:
            continue
        image_id = _image_id_of_unacked(entry)
        if image_id is not None:
            found.add(image_id)
    return found


def _image_id_of_unacked(entry: Any) -> int | None:
    """The image id of an entry of kombu's unacked hash, or None when it is not ours."""
    try:
        raw = json.loads(entry)[0]
    except (ValueError, IndexError, TypeError):
        return None
    return _image_id_of(raw if isinstance(raw, str) else json.dumps(raw))


def heartbeats(client: redis.Redis, names: Sequence[str]) -> dict[str, float | None]:
    """Per worker name, when its live process started (its heartbeat's ``since``); None: dead."""
    if not names:
        return {}
    out: dict[str, float | None] = {}
    for name, raw in zip(
        names, client.mget([f"{HEARTBEAT_PREFIX}{n}" for n in names]), strict=True
    ):
        try:
            out[name] = float(json.loads(raw).get("since", 0.0)) if raw is not None else None
        except (ValueError, TypeError, AttributeError):
            out[name] = 0.0  # a heartbeat without a start time: alive, incarnation unknown
    return out


def hung_workers(
    client: redis.Redis, names: Sequence[str], hung_after_s: float, now: float | None = None
) -> set[str]:
    """Workers that beat but whose current batch started more than hung_after_s ago.

    Their heartbeat thread is alive while the batch is not (a forward pass that never
    returns); a process frozen whole stops beating instead, and its key expires.
    """
    if not names:
        return set()
    now = time.time() if now is None else now
    hung = set()
    for name, raw in zip(
        names, client.mget([f"{HEARTBEAT_PREFIX}{n}" for n in names]), strict=True
    ):
        try:
            busy = json.loads(raw).get("busy_since") if raw is not None else None
            if busy is not None and now - float(busy) > hung_after_s:
                hung.add(name)
        except (ValueError, TypeError, AttributeError):
            continue
    return hung


def messages_held_since(client: redis.Redis, before: float) -> dict[int, float]:
    """Image id -> when a consumer took its message, for messages held unacked since before."""
    tags: Any = client.zrangebyscore(KOMBU_UNACKED_INDEX_KEY, "-inf", before, withscores=True)
    if not tags:
        return {}
    entries: Any = client.hmget(KOMBU_UNACKED_KEY, [tag for tag, _ in tags])
    held: dict[int, float] = {}
    for (_, taken), entry in zip(tags, entries, strict=True):
        image_id = _image_id_of_unacked(entry)
        if image_id is not None:
            held[image_id] = max(float(taken), held.get(image_id, 0.0))
    return held


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
