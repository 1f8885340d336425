"""Every ``--json`` command prints exactly one line on stdout, whatever it starts."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from pipeline.cli.main import build_parser
from pipeline.settings import Settings
from tests.conftest import chest_like, dicom_bytes, png_bytes, run_cli

# Commands with --json that this file runs, and those too long for the suite (each has its
# own one-line check where it is tested, or is run by `make bench` / `make reliability`).
RUN_HERE = {"ingest", "worklist", "simulate", "bench-ingest", "send-results"}
TOO_LONG = {
    "evaluate": "needs a labelled data set and a model; tests/training/test_evaluate.py",
    "loso": "trains one model per source",
    "bench": "measures the model and the pipeline for minutes",
    "reliability": "starts whole systems for minutes; tests/system/test_reliability.py",
    "pull": "needs a PACS: tests/ingest/test_pull.py holds it to one line against Orthanc, and when down",
    "calibrate": "needs reviewed studies: tests/monitoring/test_calibrate.py, with a proposal and without",
    "drift-reference": "runs the model on labelled films: tests/monitoring/test_drift.py",
}


def one_json_line(proc: subprocess.CompletedProcess) -> dict:
    """The single JSON document on stdout; fails when stdout has any other line."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stdout:\n{proc.stdout[:3000]}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


def json_commands() -> set[str]:
    """Sub-commands of ``cxr-triage`` that take ``--json``."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name
        for name, p in sub.choices.items()
        if any("--json" in a.option_strings for a in p._actions)
    }


def test_every_json_command_is_held_to_one_line() -> None:
    assert json_commands() == RUN_HERE | set(TOO_LONG)


def test_ingest_worklist_and_requeue_print_one_line(tmp_path: Path, settings: Settings) -> None:
    """`ingest --wait --json` with no system running starts a private Redis and workers:
    their banners and logs stay off stdout."""
    alone = settings.with_(redis_url=None, worker_processes=1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(chest_like(seed=21)))
    (folder / "b.dcm").write_bytes(dicom_bytes(chest_like(seed=22)))
    waited = one_json_line(run_cli(["ingest", str(folder), "--wait", "--json"], alone))
    assert (waited["accepted"], waited["done"]) == (2, 2)
    assert (alone.data_dir / "ingest-workers.log").read_text().count(" ready.") == 1

    # Nothing running, no --wait: the study stays queued and the note goes to stderr.
    later = tmp_path / "later"
    later.mkdir()
    (later / "c.png").write_bytes(png_bytes(chest_like(seed=23)))
    proc = run_cli(["ingest", str(later), "--json"], alone)
    queued = one_json_line(proc)
    assert [s["status"] for s in queued["studies"]] == ["queued"]
    assert "no system is running" in proc.stderr

    worklist = one_json_line(run_cli(["worklist", "--json"], alone))
    assert sorted(s["status"] for s in worklist["studies"]) == ["done", "done", "queued"]

    # requeue-stuck always answers in JSON, one line per pass.
    requeued = one_json_line(run_cli(["requeue-stuck", "--older-than", "0"], settings))
    assert requeued["requeued"] == 1, requeued


def test_simulate_prints_one_line(settings: Settings) -> None:
    doc = one_json_line(
        run_cli(["simulate", "--json", "--days", "2", "--warmup-days", "1"], settings)
    )
    assert doc["scenario"]["days"] == 2


def test_bench_ingest_prints_one_line(settings: Settings) -> None:
    doc = one_json_line(run_cli(["bench-ingest", "--n", "2", "--json"], settings))
    assert doc["n"] == 2


def test_ingest_json_gives_the_reason_of_every_study_not_done(
    tmp_path: Path, settings: Settings
) -> None:
    """A lateral view is skipped and a corrupt file rejected: each entry says why, in the
    worklist's words; a queued study has no reason."""
    alone = settings.with_(redis_url=None)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "frontal.dcm").write_bytes(dicom_bytes(chest_like(seed=31)))
    (folder / "lateral.dcm").write_bytes(dicom_bytes(chest_like(seed=32), view="LL"))
    (folder / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    doc = one_json_line(run_cli(["ingest", str(folder), "--json"], alone))
    by_name = {Path(s["path"]).name: s for s in doc["studies"]}
    assert {n: s["status"] for n, s in by_name.items()} == {
        "frontal.dcm": "queued",
        "lateral.dcm": "skipped",
        "corrupt.dcm": "rejected",
    }
    assert by_name["frontal.dcm"]["reason"] is None
    assert "lateral view (LL)" in by_name["lateral.dcm"]["reason"]
    assert "DICOM" in by_name["corrupt.dcm"]["reason"]
    assert by_name["corrupt.dcm"]["reason"] == doc["rejected"][0]["reason"]

    shown = one_json_line(run_cli(["worklist", "--json"], alone))
    reasons = {s["id"]: s["reason"] for s in shown["studies"]}
    assert {s["id"]: s["reason"] for s in doc["studies"]} == reasons


def test_send_results_once_prints_one_line(settings: Settings) -> None:
    """One sender pass with a PACS in the environment that is not there: one JSON line."""
    env = settings.with_(pacs_destinations="dicom://NOBODY@127.0.0.1:9")
    doc = one_json_line(run_cli(["send-results", "--once", "--json"], env))
    assert doc == {"queued": {"studies": 0, "alerts": 0, "outbox": 0}, "sent": {}}
