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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NIH = REPO.parent / "shared" / "data" / "cxr" / "nih-cxr14-sample"
ADMIN = "site-admin"
PASSWORD = "site-pass-1234"


def _cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        env=env,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"cxr-triage {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def arrival_order(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Patient by patient (their id order), each patient's films by follow-up number."""
    return sorted(rows, key=lambda r: (int(r["patient_id"]), Path(r["path"]).stem))


def split_by_patient(rows: list[dict[str, str]], share: float) -> tuple[list, list]:
    """The first patients holding about ``share`` of the films, and the rest."""
    cut = int(len(rows) * share)
    while 0 < cut < len(rows) and rows[cut]["patient_id"] == rows[cut - 1]["patient_id"]:
        cut += 1
    return rows[:cut], rows[cut:]


def stage(rows: list[dict[str, str]], folder: Path) -> None:
    """Drop films under accession-number names, each with its sidecar of header fields."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        stem = Path(r["path"]).stem
        sidecar = {"AccessionNumber": f"NIH-{stem}", "PatientID": f"NIH-P{r['patient_id']}"}
        (folder / f"NIH-{stem}.json").write_text(json.dumps(sidecar))  # before its image
        (folder / f"NIH-{stem}.jpg").write_bytes((NIH / r["path"]).read_bytes())


def rates(p: list[float], truth: list[bool], threshold: float) -> dict[str, float | None]:
    """Sensitivity and specificity of "abnormal if p >= threshold" (pipeline.monitoring.performance)."""
    from pipeline.monitoring.performance import at_threshold

    r = at_threshold(p, truth, threshold)
    return {
        "threshold": round(threshold, 4),
        "sensitivity": r["sensitivity"]["value"],
        "specificity": r["specificity"]["value"],
    }


def _wait_final(factory: Any, accessions: set[str], timeout_s: float = 900) -> None:
    from pipeline.models import Study

    deadline = time.monotonic() + timeout_s
    final = {"done", "failed", "rejected", "skipped"}
    while time.monotonic() < deadline:
        with factory() as session:
            rows = (
                session.query(Study.accession_number, Study.status)
                .filter(Study.accession_number.in_(list(accessions)))
                .all()
            )
        if len(rows) == len(accessions) and all(st in final for _, st in rows):
            return
        time.sleep(1.0)
    raise RuntimeError(f"{len(accessions)} studies not final within {timeout_s:.0f} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _screenshots(base: str, folder: Path) -> None:
    """The console's live numbers of this run, in Debian's headless Chromium (Playwright)."""
    import shutil

    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
        page.goto(base + "/login")
        page.fill("input[name=username]", ADMIN)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#worklist")
        for name, path, ready in (
            ("new-site-performance.png", "/admin/performance?days=7", "#overall"),
            ("new-site-models.png", "/admin/models", "#comparison"),
            ("new-site-policy.png", "/admin/policy", "#active"),
        ):
            page.goto(base + path)
            page.wait_for_selector(ready)
            page.screenshot(path=str(folder / name), full_page=True)
        browser.close()


def run(
    target: float,
    share: float,
    workdir: Path,
    epochs: int,
    epoch_size: int,
    screenshots: Path | None = None,
) -> dict[str, Any]:
    from pipeline.classifier.registry import comparison, start_shadow
    from pipeline.classifier.weights import describe_weights, ensure_weights
    from pipeline.db import make_engine, make_session_factory
    from pipeline.migrate import upgrade
    from pipeline.models import Study, User
    from pipeline.monitoring.performance import auc_delong
    from pipeline.settings import Settings
    from pipeline.triage.policy import active, save

    rows = arrival_order(list(csv.DictReader((NIH / "labels.csv").open())))
    first, later = split_by_patient(rows, share)
    data, incoming = workdir / "var", workdir / "incoming"
    incoming.mkdir()
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(data),
        "CXR_WATCH_DIR": str(incoming),
        "CXR_WATCH_SETTLE_MS": "300",
        "CXR_PORT": str(_free_port()),
        "CXR_REGISTRY_CHECK_S": "2",
    }
    for key in ("CXR_DATABASE_URL", "CXR_REDIS_URL"):
        env.pop(key, None)
    _cli(["users", "create", ADMIN, "--role", "admin", "--password-stdin"], env, PASSWORD + "\n")
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
        _wait_final(factory, {f"NIH-{Path(r['path']).stem}" for r in first})
        first_s = time.monotonic() - t0
        labels = workdir / "first-outcomes.csv"
        with labels.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["accession_number", "abnormal"])
            w.writerows(
                (f"NIH-{Path(r['path']).stem}", int(r["label"] == "abnormal")) for r in first
            )
        imported = json.loads(
            _cli(["labels", "import", str(labels), "--user", ADMIN, "--json"], env)
        )
        proposal = json.loads(
            _cli(["calibrate", "--json", "--target-sensitivity", str(target)], env)
        )
        with factory() as session:  # the admin's Apply on the console saves exactly this
            admin = session.query(User).filter_by(username=ADMIN).one()
            policy, _ = save(
                session, proposal["body"], admin.id, proposal["reason"], model["thresholds"]
            )
            session.commit()
        candidate = workdir / "candidate.pt"
        t1 = time.monotonic()
        _cli(
            [
                "train",
                "--from-db",
                "--epochs",
                str(epochs),
                "--epoch-size",
                str(epoch_size),
                "--lr",
                "5e-4",
                "--threads",
                "2",
                "--out",
                str(candidate),
            ],
            env,
        )
        train_s = time.monotonic() - t1
        reg = json.loads(
            _cli(
                [
                    "models",
                    "register",
                    str(candidate),
                    "--user",
                    ADMIN,
                    "--note",
                    "fine-tuned on the first part",
                    "--json",
                ],
                env,
            )
        )
        with factory() as session:  # the console's Shadow button
            admin = session.query(User).filter_by(username=ADMIN).one()
            start_shadow(session, reg["version"], admin.id, Path(settings.weights or ""))
            session.commit()
        time.sleep(2 * float(env["CXR_REGISTRY_CHECK_S"]))  # the workers see it between batches
        stage(later, incoming)
        _wait_final(factory, {f"NIH-{Path(r['path']).stem}" for r in later})
        outcomes = workdir / "later-outcomes.csv"  # the reads of the later part, as they come
        with outcomes.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["accession_number", "abnormal"])
            w.writerows(
                (f"NIH-{Path(r['path']).stem}", int(r["label"] == "abnormal")) for r in later
            )
        _cli(["labels", "import", str(outcomes), "--user", ADMIN, "--json"], env)
        with factory() as session:
            now_policy = active(session)
            shadow_doc = comparison(
                session, (now_policy.thresholds or {}).get("routine"), now_policy.temperature_scale
            )
        if screenshots is not None:
            _screenshots(f"http://127.0.0.1:{env['CXR_PORT']}", screenshots)
    finally:
        import signal

        os.killpg(system.pid, signal.SIGTERM)
        system.wait(timeout=60)
    truth = {f"NIH-{Path(r['path']).stem}": r["label"] == "abnormal" for r in later}
    with factory() as session:
        now = active(session)
        studies = [
            s
            for s in session.query(Study).filter(Study.accession_number.in_(list(truth)))
            if s.p_abnormal is not None
        ]
        p = [float(s.p_abnormal) for s in studies]  # type: ignore[arg-type]
        y = [truth[str(s.accession_number)] for s in studies]
        under = sorted({s.policy_version for s in studies if s.policy_version is not None})
        called = sum(s.triage_class != "normal" and truth[str(s.accession_number)] for s in studies)
    engine.dispose()
    assert now.thresholds is not None
    before = rates(p, y, model["thresholds"]["routine"])
    after = rates([now.p(x) for x in p], y, now.thresholds["routine"])
    later_csv = workdir / "later.csv"
    with later_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        w.writerows((str(NIH / r["path"]), r["label"], r["patient_id"]) for r in later)
    shipped_eval = json.loads(_cli(["evaluate", str(later_csv), "--json"], env))
    cand_eval = json.loads(
        _cli(["evaluate", str(later_csv), "--weights", str(candidate), "--json"], env)
    )
    return {
        "films": {
            "first": len(first),
            "later": len(later),
            "first_patients": len({r["patient_id"] for r in first}),
            "later_patients": len({r["patient_id"] for r in later}),
        },
        "first_part_seconds": round(first_s, 1),
        "labels_imported": imported.get("imported"),
        "calibration": {
            k: proposal[k]
            for k in (
                "reviewed",
                "abnormal",
                "normal",
                "temperature_scale",
                "thresholds",
                "expected",
                "waiting_changed",
            )
        },
        "policy_version": policy.version,
        "later_ranked_under_policy": under,
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
            "worklist_calls_agree": called == round((after["sensitivity"] or 0) * sum(y)),
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
