"""Metrics against hand-computed values, calibration, thresholds, and the evaluate command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pipeline.classifier.network import build_model, default_meta, save_weights
from pipeline.cli import main as cli
from pipeline.training import metrics as ev
from pipeline.training.evaluation import lung_mask

CLASSES = ["normal", "pneumonia", "covid19"]


def test_auc_by_hand() -> None:
    # Positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 + 2 of 4 -> 0.75.
    assert ev.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert ev.auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # a tie is half
    assert ev.auc(np.array([0.2, 0.9, 0.1]), np.array([0, 1, 0])) == pytest.approx(1.0)
    assert np.isnan(ev.auc(np.array([0.2, 0.3]), np.array([1, 1])))
    fpr, tpr = ev.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_sensitivity_specificity_at_a_threshold() -> None:
    scores, positive = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert ev.sensitivity_specificity(scores, positive, 0.35) == (1.0, 0.5)
    assert ev.sensitivity_specificity(scores, positive, 0.5) == (0.5, 1.0)


def test_confusion_matrix_and_per_class() -> None:
    cm = ev.confusion_matrix(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    pc = ev.per_class(cm, CLASSES)
    assert pc["normal"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["pneumonia"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert pc["covid19"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )


def test_expected_calibration_error_by_hand() -> None:
    # Bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: 0.6 vs 1.0 -> (0.8 + 0.8) / 4.
    conf, correct = np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1])
    assert ev.expected_calibration_error(conf, correct, bins=10) == pytest.approx(0.4)
    assert ev.expected_calibration_error(np.array([0.75, 0.75]), np.array([1, 0])) == pytest.approx(
        0.25
    )


def test_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.5, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in ev.softmax(base)])
    assert ev.fit_temperature(3.0 * base, labels) == pytest.approx(3.0, rel=0.1)


def test_thresholds_meet_the_sensitivity_target_and_are_ordered() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random(1000) < 0.4
    scores = np.clip(rng.normal(0.3 + 0.4 * positive, 0.15), 0, 1)
    t = ev.choose_thresholds(scores, positive, sensitivity=0.95)
    assert t["routine"] < t["urgent"] < t["critical"] < 1
    sens, _ = ev.sensitivity_specificity(scores, positive, t["routine"])
    assert sens >= 0.95
    assert ev.sensitivity_specificity(scores, positive, np.nextafter(t["routine"], 2))[0] < 0.95
    assert ev.sensitivity_specificity(scores, positive, t["urgent"])[1] >= 0.99
    assert ev.sensitivity_specificity(scores, positive, t["critical"])[1] >= 0.999


def test_summary_counts_unknown_labels_as_abnormal() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6], [0.6, 0.3, 0.1]])
    label_index = np.array([0, 1, 2, -1])  # the last one is, say, "effusion"
    abnormal = np.array([False, True, True, True])
    s = ev.summarize(probs, label_index, abnormal, CLASSES, threshold=0.5)  # p_abn .1 .8 .7 .4
    assert s["n"] == 4 and s["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert s["sensitivity_abnormal"] == pytest.approx(2 / 3) and s["specificity_abnormal"] == 1.0
    assert s["auc_abnormal"] == pytest.approx(1.0)
    assert s["per_class"]["pneumonia"]["support"] == 1


def test_lung_mask_is_two_fields_beside_the_mediastinum() -> None:
    m = lung_mask(100)
    assert m[40, 25] and m[40, 75] and not m[40, 50] and not m[5, 25] and not m[95, 75]
    assert 0.4 < m.mean() < 0.5


def test_evaluate_command_json_predictions_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        label = ("normal", "Pneumonia", "effusion")[i % 3]
        name = f"img{i}.png"
        PILImage.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / name)
        rows.append((name, label))
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_weights(build_model("resnet18", 3), default_meta() | {"input_size": 32}, weights)
    preds, report = tmp_path / "out" / "preds.csv", tmp_path / "report"
    argv = ["evaluate", str(table), "--weights", str(weights), "--json"]
    assert cli.main([*argv, "--predictions-out", str(preds), "--report", str(report)]) == 0
    stdout = capsys.readouterr().out
    assert len(stdout.splitlines()) == 1  # --json: exactly one line
    out = json.loads(stdout)
    assert out["n"] == 9 and set(out["per_class"]) == set(CLASSES)
    assert list(out["per_source"]) == [tmp_path.name] and out["per_source"][tmp_path.name]["n"] == 9
    assert {"auc_abnormal", "sensitivity_abnormal", "specificity_abnormal", "ece"} <= set(out)
    assert (
        out["per_class"]["normal"]["support"] == 3 and out["per_class"]["covid19"]["support"] == 0
    )
    with open(preds, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == ["path", "label", "abnormal", "p_abnormal", "predicted"]
    assert [r["abnormal"] for r in got[:3]] == ["0", "1", "1"] and got[2]["label"] == "effusion"
    assert all(0 <= float(r["p_abnormal"]) <= 1 and r["predicted"] in CLASSES for r in got)
    for png in ("confusion_matrix.png", "roc.png", "cam_grid.png"):
        assert PILImage.open(report / png).size[0] > 100
    capsys.readouterr()
    assert cli.main([*argv, "--record", "tiny-set"]) == 0
    recorded = torch.load(weights, weights_only=True)["meta"]["metrics"]["tiny-set"]
    assert recorded["n"] == 9 and recorded["labels"] == {"normal": 3, "Pneumonia": 3, "effusion": 3}
