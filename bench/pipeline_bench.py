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

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.model_speed import MODEL_CPU_MS, measure_model, measure_model_layout
from bench.naive_bench import measure_naive
from bench.pipeline_profile import profile_table, with_model
from bench.pipeline_run import WARMUP, bench_images, measure_pipeline
from pipeline.classifier.weights import ensure_weights
from pipeline.service.supervisor import WorkerLayout, inference_layout
from pipeline.settings import Settings
from pipeline.training.datasets import load_one

# What `cxr-triage bench --json` prints, in this order (a contract: tests/bench checks it).
JSON_KEYS = (
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
    from pipeline.classifier.runtime_record import write_choice

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
        "profile": with_model(pipe["profile"], MODEL_CPU_MS.get(best), model_best),
    }


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
    if args.json:
        print(json.dumps({k: doc[k] for k in JSON_KEYS}))
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
