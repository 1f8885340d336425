"""Training data: folder and CSV layouts, label maps, splits that never share a patient."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.training import datasets as ds
from tests.training.blobs import make_folder

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr"


def test_folder_and_csv_layouts_map_labels(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "f", n=3)
    samples = ds.read_dataset(folder)
    assert sorted({s.label for s in samples}) == ["NORMAL", "PNEUMONIA"]
    lmap = ds.parse_label_map("Opacity=pneumonia")
    classes = ["normal", "pneumonia", "covid19"]
    assert [ds.map_label(x, lmap, classes) for x in ("NORMAL", "opacity", "COVID-19", "cat")] == [
        "normal",
        "pneumonia",
        "covid19",
        None,
    ]
    table = tmp_path / "sub" / "labels.csv"
    table.parent.mkdir()
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        w.writerow(["../f/NORMAL/NORMAL-0.png", "normal", "p1"])
        w.writerow(["../f/PNEUMONIA/PNEUMONIA-0.png", "Pneumonia", "p1"])
    rows = ds.read_dataset(table)
    assert rows[0].path.resolve() == (folder / "NORMAL" / "NORMAL-0.png").resolve()
    assert [r.group for r in rows] == ["p1", "p1"]
    assert ds.load_one(rows[1].path, 32).shape == (32, 32)


def test_split_groups_patients_and_keeps_test_rows() -> None:
    samples = [
        ds.Sample(Path(f"{i}.png"), "normal", "a", f"{i}.png", f"patient{i // 3}", "train")
        for i in range(300)
    ] + [ds.Sample(Path("t.png"), "normal", "a", "t.png", "pt", "test")]
    splits = ds.assign_split(samples, val_fraction=0.2, holdout_fraction=0.5, seed=1)
    assert splits[-1] == "test" and splits.count("test") == 1  # the source has its own test rows
    by_patient: dict[str, set[str]] = {}
    for s, sp in zip(samples, splits, strict=True):
        by_patient.setdefault(s.group, set()).add(sp)
    assert all(len(v) == 1 for v in by_patient.values())
    assert 0.1 < splits.count("val") / 300 < 0.3
    other = [ds.Sample(Path(f"{i}"), "x", "b", f"{i}", f"{i}", "") for i in range(400)]
    held = ds.assign_split(other, 0.1, 0.2, seed=0).count("test") / 400
    assert 0.14 < held < 0.26


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")
def test_real_kaggle_split_never_shares_a_patient() -> None:
    samples = ds.read_dataset(SHARED_DATA / "kaggle-pneumonia" / "labels.csv")
    splits = ds.assign_split(samples, 0.1, 0.2, seed=0)
    seen: dict[str, set[str]] = {}
    for s, sp in zip(samples, splits, strict=True):
        seen.setdefault(s.group, set()).add(sp)
    train_val = [v - {"test"} for v in seen.values()]
    assert all(len(v) <= 1 for v in train_val)
    assert splits.count("test") == 624
