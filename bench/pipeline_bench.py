"""`cxr-triage bench`: the model alone, the whole pipeline, and the naive pattern, in one run.

All three read the same images on the same machine in the same run, so their ratios are fair:

1. model alone: model-ready uint8 inputs already in memory, forward passes at batch sizes
   1/8/16/32 in this process with every core's thread, and again laid out as the workers run
   (on a CPU, a process per core, all at once); the best of all is the ceiling on this hardware;
2. pipeline: files on disk → ingest (decode, dedup, commit) → Redis → a real Celery worker
   subprocess (batched forward + CAM) → database, timed from the first file read to the last
   result committed; then latency (ingest to result) at a light steady load;
3. naive: a plain Flask endpoint doing one image per request (load, preprocess, forward with
   batch 1, save a row), driven by a sequential HTTP client on loopback.
"""

from __future__ import annotations

import http.client
import io
import json
import multiprocessing
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select

from pipeline.classifier.weights import ensure_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.imaging.preprocess import model_input_from_grey
from pipeline.ingest.accept import Enqueuer, ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Batch, Image
from pipeline.queue.dispatch import Dispatcher, redis_client
from pipeline.queue.redis_server import EmbeddedRedis
from pipeline.service.profiling import PROCESS, STAGES, difference, per_image
from pipeline.service.profiling import read as read_profile
from pipeline.service.supervisor import WorkerLayout, inference_layout, worker_children
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore
from pipeline.training.datasets import load_one
from pipeline.triage.studies import open_image_count

if TYPE_CHECKING:  # torch is imported by the commands that run the model, not by the CLI
    from pipeline.classifier.network import Classifier

SHARED_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
MODEL_BATCH_SIZES = (1, 8, 16, 32)
LAYOUT_BATCH_SIZES = (8, 16, 32)
WARMUP = 32  # images sent through the pipeline before timing
# The profile's stages in pipeline order (pipeline.service.profiling): ingest in this process, then
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


# CPU milliseconds per image of the model alone, by (layout or one process, batch size)
MODEL_CPU_MS: dict[tuple[str, int], float] = {}


def measure_model(clf: Classifier, inputs: np.ndarray) -> dict[int, float]:
    """Images/s of the forward pass + CAM alone at each batch size."""
    rates = {}
    for bs in MODEL_BATCH_SIZES:
        clf.predict(inputs[:bs])  # warm-up at this shape
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(inputs), bs):
            clf.predict(inputs[i : i + bs])
        rates[bs] = len(inputs) / (time.perf_counter() - start)
        MODEL_CPU_MS["process", bs] = (time.process_time() - cpu) * 1000.0 / len(inputs)
    return rates


def _model_child(
    weights: str,
    layout: WorkerLayout,
    inputs_path: str,
    batch_sizes: tuple[int, ...],
    barrier: Any,
    out: Any,
    runtime: str = "eager",
) -> None:
    """One process of the layout: the model alone at each batch size, started with the others."""
    from pipeline.classifier.network import Classifier

    inputs = np.load(inputs_path)
    for bs in batch_sizes:
        clf = Classifier(Path(weights), layout.device, layout.threads, runtime, batch_size=bs)
        clf.predict(inputs[:bs])  # warm-up at this shape
        barrier.wait()
        start, cpu = time.monotonic(), time.process_time()
        for i in range(0, len(inputs), bs):
            clf.predict(inputs[i : i + bs])
        out.put((bs, start, time.monotonic(), len(inputs), time.process_time() - cpu))


def measure_model_layout(
    weights: Path, layout: WorkerLayout, inputs: np.ndarray, workdir: Path, runtime: str = "eager"
) -> dict[int, float]:
    """Images/s of the model alone in the workers' layout: its processes all at once."""
    ctx = multiprocessing.get_context("spawn")
    path = workdir / "model-inputs.npy"
    np.save(path, inputs)
    barrier, out = ctx.Barrier(layout.processes), ctx.Queue()
    procs = [
        ctx.Process(
            target=_model_child,
            args=(str(weights), layout, str(path), LAYOUT_BATCH_SIZES, barrier, out, runtime),
        )
        for _ in range(layout.processes)
    ]
    for proc in procs:
        proc.start()
    try:
        runs = [out.get(timeout=900) for _ in range(len(procs) * len(LAYOUT_BATCH_SIZES))]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    rates = {}
    for bs in LAYOUT_BATCH_SIZES:
        mine = [r for r in runs if r[0] == bs]
        span = max(r[2] for r in mine) - min(r[1] for r in mine)
        rates[bs] = sum(r[3] for r in mine) / span
        MODEL_CPU_MS["layout", bs] = sum(r[4] for r in mine) * 1000.0 / sum(r[3] for r in mine)
    return rates


def _wait_done(factory: Any, ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as session:
            left = open_image_count(session, ids)
        if left == 0:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{left} images not done after {timeout:.0f} s")


def _send(settings: Settings, factory: Any, paths: list[Path], size: int) -> list[int]:
    """Ingest and enqueue as `cxr-triage ingest` does: streaming, one batch of files at a time."""
    client = redis_client(settings.redis_url or "")
    dispatcher = Dispatcher(settings.redis_url or "")

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
        redis_before, cpu_before = _redis_cpu_ms(client), time.process_time()
        start = time.perf_counter()
        ids = _send(settings, factory, timed, size)
        ingest_s, ingest_cpu_s = time.perf_counter() - start, time.process_time() - cpu_before
        ingest_sums = difference(STAGES.snapshot(), ingest_before)
        _wait_done(factory, ids, 1800)
        elapsed = time.perf_counter() - start
        profile = _profile(
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


def _redis_cpu_ms(client: Any) -> float:
    info = client.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1000.0


def _profile(
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
    redis_ms = _redis_cpu_ms(client) - redis_before_ms
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


def naive_app(clf: Classifier, db_path: Path) -> Any:
    """The pattern most projects start with: one image per HTTP request, batch of one."""
    from flask import Flask, jsonify, request

    app = Flask("naive")
    lock = threading.Lock()
    conn = sqlite3.connect(db_path, check_same_thread=False)
    conn.execute("CREATE TABLE results (name TEXT, label TEXT, p REAL)")

    @app.post("/predict")
    def predict() -> Any:
        img = PILImage.open(io.BytesIO(request.get_data())).convert("L")
        arr = model_input_from_grey(np.asarray(img), clf.input_size, clf.preprocess)
        out = clf.predict(arr[None])
        label = clf.classes[int(out.cam_index[0])]
        with lock:
            conn.execute(
                "INSERT INTO results VALUES (?, ?, ?)",
                (request.args.get("name"), label, float(out.probabilities[0].max())),
            )
            conn.commit()
        return jsonify(label=label)

    return app


def measure_naive(clf: Classifier, paths: list[Path], workdir: Path) -> float:
    """Images/s of a Flask endpoint called once per image, sequentially, over loopback."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, naive_app(clf, workdir / "naive.db"), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
        for path in paths[:4]:  # warm-up
            conn.request("POST", "/predict?name=warm", body=path.read_bytes())
            conn.getresponse().read()
        start = time.perf_counter()
        for path in paths:
            conn.request("POST", f"/predict?name={path.name}", body=path.read_bytes())
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"naive endpoint answered {resp.status}")
        return len(paths) / (time.perf_counter() - start)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def run(
    n: int,
    settings: Settings,
    latency_n: int = 30,
    rate_hz: float = 2.0,
    pipeline_batch: int | None = None,
    runtimes: bool = True,
    choose_runtime: bool = False,
    requantise: bool = False,
) -> dict[str, Any]:
    """Run all the measurements on the same n images; return the --json document.

    First every runtime of the model side by side (``runtimes``; ``choose_runtime`` records
    the fastest that passes for the workers' ``CXR_RUNTIME=auto``), then the model alone, the
    pipeline and the naive endpoint with the settings as they are (the default: auto). The
    pipeline runs at the model's best measured batch size unless pipeline_batch is given.
    """
    from bench.runtimes_bench import choose, compare_runtimes
    from pipeline.classifier.network import Classifier
    from pipeline.classifier.runtimes import write_choice

    weights = ensure_weights(settings)
    settings = settings.with_(weights=weights)
    # The naive endpoint is the seed tutorials' pattern: eager PyTorch, one image per request.
    eager = Classifier(weights, settings.device, settings.torch_threads)
    runtime_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        workdir = Path(tmp)
        paths = bench_images(WARMUP + n + latency_n, workdir / "images")
        warm, timed, extra = paths[:WARMUP], paths[WARMUP : WARMUP + n], paths[WARMUP + n :]
        inputs = np.stack([load_one(p, eager.input_size, eager.preprocess) for p in timed])
        layout = inference_layout(settings)
        if runtimes and eager.device.type == "cpu":
            runtime_rows = compare_runtimes(weights, layout, inputs, workdir, requantise=requantise)
            if choose_runtime:
                write_choice(weights, eager.sha256, choose(runtime_rows), runtime_rows)
        clf = Classifier(
            weights,
            settings.device,
            settings.torch_threads,
            settings.runtime,
            batch_size=settings.batch_size,
        )
        model_rates = measure_model(clf, inputs)
        layout_rates = (
            measure_model_layout(weights, layout, inputs, workdir, clf.runtime)
            if layout.processes > 1
            else {}
        )
        # The ceiling: the fastest the model alone ran, in whichever layout.
        candidates = {("process", b): r for b, r in model_rates.items()}
        candidates.update({("layout", b): r for b, r in layout_rates.items()})
        best = max(candidates, key=lambda k: candidates[k])
        best_bs = best[1]
        settings = settings.with_(batch_size=pipeline_batch or best_bs)
        naive = measure_naive(eager, timed, workdir)
        pipe = measure_pipeline(settings, warm + timed, extra, workdir, rate_hz, clf.input_size)
    model_best = candidates[best]
    return {
        "device": str(clf.device),
        "n": len(timed),
        "model_only_img_s": round(model_best, 2),
        "pipeline_img_s": round(pipe["img_s"], 2),
        "naive_img_s": round(naive, 2),
        "pipeline_vs_model": round(pipe["img_s"] / model_best, 3),
        "pipeline_vs_naive": round(pipe["img_s"] / naive, 3),
        "runtime": clf.runtime,
        "ingest_wait_s": round(pipe["ingest_wait_s"], 2),
        "naive_s_same_images": round(len(timed) / naive, 2),
        "startup_s": round(pipe["startup_s"], 2),
        "latency_p50_ms": round(pipe["latency_p50_ms"], 1),
        "latency_p95_ms": round(pipe["latency_p95_ms"], 1),
        "ingest_ms_per_image": round(pipe["ingest_ms_per_image"], 2),
        "worker_forward_share": round(pipe["worker_forward_share"], 3),
        "model_only_by_batch": {str(b): round(r, 2) for b, r in model_rates.items()},
        "model_only_layout": _describe(layout),
        "model_only_layout_by_batch": {str(b): round(r, 2) for b, r in layout_rates.items()},
        "model_best": f"{'one process' if best[0] == 'process' else 'layout'}, batch {best_bs}",
        "pipeline_workers": pipe["workers"],
        "pipeline_batch_size": settings.batch_size,
        "pipeline_batch_wait_ms": settings.batch_wait_ms,
        "model_version": clf.version,
        "runtimes": runtime_rows,
        "profile": _with_model(pipe["profile"], MODEL_CPU_MS.get(best), model_best),
    }


def _with_model(
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


def _describe(layout: WorkerLayout) -> str:
    procs = f"{layout.processes} process" + ("es" if layout.processes > 1 else "")
    threads = f"{layout.threads or 'default'} thread" + ("" if layout.threads == 1 else "s")
    return f"{procs} x {threads}"


def cmd_bench(args: Any, settings: Settings) -> int:
    """Handler of `cxr-triage bench`."""
    if args.batch_wait_ms is not None:
        settings = settings.with_(batch_wait_ms=args.batch_wait_ms)
    doc = run(
        args.n,
        settings,
        args.latency_n,
        args.rate,
        pipeline_batch=args.batch_size,
        runtimes=not args.no_runtimes,
        choose_runtime=args.choose_runtime,
        requantise=args.requantise,
    )
    keys = (
        "device",
        "n",
        "model_only_img_s",
        "pipeline_img_s",
        "naive_img_s",
        "pipeline_vs_model",
        "pipeline_vs_naive",
        "latency_p50_ms",
        "latency_p95_ms",
        "runtime",
        "ingest_wait_s",
        "naive_s_same_images",
        "startup_s",
        "runtimes",
        "profile",
    )
    if args.json:
        print(json.dumps({k: doc[k] for k in keys}))
        return 0
    from bench.runtimes_bench import table

    if doc["runtimes"]:
        print(table(doc["runtimes"]))
    for key, value in doc.items():
        if key not in ("runtimes", "profile"):
            print(f"{key:24} {value}")
    print(profile_table(doc["profile"]))
    return 0


def register(sub: Any) -> None:
    """Add `bench` to the CLI."""
    p = sub.add_parser("bench", help="measure model alone, pipeline and the naive pattern")
    p.add_argument("--n", type=int, default=256, help="images in the timed runs")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pipeline batch size (default: the model's best, measured)",
    )
    p.add_argument("--batch-wait-ms", type=int, default=None)
    p.add_argument("--latency-n", type=int, default=30)
    p.add_argument("--rate", type=float, default=2.0, help="studies/s for the latency run")
    p.add_argument("--no-runtimes", action="store_true", help="skip the runtime comparison")
    p.add_argument(
        "--choose-runtime",
        action="store_true",
        help="record the fastest runtime that passes, for CXR_RUNTIME=auto",
    )
    p.add_argument(
        "--requantise",
        action="store_true",
        help="calibrate the int8 model again (drops every CPU's recorded choice)",
    )
    p.set_defaults(handler=cmd_bench)


if __name__ == "__main__":
    from pipeline.cli.main import main

    sys.exit(main(["bench", *sys.argv[1:]]))
