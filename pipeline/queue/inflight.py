"""What Redis says is in flight: task messages waiting or held by a worker, and heartbeats."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from pipeline.queue.dispatch import HEARTBEAT_PREFIX, QUEUES, TASK_CLASSIFY

# kombu's Redis transport: a reserved, unacknowledged message lives in this hash (delivery tag
# -> [message, exchange, routing key]) until acked or restored; priority sub-queues are named
# "<queue><sep><priority>".
KOMBU_UNACKED_KEY = "unacked"
KOMBU_UNACKED_INDEX_KEY = "unacked_index"  # delivery tag -> time it was handed to a consumer
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)


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


def _beats(client: redis.Redis, names: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Each worker name with its raw heartbeat (None where the key has expired), one MGET."""
    yield from zip(names, client.mget([f"{HEARTBEAT_PREFIX}{n}" for n in names]), strict=True)


def heartbeats(client: redis.Redis, names: Sequence[str]) -> dict[str, float | None]:
    """Per worker name, when its live process started (its heartbeat's ``since``); None: dead."""
    if not names:
        return {}
    out: dict[str, float | None] = {}
    for name, raw in _beats(client, names):
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
    for name, raw in _beats(client, names):
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
