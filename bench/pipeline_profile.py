"""Where the pipeline bench's time went, per image and stage, and the bound that follows."""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline.profiling import PROCESS, difference, per_image
from pipeline.profiling import read as read_profile

# The profile's stages in pipeline order (pipeline.profiling): ingest in this process, then
# the workers' (Celery's fetch and decode, the batch wait, the batch's own stages, the acks).
INGEST_STAGES = ("read", "decode", "preview", "sql", "model_input", "payload", "send")
WORKER_STAGES = (
    "idle",
    "message",
    "fill",
    "claim",
    "load",
    "forward",
    "cam",
    "write",
    "cleanup",
    "task",
    "ack",
    "push",
)


def redis_cpu_ms(client: Any) -> float:
    info = client.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1000.0


def run_profile(
    client: Any,
    workers_before: dict[str, tuple[float, float, float]],
    ingest: dict[str, tuple[float, float, float]],
    ingest_total_s: tuple[float, float],
    redis_before_ms: float,
    images: int,
    elapsed_s: float,
) -> dict[str, Any]:
    """Per image, where the timed run's time went, from each process's own timers.

    ``ms``: wall milliseconds per image (the workers' summed over the workers); ``cpu_ms``: CPU
    milliseconds per image. ``other``: the process's total less its timed stages (for a
    worker, mostly Celery's event loop). The bound is the cores divided by the CPU the
    pipeline spent per image in all its processes (ingest, workers, Redis).
    """
    deadline = time.monotonic() + 15
    while True:  # each worker pushes its figures right after a batch's acks
        workers = difference(read_profile(client), workers_before)
        if workers.get("task", (0, 0, 0))[2] >= images or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    redis_ms = redis_cpu_ms(client) - redis_before_ms
    process = workers.pop(PROCESS, (0.0, 0.0, 0.0))
    ingest_other = (
        ingest_total_s[0] * 1000.0 - sum(v[0] for v in ingest.values()),
        ingest_total_s[1] * 1000.0 - sum(v[1] for v in ingest.values()),
        0.0,
    )
    worker_other = (
        process[0] - sum(v[0] for v in workers.values()),
        process[1] - sum(v[1] for v in workers.values()),
        0.0,
    )
    n = max(1, images)
    cpu = {
        "ingest": round(ingest_total_s[1] * 1000.0 / n, 3),
        "workers": round(process[1] / n, 3),
        "redis": round(redis_ms / n, 3),
    }
    cpu["total"] = round(sum(cpu.values()), 3)
    cores = os.cpu_count() or 1
    return {
        "images": images,
        "wall_s": round(elapsed_s, 3),
        "ingest": per_image({**ingest, "other": ingest_other}, n, (*INGEST_STAGES, "other")),
        "worker": per_image({**workers, "other": worker_other}, n, (*WORKER_STAGES, "other")),
        "cpu_ms_per_image": cpu,
        "cores": cores,
        "bound_img_s": round(cores * 1000.0 / cpu["total"], 2) if cpu["total"] > 0 else None,
    }


def with_model(
    profile: dict[str, Any], model_cpu_ms: float | None, model_img_s: float
) -> dict[str, Any]:
    """The profile, with the model alone beside it: ``bound_vs_model``, the pipeline's CPU
    bound (every core busy with it) over the model alone's measured rate; ``model_cpu_share``,
    the model alone's CPU per image over the pipeline's (what the model is of the work)."""
    total, bound = profile["cpu_ms_per_image"]["total"], profile["bound_img_s"]
    share = round(model_cpu_ms / total, 3) if model_cpu_ms and total > 0 else None
    return {
        **profile,
        "model_cpu_ms_per_image": round(model_cpu_ms or 0.0, 3),
        "model_cpu_share": share,
        "bound_vs_model": round(bound / model_img_s, 3) if bound else None,
    }


def profile_table(profile: dict[str, Any]) -> str:
    """The profile as text: per image, wall and CPU milliseconds by stage, then the bound."""
    lines = [f"{'stage':22} {'ms/image':>9} {'cpu ms/image':>13}"]
    for group in ("ingest", "worker"):
        for stage, v in profile[group].items():
            lines.append(f"{group + ' ' + stage:22} {v['ms']:9.3f} {v['cpu_ms']:13.3f}")
    cpu = profile["cpu_ms_per_image"]
    lines.append("cpu ms/image: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    lines.append(
        f"model alone: {profile['model_cpu_ms_per_image']} cpu ms/image, "
        f"{profile['model_cpu_share']} of the pipeline's"
    )
    lines.append(
        f"bound on {profile['cores']} otherwise idle cores: {profile['bound_img_s']} "
        f"img/s = {profile['bound_vs_model']} x the model alone"
    )
    return "\n".join(lines)
