"""The ``train`` and ``evaluate`` commands of ``cxr-triage``."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from pipeline.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the train and evaluate parsers."""
    tr = subparsers.add_parser("train", help="train a classifier on labelled radiographs")
    tr.add_argument("data", nargs="+", help="folders with a folder per class, or CSVs path,label")
    tr.add_argument("--arch", default="resnet18")
    tr.add_argument("--classes", default="normal,pneumonia,covid19")
    tr.add_argument("--label-map", help="SOURCE=class,... (case-insensitive, added to defaults)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--input-size", type=int, default=224)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--epoch-size", type=int, default=0, help="images per epoch (0 = all)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--val-fraction", type=float, default=0.1)
    tr.add_argument("--holdout-fraction", type=float, default=0.2)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--checkpoint", help="resumable checkpoint path (default OUT.ckpt)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    tr.add_argument("--init", help="torchvision-compatible state dict to start from")
    tr.add_argument("--cache-dir", help="folder for decoded-image caches")
    tr.add_argument("--threads", type=int, default=0)
    tr.add_argument("--amp", choices=("off", "bf16"), default="off",
                    help="bf16: mixed-precision training (GPUs, CPUs with AMX); weights stay fp32")  # fmt: skip
    tr.add_argument("--out", required=True)
    tr.set_defaults(handler=cmd_train)

    ev = subparsers.add_parser("evaluate", help="measure a weights file on labelled radiographs")
    ev.add_argument("data", nargs="+")
    ev.add_argument("--weights", help="weights file (default: the one in use)")
    ev.add_argument("--subset", choices=("all", "test", "val", "train"), default="all")
    ev.add_argument("--label-map")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--report", help="folder for PNGs: confusion matrix, ROC, CAM grid")
    ev.add_argument("--predictions-out", help="CSV path,label,abnormal,p_abnormal,predicted")
    ev.add_argument("--record", metavar="NAME", help="store the summary in the weights' metrics")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(handler=cmd_evaluate)


def _torch_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train and write a weights file."""
    from pipeline.train_run import TrainConfig, run

    _torch_threads(args.threads)
    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        arch=args.arch,
        classes=[c.strip().lower() for c in args.classes.split(",") if c.strip()],
        label_map=args.label_map,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        holdout_fraction=args.holdout_fraction,
        epoch_size=args.epoch_size,
        device=args.device,
        checkpoint=args.checkpoint,
        resume=args.resume,
        init=args.init,
        cache_dir=args.cache_dir,
        amp=args.amp,
    )
    _, meta = run(cfg)
    val = meta["metrics"]["validation"]
    print(
        f"wrote {args.out}: validation AUC(abnormal) {val['auc_abnormal']:.4f}, "
        f"thresholds {json.dumps({k: round(v, 4) for k, v in meta['thresholds'].items()})}"
    )
    return 0


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a weights file and print metrics."""
    from pipeline.evaluate_run import run_evaluation

    _torch_threads(args.threads)
    if args.weights:
        weights = Path(args.weights)
    else:
        from pipeline.weights import ensure_weights

        weights = ensure_weights(settings)
    result = run_evaluation(
        [Path(p) for p in args.data],
        weights,
        subset=args.subset,
        label_map=args.label_map,
        report=Path(args.report) if args.report else None,
        predictions_out=Path(args.predictions_out) if args.predictions_out else None,
        device=args.device,
    )
    result = _clean(result)
    if args.record:
        from pipeline.evaluate_run import record_metrics

        command = "cxr-triage evaluate " + " ".join(args.data) + f" --subset {args.subset}"
        record_metrics(weights, args.record, result, command)
    if args.json:
        print(json.dumps(result, indent=2))
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
    return 0
