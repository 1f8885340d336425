"""``cxr-triage train`` and ``cxr-triage loso``: train a model (on public data, or this site's
reviewed studies), and leave each source out in turn."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.cli.common import rounded, torch_threads
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the train and loso parsers."""
    tr = subparsers.add_parser("train", help="train a classifier on labelled radiographs")
    _train_arguments(tr, data_optional=True)
    tr.add_argument(
        "--from-db",
        action="store_true",
        help="fine-tune the model in use on this site's reviewed studies (with DATA: "
        "public data mixed in); writes a candidate, changes nothing live",
    )
    tr.add_argument("--since", metavar="YYYY-MM-DD", help="with --from-db: truth recorded since")
    tr.add_argument(
        "--holdout-source",
        metavar="NAME",
        help="leave this source (its folder name) out of training; evaluate on it",
    )
    tr.add_argument("--out", required=True)
    tr.set_defaults(handler=cmd_train)

    lo = subparsers.add_parser(
        "loso", help="leave-one-source-out: train once per source left out, evaluate on it"
    )
    _train_arguments(lo)
    lo.add_argument("--out-dir", required=True, help="folder for each held-out model and loso.json")
    lo.add_argument("--only", help="comma-separated sources to hold out (default: every one)")
    lo.add_argument(
        "--final",
        metavar="OUT",
        help="then train on every source and record the LOSO summary in OUT's metrics",
    )
    lo.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    lo.set_defaults(handler=cmd_loso)


def _train_arguments(tr: Any, data_optional: bool = False) -> None:
    from pipeline.training.config import TrainConfig

    d = TrainConfig(data=[], out="")
    tr.add_argument(
        "data",
        nargs="*" if data_optional else "+",
        help="folders with a folder per class, or CSVs path,label",
    )
    tr.add_argument("--arch", default=d.arch)
    tr.add_argument(
        "--head",
        choices=("abnormal", "softmax"),
        default=d.head,
        help="abnormal: a binary triage logit plus a finding head (default)",
    )
    tr.add_argument(
        "--findings", default=",".join(d.findings), help="finding classes of the abnormal head"
    )
    tr.add_argument("--classes", default=",".join(d.classes), help="classes of the softmax head")
    tr.add_argument("--label-map", help="SOURCE=class,... (case-insensitive, added to defaults)")
    tr.add_argument("--epochs", type=int, default=d.epochs)
    tr.add_argument("--input-size", type=int, default=d.input_size)
    tr.add_argument("--layer4-stride", type=int, choices=(1, 2), default=d.layer4_stride)
    tr.add_argument("--preprocess", choices=("lungs", "thorax", "resize"), default=d.preprocess)
    tr.add_argument("--balance", choices=("source-label", "class"), default=d.balance)
    tr.add_argument("--augment", choices=("sources", "basic"), default=d.augment)
    # The weights of the anti-shortcut terms (0 = off): flag, metavar, what it weighs.
    for flag, metavar, what in (
        ("--adversary", "WEIGHT", "a source-adversarial head (gradient reversal)"),
        ("--mix-lungs", "SHARE", "images trained with all but the found lungs blacked out"),
        ("--cam-guide", "WEIGHT", "a loss on the CAM evidence outside the found lungs"),
    ):
        default = getattr(d, flag[2:].replace("-", "_"))
        tr.add_argument(
            flag, type=float, default=default, metavar=metavar, help=f"{what}; 0 = none"
        )
    tr.add_argument("--batch-size", type=int, default=d.batch_size)
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--epoch-size", type=int, default=0, help="images per epoch (0 = all)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--val-fraction", type=float, default=d.val_fraction)
    tr.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--checkpoint", help="resumable checkpoint path (default OUT.ckpt)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    tr.add_argument("--init", help="torchvision-compatible state dict to start from")
    tr.add_argument("--cache-dir", help="folder for decoded-image caches")
    tr.add_argument("--threads", type=int, default=0)
    tr.add_argument(
        "--amp",
        choices=("off", "bf16"),
        default="off",
        help="bf16: mixed-precision training (GPUs, CPUs with AMX); weights stay fp32",
    )


def _config(args: argparse.Namespace, out: str, holdout: str | None) -> Any:
    from pipeline.training.config import TrainConfig

    def names(text: str) -> list[str]:
        return [c.strip().lower() for c in text.split(",") if c.strip()]

    return TrainConfig(
        data=list(args.data),
        out=out,
        arch=args.arch,
        head=args.head,
        findings=names(args.findings),
        classes=names(args.classes),
        label_map=args.label_map,
        input_size=args.input_size,
        layer4_stride=args.layer4_stride,
        preprocess=args.preprocess,
        balance=args.balance,
        augment=args.augment,
        adversary=args.adversary,
        mix_lungs=args.mix_lungs,
        cam_guide=args.cam_guide,
        holdout_source=holdout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        holdout_fraction=args.holdout_fraction,
        epoch_size=args.epoch_size,
        device=args.device,
        checkpoint=getattr(args, "checkpoint", None),
        resume=args.resume,
        init=args.init,
        cache_dir=args.cache_dir,
        amp=args.amp,
    )


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train and write a weights file."""
    from pipeline.training.run import run

    torch_threads(args.threads)
    if args.from_db:
        return _train_from_db(args, settings)
    if not args.data:
        print("cxr-triage train: give DATA (folders or CSVs), or --from-db", file=sys.stderr)
        return 2
    cfg = _config(args, args.out, args.holdout_source)
    _, meta = run(cfg)
    val = meta["metrics"]["validation"]
    print(
        f"wrote {args.out}: validation AUC(abnormal) {val['auc_abnormal']:.4f}, "
        f"thresholds {json.dumps({k: round(v, 4) for k, v in meta['thresholds'].items()})}"
    )
    held = meta["metrics"].get("held_out_source")
    if held:
        print(f"held-out source {args.holdout_source}: AUC(abnormal) {held['auc_abnormal']:.4f}")
    return 0


def _train_from_db(args: argparse.Namespace, settings: Settings) -> int:
    """Export the reviewed studies, then fine-tune the weights in use on them (and DATA)."""
    import tempfile
    from datetime import UTC, datetime

    from pipeline import migrate
    from pipeline.classifier.weights import ensure_weights
    from pipeline.db import dispose_engines, session_factory
    from pipeline.training.run import run
    from pipeline.training.site_data import SiteDataError, export_reviewed

    since = None
    if args.since:
        try:
            since = datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            print(f"cxr-triage train: --since {args.since!r} is not a date", file=sys.stderr)
            return 2
    migrate.upgrade(settings.db_url)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # the films stay on the site's disk
    with tempfile.TemporaryDirectory(prefix="cxr-site-", dir=settings.data_dir) as tmp:
        try:
            with session_factory(settings)() as session:
                table, counts = export_reviewed(session, Path(tmp), since)
        except SiteDataError as exc:
            print(f"cxr-triage train --from-db: {exc}", file=sys.stderr)
            return 2
        finally:
            dispose_engines()
        args.data = [str(table), *args.data]
        args.init = args.init or str(ensure_weights(settings))
        log.info("fine-tuning %s on %s reviewed images of this site", args.init, counts)
        cfg = _config(args, args.out, None)
        _, meta = run(cfg)
    val = meta["metrics"]["validation"]
    print(
        f"wrote candidate {args.out} from {counts} reviewed images: validation "
        f"AUC(abnormal) {val['auc_abnormal']:.4f}; nothing live changed"
    )
    return 0


def cmd_loso(args: argparse.Namespace, settings: Settings) -> int:
    """Leave each source out in turn; print per-source, mean and worst AUC; optionally ship."""
    from pipeline.training import datasets as ds
    from pipeline.training.loso import run_loso

    torch_threads(args.threads)
    names = sorted({s.source for s in ds.read_datasets(Path(p) for p in args.data)})
    only = [n.strip() for n in (args.only or "").split(",") if n.strip()] or names
    out_dir = Path(args.out_dir)
    configs = {n: _config(args, str(out_dir / f"holdout-{n}.pt"), n) for n in only}
    for name, cfg in configs.items():
        cfg.checkpoint = str(out_dir / f"holdout-{name}.ckpt")
    final = _config(args, args.final, None) if args.final else None
    summary = rounded(run_loso(configs, out_dir, final))
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
        return 0
    for name, row in summary["sources"].items():
        print(f"{name:24s} AUC {row['auc_abnormal']}  CAM peak in lungs {row['cam_peak_in_lungs']}")
    print(
        f"LOSO mean AUC {summary['mean_auc']}  worst {summary['worst_auc']} ({summary['worst_source']})"
    )
    return 0
