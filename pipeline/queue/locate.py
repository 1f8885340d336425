"""Finding the Redis in use: the configured URL, else the one a running ``cxr-triage run`` on
this data dir recorded (and answers), and that record's upkeep."""

from __future__ import annotations

import json
import os

import redis

from pipeline.settings import Settings


def ping(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers at url."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def write_runtime(settings: Settings, redis_url: str, dashboard_url: str) -> None:
    """Record where a running system's Redis and dashboard are, for other commands."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.runtime_file.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"pid": os.getpid(), "redis_url": redis_url, "dashboard_url": dashboard_url})
    )
    os.replace(tmp, settings.runtime_file)


def clear_runtime(settings: Settings) -> None:
    """Forget the running system's addresses."""
    try:
        data = json.loads(settings.runtime_file.read_text())
        if data.get("pid") == os.getpid():
            settings.runtime_file.unlink()
    except (OSError, ValueError):
        pass


def recorded_redis_url(settings: Settings) -> str | None:
    """The Redis URL a ``cxr-triage run`` on this data dir recorded; not asked whether it is up."""
    try:
        data = json.loads(settings.runtime_file.read_text())
    except (OSError, ValueError):
        return None
    url = data.get("redis_url")
    return str(url) if url else None


def running_redis_url(settings: Settings) -> str | None:
    """The Redis URL of a live ``cxr-triage run`` on this data dir, if one answers."""
    url = recorded_redis_url(settings)
    return url if url and ping(url) else None


def resolve_redis_url(settings: Settings) -> str | None:
    """The configured Redis URL, else a running system's, else None."""
    return settings.redis_url or running_redis_url(settings)
