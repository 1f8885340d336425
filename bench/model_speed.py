"""The model alone, timed per batch size: in this process, and in the workers' layout."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.service.supervisor import WorkerLayout

if TYPE_CHECKING:  # torch is imported by the commands that run the model, not by the CLI
    from pipeline.classifier.network import Classifier

MODEL_BATCH_SIZES = (1, 8, 16, 32)
LAYOUT_BATCH_SIZES = (8, 16, 32)
# batch size, start, end (monotonic s), images, CPU seconds, the runtime that ran
Run = tuple[int, float, float, int, float, str]

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


def _layout_child(
    weights: str,
    runtime: str,
    layout: WorkerLayout,
    inputs_path: str,
    batch_sizes: tuple[int, ...],
    full_batches: bool,
    barrier: Any,
    out: Any,
) -> None:
    """One process of the layout: the model alone at each batch size, started with the others."""
    from pipeline.classifier.network import Classifier

    inputs = np.load(inputs_path)
    for bs in batch_sizes:
        clf = Classifier(Path(weights), layout.device, layout.threads, runtime, batch_size=bs)
        clf.predict(inputs[:bs])  # warm-up at this shape
        # full batches only: a runtime compiled for one shape per batch size
        n = (len(inputs) // bs) * bs if full_batches else len(inputs)
        barrier.wait()
        start, cpu = time.monotonic(), time.process_time()
        for i in range(0, n, bs):
            clf.predict(inputs[i : i + bs])
        out.put((bs, start, time.monotonic(), n, time.process_time() - cpu, clf.runtime))


def layout_runs(
    weights: Path,
    runtime: str,
    layout: WorkerLayout,
    inputs_path: Path,
    batch_sizes: tuple[int, ...],
    full_batches: bool = False,
) -> list[Run]:
    """Every process's run at every batch size, the layout's processes all at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(layout.processes), ctx.Queue()
    args = (str(weights), runtime, layout, str(inputs_path), batch_sizes, full_batches)
    procs = [
        ctx.Process(target=_layout_child, args=(*args, barrier, out))
        for _ in range(layout.processes)
    ]
    for proc in procs:
        proc.start()
    try:
        return [out.get(timeout=900) for _ in range(len(procs) * len(batch_sizes))]
    finally:
        for proc in procs:
            proc.join(timeout=60)


def rates_of(runs: list[Run], batch_sizes: tuple[int, ...]) -> dict[int, float]:
    """Images/s at each batch size: all the processes' images over the span they ran in."""
    rates = {}
    for bs in batch_sizes:
        mine = [r for r in runs if r[0] == bs]
        rates[bs] = sum(r[3] for r in mine) / (max(r[2] for r in mine) - min(r[1] for r in mine))
    return rates


def measure_model_layout(
    weights: Path, layout: WorkerLayout, inputs: np.ndarray, workdir: Path, runtime: str = "eager"
) -> dict[int, float]:
    """Images/s of the model alone in the workers' layout: its processes all at once."""
    path = workdir / "model-inputs.npy"
    np.save(path, inputs)
    runs = layout_runs(weights, runtime, layout, path, LAYOUT_BATCH_SIZES)
    for bs in LAYOUT_BATCH_SIZES:
        mine = [r for r in runs if r[0] == bs]
        MODEL_CPU_MS["layout", bs] = sum(r[4] for r in mine) * 1000.0 / sum(r[3] for r in mine)
    return rates_of(runs, LAYOUT_BATCH_SIZES)
