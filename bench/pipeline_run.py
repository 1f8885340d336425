"""The pipeline bench's runs: files on disk through ingest, Redis and real workers to results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select

from bench.pipeline_profile import redis_cpu_ms, run_profile
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import Enqueuer, ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Batch, Image
from pipeline.profiling import STAGES, difference
from pipeline.profiling import read as read_profile
from pipeline.queue.connections import open_queue
from pipeline.queue.dispatch import redis_client
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.service.supervisor import worker_children
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore
from reliability.metrics import open_count, wait_final

SHARED_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
WARMUP = 32  # images sent through the pipeline before timing


def bench_images(n: int, folder: Path, tag: str = "bench") -> list[Path]:
    """n distinct radiographs: real ones from ../shared/data when present, else generated."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SHARED_CXR.glob("*/*/*.jp*g")) + sorted(SHARED_CXR.glob("*/*/*/*.jp*g"))
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        dest = folder / f"{tag}-{i:05d}.jpg"
        if sources:
            data = sources[(i * 7919) % len(sources)].read_bytes()
            # A distinct byte string per copy, so dedup never short-cuts the pipeline.
            dest.write_bytes(data + f"{tag}{i}".encode())
        else:
            arr = rng.integers(0, 255, (512, 512), dtype=np.uint8)
            PILImage.fromarray(arr).save(dest, format="JPEG", quality=90)
        out.append(dest)
    return out


def _wait_done(factory: Any, ids: list[int], timeout: float) -> None:
    if not wait_final(factory, ids, timeout, poll_s=0.02):
        raise TimeoutError(f"{open_count(factory, ids)} images not done after {timeout:.0f} s")


def _send(settings: Settings, factory: Any, paths: list[Path], size: int) -> list[int]:
    """Ingest and enqueue as `cxr-triage ingest` does: streaming, one batch of files at a time."""
    client, dispatcher = open_queue(settings.redis_url or "")

    from pipeline.classifier.weights import describe_weights

    preprocess = describe_weights(settings)["preprocess"]
    sink = Enqueuer(factory, client, dispatcher, size, 3600, preprocess=preprocess)
    try:
        # The product keeps every accepted film in the instance store: so does the bench.
        report = ingest_paths(
            factory,
            paths,
            Limits(),
            source="bench",
            sink=sink,
            chunk=settings.batch_size,
            store=InstanceStore.of(settings),
        )
    finally:
        dispatcher.close()
        client.close()
    return [i.image_id for i in report.accepted if i.image_id is not None]


def measure_ingest(
    base: Settings, paths: list[Path], workdir: Path, redis_url: str, size: int
) -> float:
    """Milliseconds of one process per image to ingest and enqueue, with no worker running.

    A scratch database and Redis database 1, so nothing here reaches the timed pipeline run.
    """
    url = f"sqlite:///{workdir / 'ingest-only.db'}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    settings = base.with_(redis_url=redis_url.rsplit("/", 1)[0] + "/1", database_url=url)
    start = time.perf_counter()
    _send(settings, factory, paths, size)
    return (time.perf_counter() - start) * 1000.0 / len(paths)


def _cli(settings: Settings, workdir: Path, args: list[str]) -> tuple[float, dict[str, Any]]:
    """Seconds of one `cxr-triage` command as a user runs it (start-up included), and its JSON."""
    script = Path(sys.executable).with_name("cxr-triage")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli.main"]
    env = {**os.environ, **settings.with_(data_dir=workdir).as_env()}
    start = time.perf_counter()
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cxr-triage {args[0]} failed: {proc.stderr[-1500:]}")
    return elapsed, json.loads(proc.stdout)


def measure_ingest_wait(settings: Settings, workdir: Path, n: int) -> dict[str, float]:
    """`cxr-triage ingest DIR --wait` of n new radiographs into the running system, and the
    start-up of a command that does not run the network (`worklist`)."""
    folder = workdir / "ingest-wait"
    bench_images(n, folder, tag="wait")
    startup_s, _ = _cli(settings, workdir, ["worklist", "--json", "--limit", "1"])
    wait_s, doc = _cli(settings, workdir, ["ingest", str(folder), "--wait", "--json"])
    if doc["done"] != n:
        raise RuntimeError(f"ingest --wait: {doc['done']} of {n} done")
    return {"ingest_wait_s": wait_s, "startup_s": startup_s}


def measure_pipeline(
    base: Settings,
    paths: list[Path],
    latency_paths: list[Path],
    workdir: Path,
    rate_hz: float,
    size: int,
) -> dict[str, Any]:
    """End-to-end throughput through a real worker, then latency at a light steady load."""

    redis_server = EmbeddedRedis(workdir / "redis").start()
    ingest_ms = measure_ingest(base, paths[WARMUP:], workdir, redis_server.url, size)
    settings = base.with_(
        redis_url=redis_server.url,
        database_url=f"sqlite:///{workdir / 'bench.db'}",
        store_dir=workdir / "instances",
    )
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    env = {**os.environ, **settings.with_(data_dir=workdir).as_env()}
    log = open(workdir / "worker.log", "wb")
    # The workers as `cxr-triage run` starts them on this machine: same processes and threads.
    workers = [
        subprocess.Popen(
            command, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        for _, command, child_env in worker_children(settings, env, "bench")
    ]
    try:
        deadline = time.monotonic() + 180
        while (workdir / "worker.log").read_bytes().count(b" ready.") < len(workers):
            if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
                raise RuntimeError("bench worker did not start; see " + str(workdir / "worker.log"))
            time.sleep(0.1)
        # Warm the worker (first batches, allocator) so the timed run measures steady state.
        _wait_done(factory, _send(settings, factory, paths[:WARMUP], size), 300)
        timed = paths[WARMUP:]
        with factory() as session:
            last_batch = session.scalar(select(func.max(Batch.id))) or 0
        client = redis_client(redis_server.url)
        workers_before, ingest_before = read_profile(client), STAGES.snapshot()
        redis_before, cpu_before = redis_cpu_ms(client), time.process_time()
        start = time.perf_counter()
        ids = _send(settings, factory, timed, size)
        ingest_s, ingest_cpu_s = time.perf_counter() - start, time.process_time() - cpu_before
        ingest_sums = difference(STAGES.snapshot(), ingest_before)
        _wait_done(factory, ids, 1800)
        elapsed = time.perf_counter() - start
        profile = run_profile(
            client,
            workers_before,
            ingest_sums,
            (ingest_s, ingest_cpu_s),
            redis_before,
            len(ids),
            elapsed,
        )
        client.close()
        throughput = len(ids) / elapsed
        with factory() as session:
            forward_ms = session.scalar(
                select(func.sum(Batch.inference_ms)).where(Batch.id > last_batch)
            )
        # Share of the workers' wall time spent in forward passes (1.0: never waiting).
        forward_share = float(forward_ms or 0.0) / 1000.0 / elapsed / len(workers)
        latency_ids = []
        for path in latency_paths:
            tick = time.perf_counter()
            latency_ids += _send(settings, factory, [path], size)
            time.sleep(max(0.0, 1.0 / rate_hz - (time.perf_counter() - tick)))
        _wait_done(factory, latency_ids, 300)
        with factory() as session:
            lat = sorted(session.scalars(select(Image.latency_ms).where(Image.id.in_(latency_ids))))
        user = measure_ingest_wait(settings, workdir, len(timed))
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        log.close()
        redis_server.stop()
    return {
        "workers": len(workers),
        "img_s": throughput,
        "ingest_ms_per_image": ingest_ms,
        "worker_forward_share": forward_share,
        "latency_p50_ms": statistics.median(lat),
        "latency_p95_ms": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
        "profile": profile,
        **user,
    }
