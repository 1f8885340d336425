"""The new-site bench's steps: the CLI as a department runs it, films and outcomes, the pages."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NIH = REPO.parent / "shared" / "data" / "cxr" / "nih-cxr14-sample"
ADMIN = "site-admin"
PASSWORD = "site-pass-1234"


def accession(row: dict[str, str]) -> str:
    """The accession number a film of the sample is sent under."""
    return f"NIH-{Path(row['path']).stem}"


def write_outcomes(path: Path, rows: list[dict[str, str]]) -> Path:
    """The films' outcomes as the RIS sends them (``labels import``)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession_number", "abnormal"])
        w.writerows((accession(r), int(r["label"] == "abnormal")) for r in rows)
    return path


def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    """One ``cxr-triage`` command in its own process; its standard output."""
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


def wait_final(factory: Any, accessions: set[str], timeout_s: float = 900) -> None:
    """Wait until every study of these accession numbers is stored and final."""
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


def free_port() -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def screenshots(base: str, folder: Path) -> None:
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


def later_scores(factory: Any, truth: dict[str, bool]) -> dict[str, Any]:
    """The later part as the worklist ranked it: scores, truth, policy versions, calls."""
    from pipeline.models import Study
    from pipeline.triage.policy import active

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
    return {"policy": now, "p": p, "y": y, "under": under, "called": called}


def evaluations(
    later: list[dict[str, str]], workdir: Path, env: dict[str, str], candidate: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate`` of the shipped model and of the candidate on the later part."""
    later_csv = workdir / "later.csv"
    with later_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        w.writerows((str(NIH / r["path"]), r["label"], r["patient_id"]) for r in later)
    shipped = json.loads(cli(["evaluate", str(later_csv), "--json"], env))
    cand = json.loads(cli(["evaluate", str(later_csv), "--weights", str(candidate), "--json"], env))
    return shipped, cand
