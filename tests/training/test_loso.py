"""Leave-one-source-out: which sources train, which one is scored, and the headline numbers.

Three tiny generated sources, labelled the three ways the real ones are (a folder per class with
PNEUMONIA; a CSV with covid19; a CSV with "abnormal" and a finding column).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pipeline.training import datasets as ds
from pipeline.training import train as tr
from pipeline.training.config import TrainConfig
from pipeline.training.loso import summarise
from pipeline.training.prepare import prepare, select_sources, target_class
from tests.training.blobs import blob_image

REPO = Path(__file__).resolve().parents[2]


def make_sources(root: Path, n: int = 10, size: int = 40) -> list[Path]:
    """Three sources; abnormal films carry a bright blob, and each source its own exposure."""
    rng = np.random.default_rng(0)
    out = []
    layouts = {
        "peds": ("NORMAL", "PNEUMONIA"),
        "adults": ("normal", "covid19"),
        "hospital": ("normal", "abnormal"),
    }
    for k, (name, (neg, pos)) in enumerate(layouts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        rows = []
        for i in range(2 * n):
            label = pos if i % 2 else neg
            img, _ = blob_image(rng, size, bool(i % 2))
            img = np.clip(img.astype(int) + 25 * k, 0, 255).astype(np.uint8)
            rel = f"{label}/{i}.png"
            (folder / label).mkdir(exist_ok=True)
            PILImage.fromarray(img).save(folder / rel)
            rows.append((rel, label, f"p{i // 2}", "Effusion" if label == "abnormal" else ""))
        if name == "peds":
            out.append(folder)  # a folder per class
            continue
        table = folder / "labels.csv"
        with open(table, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "patient_id", "finding"])
            w.writerows(rows)
        out.append(table)
    return out


def test_holdout_source_is_out_of_training_and_validation(tmp_path: Path) -> None:
    data = make_sources(tmp_path)
    samples = ds.read_datasets(data)
    kept, held = select_sources(samples, "hospital")
    assert {s.source for s in kept} == {"peds", "adults"} and {s.source for s in held} == {
        "hospital"
    }
    assert len(held) == 20 and len(kept) == 40
    cfg = TrainConfig(
        data=[str(p) for p in data],
        out=str(tmp_path / "w.pt"),
        input_size=32,
        holdout_source="adults",
        val_fraction=0.3,
    )
    prep = prepare(cfg)
    assert prep.source_names == ["hospital", "peds"]
    assert set(prep.counts) == {"hospital", "peds"}
    assert len(prep.holdout) == 20 and {s.source for s in prep.holdout} == {"adults"}
    n = len(prep.labels["train"]) + len(prep.labels["val"])
    in_distribution_test = ds.assign_split(kept, 0.3, 0.2, 0).count("test")
    assert n + in_distribution_test == 40  # the rest of the two sources is their own test set
    with pytest.raises(ds.DatasetError, match="no source named 'nowhere'"):
        select_sources(samples, "nowhere")
    with pytest.raises(ds.DatasetError, match="at least two sources"):
        select_sources([s for s in samples if s.source == "peds"], "peds")


def test_labels_become_abnormal_or_normal_with_a_finding_where_known(tmp_path: Path) -> None:
    cfg = TrainConfig(data=[], out="")
    lmap = ds.parse_label_map(None)
    labels = ["NORMAL", "PNEUMONIA", "covid19", "abnormal", "Normal", "lateral"]
    got = [target_class(ds.Sample(Path("x"), lab, "s", "x", "x", ""), lmap, cfg) for lab in labels]
    assert got == ["normal", "pneumonia", "covid19", "other", "normal", None]
    assert cfg.model_classes == ["normal", "pneumonia", "covid19", "other"]
    prep = prepare(
        TrainConfig(data=[str(p) for p in make_sources(tmp_path)], out="", input_size=32)
    )
    # abnormal is 1 exactly where the class is not normal
    for subset in ("train", "val"):
        assert torch.equal(prep.abnormal[subset] > 0.5, prep.labels[subset] != 0)


def test_sampling_balances_source_by_label() -> None:
    sources = np.array([0] * 700 + [1] * 250 + [2] * 50)
    abnormal = np.array([i % 5 == 0 for i in range(1000)], dtype=int)  # 20 % abnormal
    cells = sources * 2 + abnormal
    drawn = cells[tr.balanced_indices(cells, 6000, np.random.default_rng(0))]
    counts = np.bincount(drawn, minlength=6) / 6000
    assert np.allclose(counts, 1 / 6, atol=0.02)  # each source x label cell a sixth


def test_summary_mean_and_worst() -> None:
    def result(auc: float) -> dict:
        return {"n": 10, "auc_abnormal": auc, "labels": {}, "cam": {"peak_in_lung_fields": 0.5}}

    s = summarise({"a": result(0.9), "b": result(0.6), "c": result(0.75), "d": result(math.nan)})
    assert s["mean_auc"] == pytest.approx(0.75) and s["worst_auc"] == 0.6
    assert s["worst_source"] == "b" and list(s["sources"]) == ["a", "b", "c", "d"]


def test_loso_command_trains_one_model_per_source_and_records_the_summary(tmp_path: Path) -> None:
    data = make_sources(tmp_path / "data", n=8, size=32)
    out_dir, final = tmp_path / "loso", tmp_path / "final.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli.main",
            "loso",
            *map(str, data),
            "--input-size",
            "32",
            "--epochs",
            "1",
            "--epoch-size",
            "16",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.3",
            "--out-dir",
            str(out_dir),
            "--final",
            str(final),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "CXR_DATA_DIR": str(tmp_path / "var")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # --json: exactly one line
    summary = json.loads(lines[0])
    assert sorted(summary["sources"]) == ["adults", "hospital", "peds"]
    aucs = {k: v["auc_abnormal"] for k, v in summary["sources"].items()}
    assert summary["worst_auc"] == min(aucs.values())
    assert summary["mean_auc"] == pytest.approx(sum(aucs.values()) / 3, abs=1e-5)
    assert all(v["n"] == 16 for v in summary["sources"].values())  # every image of the source
    for name in aucs:
        meta = torch.load(out_dir / f"holdout-{name}.pt", weights_only=True)["meta"]
        assert meta["training_data"]["held_out_source"] == name
        assert name not in meta["training_data"]["sources"]  # never trained or validated on
        assert meta["metrics"]["held_out_source"]["auc_abnormal"] == pytest.approx(
            aucs[name], abs=1e-5
        )
    assert (
        json.loads((out_dir / "loso.json").read_text())["worst_source"] == summary["worst_source"]
    )
    meta = torch.load(final, weights_only=True)["meta"]
    assert set(meta["training_data"]["sources"]) == {"adults", "hospital", "peds"}
    assert meta["metrics"]["loso"]["worst_auc"] == pytest.approx(summary["worst_auc"], abs=1e-5)


def test_evaluate_reports_each_source_and_a_source_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sources that differ by exposure: the probe on a whole-film model's features sees it."""
    from pipeline.classifier.network import build_model, default_meta, save_weights
    from pipeline.cli import main as cli

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    data = make_sources(tmp_path / "data", n=30, size=32)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_weights(build_model("resnet18", 3), default_meta() | {"input_size": 32}, weights)
    argv = ["evaluate", *map(str, data), "--weights", str(weights), "--json", "--source-probe"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["per_source"]) == ["adults", "hospital", "peds"]
    assert all(v["n"] == 60 for v in out["per_source"].values())
    probe = out["source_probe"]
    assert probe["chance"] == pytest.approx(1 / 3, abs=1e-5) and probe["n_test"] == 180 - int(
        0.7 * 180
    )
    assert probe["accuracy"] >= 0.8  # exposure tells these sources apart in the features
