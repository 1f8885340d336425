"""Run several LOSO recipes at once, one process per (recipe, held-out source) cell.

The ablation of ``weights/MODEL_CARD.md`` is a grid: each recipe is three trainings, one per
source left out, and each training is independent of the others. On a machine with many cores
and a GPU they run side by side; this script starts every cell as its own ``cxr-triage loso
--only SOURCE`` (the command's own code path and defaults), waits, and merges the cells into one
summary per recipe (per-source AUC and CAM-in-lung rate, mean and worst AUC), written to
``OUT/grid.json`` after every finished cell so that a deadline still leaves the finished ones.

    python -m bench.loso_grid DATA_ROOT OUT --recipe shipped= --recipe adv=--adversary 0.3 \
        [--final shipped] [--parallel 12] [--deadline-s 3600]

DATA_ROOT holds ``kaggle-pneumonia/``, ``covid19-radiography/`` and ``nih-cxr14-sample/`` with
their ``labels.csv``. A recipe is NAME=FLAGS, the flags of ``cxr-triage train``. ``--final NAME``
also trains that recipe on every source (``OUT/NAME/final.pt``). ``--pack`` / ``--unpack`` move
the data to and from a compact copy (greyscale WebP, at most 160 px; see ``pack`` below) for a
training machine that the 113 MB originals do not reach.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SOURCES = ("covid19-radiography", "kaggle-pneumonia", "nih-cxr14-sample")
PACK_SIDE = 160
PACK_QUALITY = 90


def run_cli(argv: list[str]) -> int:
    """Run one ``cxr-triage`` model command (train, loso, evaluate) in this process."""
    import logging

    from pipeline.cli import evaluate, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="cxr-triage")
    commands = parser.add_subparsers(dest="command", required=True)
    train.register(commands)
    evaluate.register(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args, None))


def _pack_one(job: tuple[str, str, str]) -> int:
    import cv2

    src, dst, rel = job
    im = cv2.imread(str(Path(src) / rel), cv2.IMREAD_GRAYSCALE)
    h, w = im.shape
    if max(h, w) > PACK_SIDE:
        s = PACK_SIDE / max(h, w)
        im = cv2.resize(
            im, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(".webp", im, [cv2.IMWRITE_WEBP_QUALITY, PACK_QUALITY])
    out = Path(dst) / (rel + ".webp")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.tobytes())
    return len(buf)


def pack(root: Path, dst: Path, parts: int, sources: tuple[str, ...] = SOURCES) -> int:
    """Write every image of the three sources as WebP into dst/part-K (rows dealt round-robin).

    Greyscale, at most PACK_SIDE px on the long side, quality PACK_QUALITY: 40 MB for the 12,144
    films. The thorax input reads the crop at 64 px, so 160 px carries what it uses; the copy's
    compression is milder than the JPEG round trip of the training augmentation.
    """
    import shutil

    jobs = []
    for name in sources:
        rows = list(csv.DictReader((root / name / "labels.csv").open()))
        for i, row in enumerate(rows):
            jobs.append((str(root), str(dst / f"part-{i % parts}"), f"{name}/{row['path']}"))
        (dst / "part-0" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name / "labels.csv", dst / "part-0" / name / "labels.csv")
    with ProcessPoolExecutor(os.cpu_count() or 2) as ex:
        return sum(ex.map(_pack_one, jobs, chunksize=64))


def _unpack_one(job: tuple[str, str]) -> None:
    import cv2

    webp, out = job
    im = cv2.imread(webp, cv2.IMREAD_GRAYSCALE)
    ok, buf = cv2.imencode(".png", im)  # lossless: the image is what the WebP holds
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(buf.tobytes())


def unpack(parts: list[Path], root: Path) -> int:
    """Rebuild DATA_ROOT from packed parts: PNG files under the original names and CSVs."""
    import shutil

    jobs = []
    for part in parts:
        for webp in part.rglob("*.webp"):
            rel = webp.relative_to(part).as_posix()[: -len(".webp")]
            jobs.append((str(webp), str(root / rel)))
        for labels in part.glob("*/labels.csv"):
            (root / labels.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(labels, root / labels.parent.name / "labels.csv")
    with ProcessPoolExecutor(os.cpu_count() or 2) as ex:
        list(ex.map(_unpack_one, jobs, chunksize=64))
    return len(jobs)


def merge(cells: dict[str, dict[str, Any]], sources: tuple[str, ...] = SOURCES) -> dict[str, Any]:
    """One recipe's summary from its finished cells (as pipeline.training.loso.summarise).

    The mean and the worst are given only when every source's cell has an AUC.
    """
    rows = {name: cell for name, cell in sorted(cells.items())}
    aucs = {
        k: v["auc_abnormal"]
        for k, v in rows.items()
        if v.get("auc_abnormal") is not None and not math.isnan(v["auc_abnormal"])
    }
    complete = set(aucs) == set(sources)
    worst = min(aucs, key=lambda k: aucs[k]) if complete else None
    return {
        "sources": rows,
        "cells": len(rows),
        "mean_auc": sum(aucs.values()) / len(aucs) if complete else None,
        "worst_auc": aucs[worst] if worst else None,
        "worst_source": worst,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS")
    p.add_argument("--final", action="append", default=[], metavar="NAME")
    p.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated source folders under DATA_ROOT",
    )
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--deadline-s", type=float, default=math.inf)
    p.add_argument("--pack", type=int, metavar="PARTS", help="pack DATA_ROOT into OUT; no runs")
    p.add_argument(
        "--unpack",
        nargs="+",
        type=Path,
        metavar="PART",
        help="first rebuild DATA_ROOT from these packed parts",
    )
    p.add_argument("--cell", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell is not None:
        return run_cli(args.cell)
    sources = tuple(n.strip() for n in args.sources.split(",") if n.strip())
    if args.pack:
        size = pack(args.data_root, args.out, args.pack, sources)
        print(json.dumps({"packed_bytes": size, "out": str(args.out)}))
        return 0
    if args.unpack:
        t0 = time.perf_counter()
        n = unpack(args.unpack, args.data_root)
        print(f"unpacked {n} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    recipes = dict(r.split("=", 1) for r in args.recipe)
    csvs = [str(args.data_root / name / "labels.csv") for name in sources]
    jobs: list[tuple[str, str | None, list[str]]] = []
    for name, flags in recipes.items():
        for source in sources:
            out = args.out / name / source
            jobs.append(
                (
                    name,
                    source,
                    [
                        "loso",
                        *csvs,
                        *shlex.split(flags),
                        "--only",
                        source,
                        "--out-dir",
                        str(out),
                        "--cache-dir",
                        str(out / "cache"),
                        "--threads",
                        str(args.threads),
                        "--json",
                    ],
                )
            )
    for name in args.final:  # the finals first: they take the longest
        out = args.out / name
        jobs.insert(
            0,
            (
                name,
                None,
                [
                    "train",
                    *csvs,
                    *shlex.split(recipes[name]),
                    "--out",
                    str(out / "final.pt"),
                    "--cache-dir",
                    str(out / "final-cache"),
                    "--threads",
                    str(args.threads),
                ],
            ),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    pending, running = list(jobs), []
    results: dict[str, dict[str, Any]] = {name: {} for name in recipes}
    finals: dict[str, Any] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, source, cli = pending.pop(0)
            log = args.out / f"{name}-{source or 'final'}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loso_grid", "x", "y", "--cell", *cli],
                stdout=subprocess.PIPE,
                stderr=log.open("w"),
                text=True,
            )
            running.append((name, source, proc, time.monotonic()))
        time.sleep(1.0)
        for item in list(running):
            name, source, proc, t0 = item
            if proc.poll() is None:
                if time.monotonic() - start > args.deadline_s:
                    proc.kill()
                continue
            running.remove(item)
            out = proc.stdout.read() if proc.stdout else ""
            seconds = round(time.monotonic() - t0, 1)
            if source is None:
                finals[name] = {"rc": proc.returncode, "seconds": seconds, "stdout": out.strip()}
            elif proc.returncode == 0 and out.strip():
                summary = json.loads(out.strip().splitlines()[-1])
                results[name][source] = {**summary["sources"][source], "seconds": seconds}
            else:
                results[name][source] = {
                    "auc_abnormal": None,
                    "rc": proc.returncode,
                    "seconds": seconds,
                }
            grid = {
                "recipes": {
                    n: {"flags": recipes[n], **merge(c, sources)} for n, c in results.items()
                },
                "finals": finals,
                "elapsed_s": round(time.monotonic() - start, 1),
            }
            (args.out / "grid.json").write_text(json.dumps(grid, indent=1))
            print(
                f"[{grid['elapsed_s']:7.1f} s] {name} {source or 'final'}: rc {proc.returncode} "
                f"in {seconds} s",
                file=sys.stderr,
                flush=True,
            )
    grid = json.loads((args.out / "grid.json").read_text())
    for name, row in grid["recipes"].items():
        cells = " / ".join(f"{row['sources'].get(s, {}).get('auc_abnormal')}" for s in sources)
        print(
            f"{name:12s} mean {row['mean_auc']} worst {row['worst_auc']} ({cells})", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
