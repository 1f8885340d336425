"""Which runtime a worker uses: measured per CPU and weights file, recorded beside the weights.

The bench records, per CPU, the fastest runtime whose abnormal-vs-normal AUC stays within 0.005
of float32 eager and whose CAM peak cell matches float32's for at least 95 % of test images.
``CXR_RUNTIME=auto`` (the default) uses that record; a runtime whose package is missing, or a
record made on another CPU or for other weights, falls back to eager PyTorch and says so in the
log.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUC_TOLERANCE = 0.005
CAM_AGREEMENT = 0.95


def cpu_signature() -> str:
    """The CPU a measurement belongs to: model name and the instruction sets kernels pick."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return " ".join([name, *isa])


def record_path(weights: Path) -> Path:
    """The measured runtime choice of a weights file, per CPU, kept beside it."""
    return weights.with_name(weights.stem + ".runtime.json")


def read_record(weights: Path) -> dict[str, Any]:
    path = record_path(weights)
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def write_choice(weights: Path, sha256: str, choice: str, table: list[dict[str, Any]]) -> Path:
    """Record the runtime chosen on this CPU (other CPUs' choices are kept)."""
    record = read_record(weights)
    if record.get("weights_sha256") != sha256:
        record = {"weights_sha256": sha256, "cpus": {}}
    record["cpus"][cpu_signature()] = {
        "runtime": choice,
        "measured": time.strftime("%Y-%m-%d"),
        "rule": f"fastest with |AUC - float32| <= {AUC_TOLERANCE} and CAM peak agreement >= "
        f"{CAM_AGREEMENT:.0%}",
        "table": table,
    }
    path = record_path(weights)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def forget_choices(weights: Path) -> None:
    """Drop every CPU's recorded choice (their int8 measurements were of a replaced file)."""
    record = read_record(weights)
    if record.get("cpus"):
        record["cpus"] = {}
        record_path(weights).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        log.warning("int8 model re-calibrated: the runtime choices of every CPU were dropped")


def recorded_choice(weights: Path, sha256: str) -> str | None:
    """The runtime measured best for these weights on this CPU, or None."""
    record = read_record(weights)
    if record.get("weights_sha256") != sha256:
        return None
    entry = record.get("cpus", {}).get(cpu_signature())
    return None if entry is None else str(entry.get("runtime"))
