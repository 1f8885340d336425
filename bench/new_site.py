"""A hospital no one trained on: the NIH sample fed through the system, calibrated on its first part.

``python -m bench.new_site [--target-sensitivity 0.95] [--json]`` treats
``../shared/data/cxr/nih-cxr14-sample`` as a new department, with the commands a department
would run, each as its own ``cxr-triage`` process on a private data directory:

1. ``users create`` an admin, and ``run`` the whole system with a watched folder
   (``CXR_WATCH_DIR``); the first part of the films (arrival order: patient, then follow-up
   number) is dropped into it, each JPEG with a sidecar giving its accession number and patient
   id, and goes through ingest, Redis and the inference workers;
2. ``labels import`` the first part's outcomes as the RIS would send them;
3. ``calibrate --json`` on them, and the proposal applied as a new policy version (what the
   admin's Apply button on the console saves);
4. ``train --from-db`` a candidate fine-tuned on those reviewed studies (nothing live changes);
5. the later part dropped into the folder, ranked under the new policy.

On the later part, never used for calibrating or training: the AUC of the shipped model and of
the candidate (``evaluate``, the same code path for both), and the sensitivity and specificity
at the routine threshold before (the weights' thresholds) and after (the site's policy). The
split is by patient: no patient of the later part is in the first. ``--json``: one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.new_site_steps import (
    ADMIN,
    NIH,
    PASSWORD,
    REPO,
    accession,
    arrival_order,
    cli,
    evaluations,
    free_port,
    later_scores,
    rates,
    screenshots,
    split_by_patient,
    stage,
    wait_final,
    write_outcomes,
)

CALIBRATION_KEYS = (
    "reviewed",
    "abnormal",
    "normal",
    "temperature_scale",
    "thresholds",
    "expected",
    "waiting_changed",
)


def _site_env(workdir: Path, incoming: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(workdir / "var"),
        "CXR_WATCH_DIR": str(incoming),
        "CXR_WATCH_SETTLE_MS": "300",
        "CXR_PORT": str(free_port()),
        "CXR_REGISTRY_CHECK_S": "2",
    }
    for key in ("CXR_DATABASE_URL", "CXR_REDIS_URL"):
        env.pop(key, None)
    return env


def _calibrate(
    first: list[dict[str, str]],
    target: float,
    workdir: Path,
    env: dict[str, str],
    factory: Any,
    thresholds: dict[str, float],
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Import the first part's outcomes, calibrate on them, apply the proposal as a policy."""
    from pipeline.models import User
    from pipeline.triage.policy import save

    labels = write_outcomes(workdir / "first-outcomes.csv", first)
    imported = json.loads(cli(["labels", "import", str(labels), "--user", ADMIN, "--json"], env))
    proposal = json.loads(cli(["calibrate", "--json", "--target-sensitivity", str(target)], env))
    with factory() as session:  # the admin's Apply on the console saves exactly this
        admin = session.query(User).filter_by(username=ADMIN).one()
        policy, _ = save(session, proposal["body"], admin.id, proposal["reason"], thresholds)
        session.commit()
    return imported, proposal, policy


def _fine_tune(
    workdir: Path, env: dict[str, str], epochs: int, epoch_size: int, factory: Any, weights: Path
) -> tuple[Path, float, dict[str, Any]]:
    """Train a candidate on the reviewed studies, register it, and start it in shadow."""
    from pipeline.classifier.registry import start_shadow
    from pipeline.models import User

    candidate = workdir / "candidate.pt"
    t1 = time.monotonic()
    train = ["train", "--from-db", "--epochs", str(epochs), "--epoch-size", str(epoch_size)]
    cli([*train, "--lr", "5e-4", "--threads", "2", "--out", str(candidate)], env)
    train_s = time.monotonic() - t1
    note = "fine-tuned on the first part"
    register = ["models", "register", str(candidate), "--user", ADMIN, "--note", note, "--json"]
    reg = json.loads(cli(register, env))
    with factory() as session:  # the console's Shadow button
        admin = session.query(User).filter_by(username=ADMIN).one()
        start_shadow(session, reg["version"], admin.id, weights)
        session.commit()
    return candidate, train_s, reg


def run(
    target: float,
    share: float,
    workdir: Path,
    epochs: int,
    epoch_size: int,
    screenshots_dir: Path | None = None,
) -> dict[str, Any]:
    """The whole scenario on a private data directory; the --json document."""
    from pipeline.classifier.weights import describe_weights, ensure_weights
    from pipeline.db import make_engine, make_session_factory
    from pipeline.migrate import upgrade
    from pipeline.monitoring.performance import auc_delong
    from pipeline.monitoring.shadow import comparison
    from pipeline.settings import Settings
    from pipeline.triage.policy import active

    rows = arrival_order(list(csv.DictReader((NIH / "labels.csv").open())))
    first, later = split_by_patient(rows, share)
    incoming = workdir / "incoming"
    incoming.mkdir()
    env = _site_env(workdir, incoming)
    cli(["users", "create", ADMIN, "--role", "admin", "--password-stdin"], env, PASSWORD + "\n")
    settings = Settings.from_env(env)
    settings = settings.with_(weights=ensure_weights(settings))
    upgrade(settings.db_url)
    model = describe_weights(settings)
    engine = make_engine(settings.db_url)
    factory = make_session_factory(engine)
    system = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "run"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "run.log").open("w"),
        start_new_session=True,
    )
    t0 = time.monotonic()
    try:
        stage(first, incoming)
        wait_final(factory, {accession(r) for r in first})
        first_s = time.monotonic() - t0
        imported, proposal, policy = _calibrate(
            first, target, workdir, env, factory, model["thresholds"]
        )
        weights = Path(settings.weights or "")
        candidate, train_s, reg = _fine_tune(workdir, env, epochs, epoch_size, factory, weights)
        time.sleep(2 * float(env["CXR_REGISTRY_CHECK_S"]))  # the workers see it between batches
        stage(later, incoming)
        wait_final(factory, {accession(r) for r in later})
        # the reads of the later part, as they come
        outcomes = write_outcomes(workdir / "later-outcomes.csv", later)
        cli(["labels", "import", str(outcomes), "--user", ADMIN, "--json"], env)
        with factory() as session:
            now_policy = active(session)
            shadow_doc = comparison(
                session, (now_policy.thresholds or {}).get("routine"), now_policy.temperature_scale
            )
        if screenshots_dir is not None:
            screenshots(f"http://127.0.0.1:{env['CXR_PORT']}", screenshots_dir)
    finally:
        os.killpg(system.pid, signal.SIGTERM)
        system.wait(timeout=60)
    scores = later_scores(factory, {accession(r): r["label"] == "abnormal" for r in later})
    engine.dispose()
    now, p, y = scores["policy"], scores["p"], scores["y"]
    assert now.thresholds is not None
    before = rates(p, y, model["thresholds"]["routine"])
    after = rates([now.p(x) for x in p], y, now.thresholds["routine"])
    shipped_eval, cand_eval = evaluations(later, workdir, env, candidate)
    return {
        "films": {
            "first": len(first),
            "later": len(later),
            "first_patients": len({r["patient_id"] for r in first}),
            "later_patients": len({r["patient_id"] for r in later}),
        },
        "first_part_seconds": round(first_s, 1),
        "labels_imported": imported.get("imported"),
        "calibration": {k: proposal[k] for k in CALIBRATION_KEYS},
        "policy_version": policy.version,
        "later_ranked_under_policy": scores["under"],
        "fine_tune": {"epochs": epochs, "epoch_size": epoch_size, "seconds": round(train_s, 1)},
        "later": {
            "scored": len(p),
            "abnormal": sum(y),
            "auc_live": auc_delong(p, y),
            "auc_shipped": shipped_eval["auc_abnormal"],
            "auc_candidate": cand_eval["auc_abnormal"],
            "routine_before": before,
            "routine_after": after,
            "target_sensitivity": target,
            "after_minus_target": None
            if after["sensitivity"] is None
            else round(after["sensitivity"] - target, 4),
            "worklist_calls_agree": scores["called"] == round((after["sensitivity"] or 0) * sum(y)),
        },
        "shadow_on_later_part": shadow_doc,
        "candidate": reg["version"],
        "model": model["version"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-sensitivity", type=float, default=0.95)
    ap.add_argument("--first-share", type=float, default=0.5, help="share of films calibrated on")
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    ap.add_argument("--epoch-size", type=int, default=1000, help="films per fine-tuning epoch")
    ap.add_argument("--screenshots", type=Path, help="save the console's pages of the run here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (NIH / "labels.csv").is_file():
        print(f"no NIH sample at {NIH}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cxr-new-site-") as tmp:
        doc = run(
            args.target_sensitivity,
            args.first_share,
            Path(tmp),
            args.epochs,
            args.epoch_size,
            args.screenshots,
        )
    if args.json:
        print(json.dumps(doc))
        return 0
    later = doc["later"]
    print(
        f"films: {doc['films']}; calibrated on {doc['calibration']['reviewed']} reviewed "
        f"({doc['calibration']['abnormal']} abnormal): temperature x"
        f"{doc['calibration']['temperature_scale']}, thresholds {doc['calibration']['thresholds']}"
    )
    print(
        f"later part: {later['scored']} films, {later['abnormal']} abnormal; AUC shipped "
        f"{later['auc_shipped']}, fine-tuned candidate {later['auc_candidate']}"
    )
    print(f"routine threshold before: {later['routine_before']}")
    print(
        f"routine threshold after:  {later['routine_after']} (target sensitivity "
        f"{later['target_sensitivity']}, difference {later['after_minus_target']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
