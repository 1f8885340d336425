"""Where a process's time goes: wall and CPU time per stage, summed, read by `cxr-triage bench`.

Stages are timed in the process that runs them, always (a timer costs about a microsecond
against milliseconds of work): ingest's in whichever process ingests (``STAGES``, read by the
bench that ran it), the workers' in each worker, which adds its totals to a Redis hash after
every batch (``push``) so the bench can read them all (``read``). A stage timed inside another
counts only in itself: the outer one reports its own time, without the inner one's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

PROFILE_PREFIX = "cxr:profile:"
# The whole process between two pushes: wall and CPU time, all threads (the unattributed
# remainder is the Celery event loop: fetching, decoding and acknowledging messages).
PROCESS = "process"


class Stages:
    """Per-stage sums: wall ms, CPU ms of the calling thread, and how many items they covered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.sums: dict[str, list[float]] = {}  # name -> [wall ms, cpu ms, items]

    @contextmanager
    def time(self, name: str, items: int = 1) -> Iterator[None]:
        """Time the block as stage ``name`` (exclusive of stages timed inside it)."""
        stack: list[list[float]] = self._local.__dict__.setdefault("stack", [])
        frame = [0.0, 0.0]  # wall and CPU spent in nested stages
        stack.append(frame)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            stack.pop()
            if stack:
                stack[-1][0] += wall
                stack[-1][1] += cpu
            self.add(name, (wall - frame[0]) * 1000.0, (cpu - frame[1]) * 1000.0, items)

    def add(self, name: str, wall_ms: float, cpu_ms: float, items: int = 1) -> None:
        """Add a measured span to stage ``name``."""
        with self._lock:
            total = self.sums.setdefault(name, [0.0, 0.0, 0.0])
            total[0] += wall_ms
            total[1] += cpu_ms
            total[2] += items

    def snapshot(self) -> dict[str, tuple[float, float, float]]:
        """A copy of the sums: {stage: (wall ms, cpu ms, items)}."""
        with self._lock:
            return {k: (v[0], v[1], v[2]) for k, v in self.sums.items()}

    def take(self) -> dict[str, tuple[float, float, float]]:
        """The sums, and start from zero."""
        with self._lock:
            out = {k: (v[0], v[1], v[2]) for k, v in self.sums.items()}
            self.sums.clear()
        return out


STAGES = Stages()


def push(client: Any, name: str, sums: Mapping[str, tuple[float, float, float]]) -> None:
    """Add sums to the Redis hash of process ``name`` in one round trip (best effort)."""
    if not sums:
        return
    key = f"{PROFILE_PREFIX}{name}"
    try:
        with client.pipeline(transaction=False) as pipe:
            for stage, (wall, cpu, items) in sums.items():
                pipe.hincrbyfloat(key, f"{stage}:wall", wall)
                pipe.hincrbyfloat(key, f"{stage}:cpu", cpu)
                pipe.hincrbyfloat(key, f"{stage}:n", items)
            pipe.expire(key, 7 * 24 * 3600)
            pipe.execute()
    except Exception:  # Redis down or full: a profile is not worth failing a batch for
        return


def read(client: Any) -> dict[str, tuple[float, float, float]]:
    """Every process's pushed sums, added together: {stage: (wall ms, cpu ms, items)}."""
    out: dict[str, list[float]] = {}
    for key in client.scan_iter(match=f"{PROFILE_PREFIX}*", count=100):
        for field, value in client.hgetall(key).items():
            stage, _, kind = (field.decode() if isinstance(field, bytes) else field).rpartition(":")
            slot = {"wall": 0, "cpu": 1, "n": 2}.get(kind)
            if slot is not None:
                out.setdefault(stage, [0.0, 0.0, 0.0])[slot] += float(value)
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def difference(
    after: Mapping[str, tuple[float, float, float]],
    before: Mapping[str, tuple[float, float, float]],
) -> dict[str, tuple[float, float, float]]:
    """after - before, stage by stage."""
    zero = (0.0, 0.0, 0.0)
    return {
        k: (
            v[0] - before.get(k, zero)[0],
            v[1] - before.get(k, zero)[1],
            v[2] - before.get(k, zero)[2],
        )
        for k, v in after.items()
    }


def per_image(
    sums: Mapping[str, tuple[float, float, float]], images: int, order: tuple[str, ...] = ()
) -> dict[str, dict[str, float]]:
    """{stage: {"ms": wall ms per image, "cpu_ms": CPU ms per image}}, in ``order`` first."""
    names = [s for s in order if s in sums] + sorted(s for s in sums if s not in order)
    n = max(1, images)
    return {s: {"ms": round(sums[s][0] / n, 3), "cpu_ms": round(sums[s][1] / n, 3)} for s in names}
