"""``cxr-triage drift-reference DATA... [--subset test] [--per-source N] [--json]``.

Makes the drift reference of the weights in use (``pipeline.monitoring.drift``) from labelled films it was
measured on: the model's score, the display grey level, the image size and the file kind of each,
as shares in fixed bins, written beside the weights as ``<weights>.reference.json``. Run it again
from a site's own validated films to make them the reference. ``--json``: one line on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.settings import Settings


def build_reference(
    data: list[Path], weights: Path, subset: str, per_source: int, device: str = "cpu"
) -> dict[str, Any]:
    """The reference document (see pipeline.monitoring.drift) of these weights on these films."""
    import numpy as np

    from pipeline.classifier.network import Classifier
    from pipeline.classifier.weights import file_sha256, read_meta
    from pipeline.imaging.decode import decode_bytes
    from pipeline.monitoring import drift
    from pipeline.training import datasets as ds

    samples = ds.select_as_trained(ds.read_datasets(data), subset, read_meta(weights))
    by_source: dict[str, list[ds.Sample]] = {}
    for s in sorted(samples, key=lambda s: hashlib.sha256(s.key.encode()).hexdigest()):
        if len(by_source.setdefault(s.source, [])) < per_source:
            by_source[s.source].append(s)
    chosen = [s for rows in by_source.values() for s in rows]
    if not chosen:
        raise ds.DatasetError(f"no images in subset {subset!r}")
    clf = Classifier(weights, device)
    intensities, sizes, kinds, inputs = [], [], [], []
    for s in chosen:
        decoded = decode_bytes(s.path.read_bytes(), s.path.name)
        intensities.append(float(decoded.pixels[::4, ::4].mean()))
        size = drift.size_of(decoded.width, decoded.height)
        if size is not None:
            sizes.append(size)
        kinds.append(drift.kind_of(decoded.kind, decoded.meta.get("Modality")))
        inputs.append(ds.load_one(s.path, clf.input_size, clf.preprocess))
    scores: list[float] = []
    normal = clf.classes.index("normal")
    for start in range(0, len(inputs), 64):
        out = clf.predict(np.stack(inputs[start : start + 64]))
        scores.extend(float(1.0 - p[normal]) for p in out.probabilities)
    return {
        "weights_sha256": file_sha256(weights),
        "made": time.strftime("%Y-%m-%d"),
        "from": {
            "subset": subset,
            "per_source": per_source,
            "sources": {k: len(v) for k, v in by_source.items()},
        },
        "n": len(chosen),
        "features": {
            k: v for k, v in drift.profile(scores, intensities, sizes, kinds).items() if k != "n"
        },
    }


def cmd_reference(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.classifier.weights import ensure_weights
    from pipeline.monitoring import drift
    from pipeline.training.datasets import DatasetError

    weights = Path(args.weights) if args.weights else ensure_weights(settings)
    try:
        doc = build_reference([Path(p) for p in args.data], weights, args.subset, args.per_source)
    except (DatasetError, OSError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(f"cxr-triage drift-reference: {exc}", file=sys.stderr)
        return 2
    out = drift.reference_path(weights)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps({"ok": True, "path": str(out), "n": doc["n"], "from": doc["from"]}))
    else:
        print(f"wrote {out}: {doc['n']} films ({doc['from']['sources']})")
    return 0


def register(sub: Any) -> None:
    ref = sub.add_parser(
        "drift-reference", help="record the score and input statistics drift is judged against"
    )
    ref.add_argument("data", nargs="+", help="labelled films: folders per class or CSVs")
    ref.add_argument("--subset", choices=("all", "test", "val", "train"), default="test")
    ref.add_argument("--per-source", type=int, default=300, help="films per source (default 300)")
    ref.add_argument("--weights", help="weights file (default: the one in use)")
    ref.add_argument("--json", action="store_true", help="one JSON line on stdout")
    ref.set_defaults(handler=cmd_reference)
