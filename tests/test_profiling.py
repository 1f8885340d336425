"""pipeline.profiling: stage sums, nesting, and the Redis hash the workers push to."""

from __future__ import annotations

import time

import redis

from pipeline.profiling import PROFILE_PREFIX, Stages, difference, per_image, push, read


def test_nested_stage_counts_only_in_itself() -> None:
    stages = Stages()
    with stages.time("outer", items=2):
        time.sleep(0.02)
        with stages.time("inner", items=2):
            time.sleep(0.03)
    sums = stages.snapshot()
    assert set(sums) == {"outer", "inner"}
    outer_wall, _, outer_n = sums["outer"]
    inner_wall, _, inner_n = sums["inner"]
    assert (outer_n, inner_n) == (2, 2)
    assert 20 <= outer_wall < 30 <= inner_wall  # the inner 30 ms is not the outer's
    assert stages.take() == sums and stages.snapshot() == {}


def test_push_read_and_difference_over_processes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    push(client, "w1@host:1", {"forward": (10.0, 8.0, 4), "write": (2.0, 1.5, 4)})
    push(client, "w2@host:2", {"forward": (6.0, 5.0, 4)})
    before = read(client)
    assert before == {"forward": (16.0, 13.0, 8.0), "write": (2.0, 1.5, 4.0)}
    push(client, "w1@host:1", {"forward": (4.0, 3.0, 4)})
    after = read(client)
    assert sorted(k.decode() for k in client.scan_iter(f"{PROFILE_PREFIX}*")) == [
        f"{PROFILE_PREFIX}w1@host:1",
        f"{PROFILE_PREFIX}w2@host:2",
    ]
    delta = difference(after, before)
    assert delta == {"forward": (4.0, 3.0, 4.0), "write": (0.0, 0.0, 0.0)}
    table = per_image(after, 4, order=("write", "forward"))
    assert list(table) == ["write", "forward"]
    assert table["forward"] == {"ms": 5.0, "cpu_ms": 4.0}
    client.close()


def test_push_to_an_unreachable_redis_is_silent() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    push(client, "w", {"forward": (1.0, 1.0, 1)})  # a profile never fails a batch
