"""bench/loso_grid.py: the packed copy holds the films, and the grid's cells make LOSO summaries.

Three tiny generated sources, each a folder with a labels.csv, as the real ones are laid out.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from bench.loso_grid import merge, pack, unpack
from tests.training.blobs import blob_image

REPO = Path(__file__).resolve().parents[2]
NAMES = ("adults", "hospital", "peds")


def make_root(root: Path, n: int = 12, size: int = 48) -> None:
    rng = np.random.default_rng(1)
    for k, name in enumerate(NAMES):
        folder = root / name
        rows = []
        for i in range(2 * n):
            label = "abnormal" if i % 2 else "normal"
            img, _ = blob_image(rng, size, bool(i % 2))
            img = np.clip(img.astype(int) + 20 * k, 0, 255).astype(np.uint8)
            rel = f"{label}/{i}.jpg"
            (folder / label).mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(img).save(folder / rel, quality=95)
            rows.append((rel, label, f"p{i // 2}"))
        with open(folder / "labels.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "patient_id"])
            w.writerows(rows)


def test_pack_and_unpack_keep_every_film_and_its_pixels(tmp_path: Path) -> None:
    make_root(tmp_path / "data")
    size = pack(tmp_path / "data", tmp_path / "pack", 2, NAMES)
    parts = sorted((tmp_path / "pack").iterdir())
    assert [p.name for p in parts] == ["part-0", "part-1"]
    counts = [len(list(p.rglob("*.webp"))) for p in parts]
    assert counts == [36, 36] and size == sum(
        f.stat().st_size for f in (tmp_path / "pack").rglob("*.webp")
    )
    assert unpack(parts, tmp_path / "back") == 72
    for name in NAMES:
        original = (tmp_path / "data" / name / "labels.csv").read_text()
        assert (tmp_path / "back" / name / "labels.csv").read_text() == original
        for row in csv.DictReader(original.splitlines()):
            a = np.asarray(
                PILImage.open(tmp_path / "data" / name / row["path"]).convert("L"), float
            )
            back = PILImage.open(tmp_path / "back" / name / row["path"])
            assert back.format == "PNG" and back.size == (48, 48)  # under 160 px: not resized
            b = np.asarray(back, float)
            assert np.abs(a - b).mean() < 3.0  # WebP quality 90 of a 0-255 film


def test_merge_gives_mean_and_worst_only_when_every_cell_finished() -> None:
    cells = {"peds": {"auc_abnormal": 0.8}, "adults": {"auc_abnormal": 0.6}}
    part = merge(cells, NAMES)
    assert part["cells"] == 2 and part["mean_auc"] is None and part["worst_auc"] is None
    full = merge({**cells, "hospital": {"auc_abnormal": 0.7}}, NAMES)
    assert (
        abs(full["mean_auc"] - 0.7) < 1e-12
        and full["worst_auc"] == 0.6
        and full["worst_source"] == "adults"
    )
    failed = merge({**cells, "hospital": {"auc_abnormal": None, "rc": 1}}, NAMES)
    assert failed["mean_auc"] is None and failed["cells"] == 3


def test_grid_runs_each_cell_as_its_own_loso_and_merges_them(tmp_path: Path) -> None:
    make_root(tmp_path / "data")
    out = tmp_path / "grid"
    tiny = "--epochs 1 --epoch-size 16 --input-size 32 --batch-size 8 --val-fraction 0.3"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loso_grid",
            str(tmp_path / "data"),
            str(out),
            "--sources",
            ",".join(NAMES),
            "--parallel",
            "3",
            "--recipe",
            f"tiny={tiny}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = json.loads((out / "grid.json").read_text())
    row = grid["recipes"]["tiny"]
    assert row["flags"] == tiny and row["cells"] == 3
    assert sorted(row["sources"]) == list(NAMES)
    aucs = [row["sources"][n]["auc_abnormal"] for n in NAMES]
    assert all(0.0 <= a <= 1.0 for a in aucs)
    assert abs(row["mean_auc"] - sum(aucs) / 3) < 1e-9 and row["worst_auc"] == min(aucs)
    for name in NAMES:  # each cell: its own held-out model, scored on every film of its source
        assert row["sources"][name]["n"] == 24
        assert (out / "tiny" / name / f"holdout-{name}.pt").is_file()
