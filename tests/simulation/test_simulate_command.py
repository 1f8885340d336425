"""The ``cxr-triage simulate`` command: synthetic, from a predictions file, from the database."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image as PILImage

from pipeline.classifier.network import DEFAULT_THRESHOLDS
from pipeline.cli.main import build_parser
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Study
from pipeline.settings import Settings
from pipeline.simulation import simulate as sim

THR = dict(DEFAULT_THRESHOLDS)


def run_simulate(
    argv: list[str], settings_: Settings, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run ``cxr-triage simulate ARGV``; return its exit code and output (stdout, then stderr)."""
    args = build_parser().parse_args(["simulate", *argv])
    rc = args.handler(args, settings_)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


SMALL = ["--days", "4", "--warmup-days", "1", "--volume", "60", "--cap-hours", "30"]


def test_simulate_synthetic_json_and_plot(bare_settings, tmp_path, capsys) -> None:
    png = tmp_path / "delays.png"
    rc, out = run_simulate(
        ["--synthetic", "--json", "--plot", str(png), *SMALL], bare_settings, capsys
    )
    assert rc == 0
    doc = json.loads(out)
    for name in ("fifo", "priority", "priority_capped"):
        for group in ("abnormal", "normal"):
            assert set(doc[name][group]) >= {"mean_h", "median_h", "p95_h", "max_h"}
    assert doc["counted_studies"] == 240 and doc["model"]["groups"] == "ground truth"
    assert doc["priority"]["abnormal"]["mean_h"] < doc["fifo"]["abnormal"]["mean_h"]
    assert doc["fifo_meets_cap"] is True
    assert doc["priority_capped"]["normal"]["max_h"] <= 30.0
    assert PILImage.open(io.BytesIO(png.read_bytes())).size == (1040, 384)
    # The oracle (abnormal first, knowing which are) bounds every order's abnormal mean wait.
    oracle = doc["oracle"]["abnormal"]["mean_h"]
    for name in ("fifo", "priority", "priority_capped", "priority_ageing", "oracle_capped"):
        assert oracle <= doc[name]["abnormal"]["mean_h"] + 1e-9, name
    share = doc["achieved_share"]
    assert set(share) == {"priority", "priority_capped", "priority_ageing"}
    fifo, prio = doc["fifo"]["abnormal"]["mean_h"], doc["priority"]["abnormal"]["mean_h"]
    assert share["priority"] == round((fifo - prio) / (fifo - oracle), 3)
    assert 0.0 < share["priority_capped"] <= share["priority"] <= 1.0


def test_a_perfect_model_delivers_all_the_oracle_can(bare_settings, capsys) -> None:
    scenario = sim.Scenario(days=4, warmup_days=1, volume=60, capacity=60, cap_h=30.0)
    p = np.array([0.95, 0.05] * 50)
    truth = p > 0.5
    doc, _ = sim.run_experiment(scenario, p, truth, THR)
    assert doc["oracle"]["abnormal"] == doc["priority"]["abnormal"]
    assert doc["oracle_capped"]["abnormal"] == doc["priority_capped"]["abnormal"]
    assert doc["achieved_share"]["priority"] == 1.0
    rc, out = run_simulate(["--synthetic", *SMALL], bare_settings, capsys)
    assert rc == 0 and "oracle_capped" in out and "% of the oracle's cut" in out


def test_simulate_reads_an_evaluate_predictions_file(bare_settings, tmp_path, capsys) -> None:
    csv = tmp_path / "preds.csv"
    rows = ["path,label,abnormal,p_abnormal,predicted"]
    rows += [f"a{i}.jpg,pneumonia,1,{0.5 + i / 40:.3f},pneumonia" for i in range(20)]
    rows += [f"n{i}.jpg,normal,0,{i / 50:.3f},normal" for i in range(19)] + [
        "nx.jpg,normal,0,0.9,pneumonia"
    ]
    csv.write_text("\n".join(rows) + "\n")
    rc, out = run_simulate(["--predictions", str(csv), "--json", *SMALL], bare_settings, capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["model"]["source"] == "predictions" and doc["model"]["pool_size"] == 40
    assert doc["sensitivity"] == 1.0 and 0.85 < doc["specificity"] < 1.0
    rc, out = run_simulate(
        ["--predictions", str(csv), "--prevalence", "0.1", "--json", *SMALL], bare_settings, capsys
    )
    assert abs(json.loads(out)["prevalence"] - 0.1) < 0.05
    (tmp_path / "bad.csv").write_text("path,p\nx,1\n")
    rc, out = run_simulate(["--predictions", str(tmp_path / "bad.csv")], bare_settings, capsys)
    assert rc == 2 and "missing columns abnormal, p_abnormal" in out


def test_simulate_from_db_groups_by_prediction_or_joined_labels(
    bare_settings, tmp_path, capsys
) -> None:
    rc, out = run_simulate(["--from-db"], bare_settings, capsys)
    assert rc == 2 and "no scored studies" in out
    upgrade(bare_settings.db_url)
    factory = make_session_factory(make_engine(bare_settings.db_url))
    with factory() as session:
        for i, p in enumerate([0.05, 0.2, 0.6, 0.95]):
            session.add(Study(accession_number=f"ACC{i}", status="done", p_abnormal=p))
        session.commit()
    rc, out = run_simulate(["--from-db", "--json", *SMALL], bare_settings, capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["model"]["groups"].startswith("predicted class")
    assert doc["sensitivity"] is None and abs(doc["prevalence"] - 0.5) < 0.15
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,abnormal\nACC0,0\nACC1,1\nACC2,1\nACC3,1\n")
    rc, out = run_simulate(
        ["--from-db", "--labels", str(labels), "--json", *SMALL], bare_settings, capsys
    )
    doc = json.loads(out)
    assert doc["model"]["groups"] == "ground truth" and 0.6 < doc["sensitivity"] < 0.75


def test_simulate_table_output(bare_settings, capsys) -> None:
    rc, out = run_simulate(SMALL, bare_settings, capsys)
    assert rc == 0
    assert re.search(r"^fifo\s+\|", out, re.M) and re.search(r"^priority_capped\s+\|", out, re.M)
    assert "sensitivity 0.9" in out and "groups: ground truth" in out
