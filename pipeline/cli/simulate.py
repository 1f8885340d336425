"""``cxr-triage simulate``: the reporting-delay experiment on our model's real outputs."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import Settings
from pipeline.simulation import simulate as sim

log = logging.getLogger(__name__)
# The paper reports normal-film detection: sensitivity 0.71, specificity 0.95. Seen from the
# abnormal side (what flags a study for the top of the worklist) that is 0.95 / 0.71.
PAPER_SENSITIVITY, PAPER_SPECIFICITY = 0.95, 0.71
# Its PPV 73% and NPV 94% for normal films at those figures imply 16% normal films.
PAPER_PREVALENCE = 0.84


class SimulationInputError(Exception):
    """The predictions or labels given to the simulation cannot be used."""


def _thresholds(args: argparse.Namespace, settings: Settings) -> dict[str, float]:
    from pipeline.classifier.network import DEFAULT_THRESHOLDS

    if args.thresholds:
        pairs = (item.split("=", 1) for item in args.thresholds.split(","))
        return {k.strip(): float(v) for k, v in pairs}
    if args.synthetic or not settings.weights_path.exists():
        return dict(DEFAULT_THRESHOLDS)
    from pipeline.classifier.weights import describe_weights

    return dict(describe_weights(settings)["thresholds"] or DEFAULT_THRESHOLDS)


def _read_csv(path: Path, required: set[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = required - set(reader.fieldnames or ())
            if missing:
                raise SimulationInputError(f"{path}: missing columns {', '.join(sorted(missing))}")
            return list(reader)
    except OSError as exc:
        raise SimulationInputError(f"cannot read {path}: {exc.strerror}") from exc


def load_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(p_abnormal, abnormal) from a ``cxr-triage evaluate --predictions-out`` CSV."""
    rows = _read_csv(path, {"abnormal", "p_abnormal"})
    if not rows:
        raise SimulationInputError(f"{path}: no predictions")
    p = np.array([float(r["p_abnormal"]) for r in rows])
    abnormal = np.array([int(float(r["abnormal"])) == 1 for r in rows])
    return p, abnormal


def load_database(settings: Settings, labels: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored study p_abnormal; ground truth from a labels CSV joined by accession, else None."""
    from sqlalchemy import select

    from pipeline import migrate
    from pipeline.models import Study

    migrate.upgrade(settings.db_url)
    from pipeline.db import session_factory

    factory = session_factory(settings)
    with factory() as session:
        result = session.execute(
            select(Study.accession_number, Study.p_abnormal).where(Study.p_abnormal.is_not(None))
        ).all()
    rows = [(acc, float(p)) for acc, p in result if p is not None]
    if not rows:
        raise SimulationInputError("the database holds no scored studies: ingest some first")
    if labels is None:
        return np.array([p for _, p in rows]), None
    truth = {
        r["accession_number"]: int(float(r["abnormal"])) == 1
        for r in _read_csv(labels, {"accession_number", "abnormal"})
    }
    joined = [(p, truth[acc]) for acc, p in rows if acc in truth]
    if not joined:
        raise SimulationInputError(f"no scored study's accession number is in {labels}")
    log.info("joined %d of %d scored studies to labels", len(joined), len(rows))
    return np.array([p for p, _ in joined]), np.array([a for _, a in joined])


def _reweight(
    p: np.ndarray, abnormal: np.ndarray, prevalence: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a labelled pool to the given share of abnormal studies."""
    pos, neg = np.flatnonzero(abnormal), np.flatnonzero(~abnormal)
    if not len(pos) or not len(neg):
        raise SimulationInputError("--prevalence needs both abnormal and normal studies")
    n = max(len(p), 10_000)
    is_pos = rng.random(n) < prevalence
    idx = np.where(is_pos, rng.choice(pos, n), rng.choice(neg, n))
    return p[idx], abnormal[idx]


def build_pool(
    args: argparse.Namespace, settings: Settings, thresholds: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The model outputs the simulated studies are drawn from, and where they came from."""
    rng = np.random.default_rng(args.seed + 1)
    truth: np.ndarray | None
    source: dict[str, Any]
    if args.predictions:
        p, truth = load_predictions(Path(args.predictions))
        source = {"source": "predictions", "file": str(args.predictions)}
    elif args.from_db:
        p, truth = load_database(settings, Path(args.labels) if args.labels else None)
        source = {"source": "database", "labels": args.labels}
    else:
        prevalence = PAPER_PREVALENCE if args.prevalence is None else args.prevalence
        p, truth = sim.synthetic_predictions(
            20_000, prevalence, args.sensitivity, args.specificity, thresholds["routine"], rng
        )
        source = {
            "source": "synthetic",
            "sensitivity": args.sensitivity,
            "specificity": args.specificity,
            "prevalence": prevalence,
        }
    source["pool_size"] = int(len(p))
    if truth is None:
        # Without ground truth the groups are the model's own calls, and say so.
        source["groups"] = "predicted class (no ground truth: abnormal = flagged by the model)"
        return p, p >= thresholds["routine"], source
    source["groups"] = "ground truth"
    if args.prevalence is not None and source["source"] != "synthetic":
        p, truth = _reweight(p, truth, args.prevalence, rng)
    return p, truth, source


def _hours(text: str) -> tuple[float, float]:
    lo, hi = text.split("-", 1)
    return float(lo), float(hi)


def scenario_from(args: argparse.Namespace) -> sim.Scenario:
    """The simulated department from the command line."""
    hourly = tuple(float(w) for w in args.hourly.split(",")) if args.hourly else sim.DEFAULT_HOURLY
    if len(hourly) != 24:
        raise SimulationInputError("--hourly needs 24 comma-separated weights")
    return sim.Scenario(
        days=args.days,
        warmup_days=args.warmup_days,
        volume=args.volume,
        capacity=args.capacity or args.volume,
        reading_hours=_hours(args.reading_hours),
        backlog_days=args.backlog_days,
        cap_h=args.cap_hours,
        hourly=hourly,
        seed=args.seed,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(doc: dict[str, Any]) -> None:
    """Human-readable result (CLI output)."""
    sc, model = doc["scenario"], doc["model"]
    print(
        f"{doc['counted_studies']} studies counted ({sc['days']} days after {sc['warmup_days']} "
        f"warm-up), {sc['volume']}/day arriving, {sc['capacity']}/day read "
        f"{sc['reading_hours'][0]:g}-{sc['reading_hours'][1]:g} h, backlog {sc['backlog_days']:g} "
        f"days, cap {sc['cap_h']:g} h"
    )
    print(
        f"model: {model['source']}; sensitivity {doc['sensitivity']}, specificity "
        f"{doc['specificity']}, prevalence {doc['prevalence']} (abnormal); groups: {model['groups']}"
    )
    head = "".join(f"{k:>9}" for k in ("mean", "median", "p95", "max"))
    print(f"{'hours':<16} | {'abnormal:':<10}{head} | {'normal:':<10}{head}")
    for name in (*sim.DISCIPLINES, "oracle", "oracle_capped"):
        cells = [
            "".join(f"{_fmt(doc[name][g][k]):>9}" for k in ("mean_h", "median_h", "p95_h", "max_h"))
            for g in ("abnormal", "normal")
        ]
        share = doc["achieved_share"].get(name)
        note = f"  ({100 * share:.0f} % of the oracle's cut)" if share is not None else ""
        print(f"{name:<16} | {'':<10}{cells[0]} | {'':<10}{cells[1]}{note}")
    if doc["fifo_meets_cap"] is False:
        print(f"note: even FIFO exceeds the {sc['cap_h']:g} h cap: capacity does not allow it")


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Run the experiment and print JSON or a table."""
    try:
        scenario = scenario_from(args)
        thresholds = _thresholds(args, settings)
        p, abnormal, model = build_pool(args, settings, thresholds)
        result, curves = sim.run_experiment(scenario, p, abnormal, thresholds)
    except (SimulationInputError, ValueError) as exc:
        print(f"cxr-triage simulate: {exc}", file=sys.stderr)
        return 2
    if model["groups"] != "ground truth":
        result["sensitivity"] = result["specificity"] = None
    fifo_max = max(v["max_h"] or 0 for v in result["fifo"].values())  # type: ignore[attr-defined]
    doc = {
        "scenario": scenario.as_dict(),
        "thresholds": thresholds,
        "model": model,
        **result,
        "fifo_meets_cap": fifo_max <= scenario.cap_h,
    }
    if args.plot:
        from pipeline.simulation.plot import plot_delays

        plot_delays(curves, Path(args.plot), title=f"{model['source']}, cap {scenario.cap_h:g} h")
    if args.json:
        print(json.dumps(doc))
    else:
        print_table(doc)
        if args.plot:
            print(f"delay distributions written to {args.plot}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``simulate`` command."""
    sp = subparsers.add_parser(
        "simulate", help="simulate reporting delays: FIFO vs the AI priority worklist"
    )
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--predictions", metavar="FILE", help="CSV from `evaluate --predictions-out`")
    src.add_argument("--from-db", action="store_true", help="stored predictions of scored studies")
    src.add_argument(
        "--synthetic", action="store_true", help="a model with given sens/spec (default)"
    )
    sp.add_argument("--labels", metavar="CSV", help="with --from-db: accession_number,abnormal")
    sp.add_argument(
        "--sensitivity",
        type=float,
        default=PAPER_SENSITIVITY,
        help="share of abnormal studies flagged (default 0.95: the paper's normal-film specificity)",
    )
    sp.add_argument(
        "--specificity",
        type=float,
        default=PAPER_SPECIFICITY,
        help="share of normal studies not flagged (default 0.71: the paper's normal-film sensitivity)",
    )
    sp.add_argument(
        "--prevalence",
        type=float,
        help="share of abnormal studies (synthetic default 0.84, as the paper's PPV/NPV imply; "
        "resamples a predictions file)",
    )
    sp.add_argument("--thresholds", help="critical=0.9,urgent=0.7,routine=0.4 (default: weights')")
    sp.add_argument("--days", type=int, default=28, help="days of arrivals counted")
    sp.add_argument("--warmup-days", type=int, default=7, help="days simulated, not counted")
    sp.add_argument("--volume", type=int, default=200, help="studies arriving per day")
    sp.add_argument("--capacity", type=int, help="studies read per day (default: the volume)")
    sp.add_argument("--reading-hours", default="8-18", help="when reading happens, e.g. 8-18")
    sp.add_argument("--backlog-days", type=float, default=0.0, help="reading starts this late")
    sp.add_argument(
        "--cap-hours", type=float, default=48.0, help="maximum wait for the capped list"
    )
    sp.add_argument("--hourly", help="24 comma-separated relative arrival rates, hour 0 first")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", metavar="PNG", help="write the delay distributions as a PNG")
    sp.set_defaults(handler=cmd_simulate)
