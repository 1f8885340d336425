"""The one place a process opens Redis: a client with bounded timeouts and the task dispatcher,
closed by the block (or the owner) that opened them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from pipeline.queue.dispatch import Dispatcher, redis_client


def open_queue(redis_url: str) -> tuple[redis.Redis, Dispatcher]:
    """A Redis client and a task dispatcher on redis_url; the caller closes both."""
    return redis_client(redis_url), Dispatcher(redis_url)


@contextmanager
def queue_connections(redis_url: str) -> Iterator[tuple[redis.Redis, Dispatcher]]:
    """A Redis client and a task dispatcher on redis_url, both closed when the block ends."""
    client, dispatcher = open_queue(redis_url)
    try:
        yield client, dispatcher
    finally:
        dispatcher.close()
        client.close()
