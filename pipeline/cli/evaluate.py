"""``cxr-triage evaluate``: measure a weights file on labelled radiographs (per class, per
source, CAM placement, a source probe), and optionally record it in the weights' metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.cli.common import rounded, torch_threads
from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("evaluate", help="measure a weights file on labelled radiographs")
    ev.add_argument("data", nargs="+")
    ev.add_argument("--weights", help="weights file (default: the one in use)")
    ev.add_argument("--subset", choices=("all", "test", "val", "train"), default="all")
    ev.add_argument("--label-map")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--report", help="folder for PNGs: confusion matrix, ROC, CAM grid")
    ev.add_argument("--predictions-out", help="CSV path,label,abnormal,p_abnormal,predicted")
    ev.add_argument("--record", metavar="NAME", help="store the summary in the weights' metrics")
    ev.add_argument(
        "--source-probe",
        action="store_true",
        help="also tell the sources apart with a linear probe on the model's features",
    )
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a weights file and print metrics."""
    from pipeline.training.evaluation import run_evaluation

    torch_threads(args.threads)
    if args.weights:
        weights = Path(args.weights)
    else:
        from pipeline.classifier.weights import ensure_weights

        weights = ensure_weights(settings)
    result = run_evaluation(
        [Path(p) for p in args.data],
        weights,
        subset=args.subset,
        label_map=args.label_map,
        report=Path(args.report) if args.report else None,
        predictions_out=Path(args.predictions_out) if args.predictions_out else None,
        device=args.device,
        source_probe=args.source_probe,
    )
    result = rounded(result)
    if args.record:
        from pipeline.training.evaluation import record_metrics

        command = "cxr-triage evaluate " + " ".join(args.data) + f" --subset {args.subset}"
        record_metrics(weights, args.record, result, command)
    if args.json:
        print(json.dumps(result, separators=(",", ":")))  # exactly one line
        return 0
    print(f"n={result['n']}  threshold(routine)={result['threshold']:.4f}")
    print(
        f"AUC abnormal {result['auc_abnormal']}  sensitivity {result['sensitivity_abnormal']}  "
        f"specificity {result['specificity_abnormal']}  ECE {result['ece']}"
    )
    for name, m in result["per_class"].items():
        print(
            f"  {name:10s} P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} "
            f"n {m['support']}  AUC(ovr) {result['auc_ovr'][name]}"
        )
    print("confusion matrix (rows truth, columns predicted):", result["confusion_matrix"])
    for name, row in result.get("per_source", {}).items():
        print(
            f"source {name:24s} n {row['n']:5d}  AUC {row['auc_abnormal']}  "
            f"CAM peak in lungs {row['cam_peak_in_lungs']}  lungs found {row['lungs_found']}"
        )
    probe = result.get("source_probe")
    if probe:
        print(
            f"linear probe on the model's features tells the sources apart: accuracy "
            f"{probe['accuracy']:.3f} (chance {probe['chance']:.3f}, n_test {probe['n_test']})"
        )
    return 0
