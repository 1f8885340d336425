"""Leave-one-source-out: the yardstick of whether a model generalises to a new department.

For each source, a model is trained on all the others (training and validation drawn from
them alone) and evaluated on every image of the source it never saw. The mean and the worst
of those AUCs are the headline numbers of a model, beside the in-distribution ones.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per held-out source AUC and CAM-in-lung rate; mean and worst AUC over the sources."""
    rows = {}
    for name, result in results.items():
        own = result.get("per_source", {}).get(name, {})
        rows[name] = {
            "n": result["n"],
            "labels": result.get("labels", {}),
            "auc_abnormal": result["auc_abnormal"],
            "sensitivity_abnormal": result.get("sensitivity_abnormal"),
            "specificity_abnormal": result.get("specificity_abnormal"),
            "cam_peak_in_lungs": own.get("cam_peak_in_lungs", result["cam"]["peak_in_lung_fields"]),
            "cam_peak_in_lung_boxes": own.get("cam_peak_in_lung_boxes"),
            "lungs_found": own.get("lungs_found"),
            "weights": result.get("weights"),
        }
    aucs = {k: v["auc_abnormal"] for k, v in rows.items() if not math.isnan(v["auc_abnormal"])}
    worst = min(aucs, key=lambda k: aucs[k]) if aucs else None
    return {
        "sources": rows,
        "mean_auc": sum(aucs.values()) / len(aucs) if aucs else float("nan"),
        "worst_auc": aucs[worst] if worst else float("nan"),
        "worst_source": worst,
    }


def run_loso(configs: dict[str, Any], out_dir: Path, final: Any | None = None) -> dict[str, Any]:
    """Train and evaluate one model per held-out source; with ``final``, train on all sources.

    ``configs`` maps a source name to the TrainConfig that holds it out. The summary goes to
    ``out_dir/loso.json`` and, with ``final``, into the final weights' ``metrics["loso"]``.
    """
    from pipeline.training.evaluation import record_summary
    from pipeline.training.run import run

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cfg in configs.items():
        log.info("LOSO: training without %s", name)
        _, meta = run(cfg)
        results[name] = meta["metrics"]["held_out_source"]
    summary = summarise(results)
    summary["config"] = {
        k: v
        for k, v in vars(next(iter(configs.values()))).items()
        if k not in ("out", "checkpoint")
    }
    (out_dir / "loso.json").write_text(json.dumps(summary, indent=2, default=str))
    if final is not None:
        run(final)
        record_summary(Path(final.out), "loso", summary)
    return summary
