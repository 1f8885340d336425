"""Training: data layouts, splits, loss goes down, saved weights reproduce, resume, CAM."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pipeline.classifier.network import Classifier, build_model
from pipeline.training import datasets as ds
from pipeline.training import train as tr
from pipeline.training.evaluate_run import upsample_cam
from pipeline.training.run import TrainConfig, fit, prepare, run

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr"
SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "cxr-resnet18.pt"


def blob_image(
    rng: np.random.Generator, size: int, blob: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """Dark noisy background; with blob=True a bright disc at a random place (returns its centre)."""
    img = rng.normal(60, 12, (size, size))
    r = size // 8
    cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
    if blob:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 230
    return np.clip(img, 0, 255).astype(np.uint8), (cy, cx)


def make_folder(root: Path, n: int = 12, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            img, _ = blob_image(rng, size, label == "PNEUMONIA")
            PILImage.fromarray(img).save(root / label / f"{label}-{i}.png")
    return root


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


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_a_few_steps_reduce_the_loss(amp: str) -> None:
    """float32, and bf16 mixed precision (the forward in bf16; weights stay float32)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs = np.stack([blob_image(rng, 32, i % 2 == 1)[0] for i in range(32)])
    labels = torch.tensor([i % 2 for i in range(32)])
    model = build_model("resnet18", 3).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.tile(np.arange(32), 4)
    losses = tr.train_epoch(
        model,
        opt,
        None,
        torch.from_numpy(imgs),
        labels,
        order,
        16,
        torch.Generator().manual_seed(0),
        (0.5, 0.25),
        augment_fn=lambda x, g, m: (x.float().div(255).unsqueeze(1), m),
        amp=amp,
    )
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_alt_images_replace_the_configured_share_of_each_batch(share: float) -> None:
    """--mix-lungs: each image comes from the other preprocessing with probability ``share``."""
    images = torch.zeros(64, 8, 8, dtype=torch.uint8)  # "thorax"
    alt = torch.full((64, 8, 8), 200, dtype=torch.uint8)  # the same films, "lungs"
    seen: list[torch.Tensor] = []

    def loss_fn(
        model: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, masks: torch.Tensor | None
    ) -> torch.Tensor:
        seen.append(x.detach().flatten(1).mean(1))
        return model(x).sum() * 0.0

    model = build_model("resnet18", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tr.train_epoch(
        model,
        opt,
        None,
        images,
        torch.zeros(64, dtype=torch.long),
        np.tile(np.arange(64), 4),
        32,
        torch.Generator().manual_seed(1),
        (0.5, 0.25),
        augment_fn=lambda x, g, m: (x.float().div(255).unsqueeze(1), m),
        loss_fn=loss_fn,
        alt_images=alt,
        alt_share=share,
    )
    means = torch.cat(seen)
    assert len(means) == 256
    from_alt = means > 0  # 0 -> (0 - 0.5) / 0.25 = -2; 200/255 -> about 1.1
    bright = (200 / 255 - 0.5) / 0.25
    assert bool(((means + 2.0).abs().lt(1e-4) | (means - bright).abs().lt(1e-4)).all())
    if share in (0.0, 1.0):
        assert int(from_alt.sum()) == int(share * 256)
    else:
        assert 90 <= int(from_alt.sum()) <= 166  # binomial(256, 0.5): mean 128, sd 8


def test_augment_keeps_shape_range_and_is_seeded() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 40, 40), dtype=np.uint8))
    a = tr.augment(x, torch.Generator().manual_seed(3))[0]
    b = tr.augment(x, torch.Generator().manual_seed(3))[0]
    assert a.shape == (4, 1, 40, 40) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    labels = np.array([0] * 90 + [1] * 10)
    counts = np.bincount(labels[tr.balanced_indices(labels, 2000, np.random.default_rng(0))])
    assert abs(counts[1] / 2000 - 0.5) < 0.05


def test_augment_moves_the_lung_masks_with_the_image() -> None:
    """The masks get the image's geometry; the images are the same as without masks."""
    masks = torch.zeros(6, 48, 48, dtype=torch.bool)
    masks[:, 10:38, 6:20] = True
    masks[:, 10:38, 28:42] = True
    x = masks.to(torch.uint8) * 255
    plain = tr.augment_sources(x, torch.Generator().manual_seed(5))[0]
    img, warped = tr.augment_sources(x, torch.Generator().manual_seed(5), masks)
    assert torch.equal(img, plain) and warped is not None and warped.shape == (6, 1, 48, 48)
    for i in range(6):  # the warped mask is where the warped bright image is
        inside, outside = img[i, 0][warped[i, 0] > 0.9], img[i, 0][warped[i, 0] < 0.1]
        assert float(inside.mean()) > float(outside.mean()) + 0.3
    assert not torch.equal(warped[0], warped[1])  # each film its own geometry


def test_cam_outside_lungs_is_the_share_of_evidence_outside() -> None:
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, :, :16] = 1.0  # the left half is lung
    cams = torch.zeros(4, 4, 4)
    cams[0, :, :2] = 1.0  # all inside
    cams[1, :, 2:] = -2.0  # all outside (either sign counts)
    cams[2, :, 1:3] = 1.0  # half and half
    got = tr.cam_outside_lungs(cams, masks)  # cams[3]: no evidence
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.5, 0.0]))


def test_cam_guide_trains_and_lowers_the_evidence_outside_the_lungs(tmp_path: Path) -> None:
    """--cam-guide: the lungs are found on the train images and the loss term is applied."""
    cfg = tiny_config(tmp_path, cam_guide=1.0, input_size=64, epochs=1)
    data = prepare(cfg)
    assert data.lung_masks is not None and data.lung_masks.shape == data.images["train"].shape
    assert data.lung_masks.dtype == torch.bool
    guided: list[float] = []
    real = tr.cam_outside_lungs

    def spy(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = real(cams, masks)
        guided.append(float(out.mean()))
        return out

    tr.cam_outside_lungs = spy  # type: ignore[assignment]
    try:
        fit(cfg, data)
    finally:
        tr.cam_outside_lungs = real  # type: ignore[assignment]
    found = int(data.lung_masks.flatten(1).any(1).sum())
    assert (len(guided) > 0) == (found > 0)
    assert all(0.0 <= g <= 1.0 for g in guided)
    _, meta = run(tiny_config(tmp_path, cam_guide=0.5, input_size=64, epochs=1))
    assert meta["training_data"]["config"]["cam_guide"] == 0.5


def tiny_config(tmp_path: Path, **kw: object) -> TrainConfig:
    folder = tmp_path / "data"
    if not folder.exists():
        make_folder(folder)
    base = {
        "data": [str(folder)],
        "out": str(tmp_path / "w.pt"),
        "input_size": 32,
        "epochs": 2,
        "batch_size": 8,
        "val_fraction": 0.25,
        "lr": 1e-3,
        "checkpoint": str(tmp_path / "c.ckpt"),
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_saved_weights_load_safely_and_reproduce_predictions(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    model, meta = run(cfg)
    blob = torch.load(cfg.out, weights_only=True)
    assert blob["meta"]["trained"] is True and blob["meta"]["input_size"] == 32
    t = blob["meta"]["thresholds"]
    assert 0 <= t["routine"] < t["urgent"] < t["critical"] <= 1
    assert blob["state_dict"]["fc.weight"].dtype == torch.float16
    images = prepare(cfg).images["val"]
    logits = tr.predict_logits(model, images, (cfg.mean, cfg.std))
    z0 = torch.from_numpy(logits[:, 0]) / meta["temperature"]
    p_abnormal = torch.sigmoid(z0).numpy()
    clf = Classifier(Path(cfg.out), device="cpu")
    got = clf.predict(images.numpy()).probabilities
    assert clf.classes == ["normal", "pneumonia", "covid19", "other"] == meta["classes"]
    assert meta["head"] == "abnormal" and meta["preprocess"] == "thorax"
    np.testing.assert_allclose(got[:, 0], 1 - p_abnormal, atol=1e-3)  # p(normal) = 1 - sigmoid
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # the findings share the rest
    assert got.shape[1] == 4 and clf.predict(images.numpy()).cams.shape[1:] == (2, 2)  # 32/16


def test_softmax_head_still_trains_and_scores(tmp_path: Path) -> None:
    """The legacy head (one softmax over the classes) and the whole-film resize."""
    cfg = tiny_config(
        tmp_path,
        head="softmax",
        preprocess="resize",
        layer4_stride=2,
        balance="class",
        augment="basic",
    )
    model, meta = run(cfg)
    images = prepare(cfg).images["val"]
    logits = tr.predict_logits(model, images, (cfg.mean, cfg.std))
    expected = torch.softmax(torch.from_numpy(logits) / meta["temperature"], 1).numpy()
    got = Classifier(Path(cfg.out), device="cpu").predict(images.numpy()).probabilities
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_resume_continues_as_if_never_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, checkpoint=str(tmp_path / "a.ckpt"))
    data = prepare(cfg)
    whole, _ = fit(cfg, data)
    real_epoch, calls = tr.train_epoch, []

    def stop_in_second_epoch(*args: object, **kw: object) -> list[float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kw)  # type: ignore[arg-type]

    cfg2 = tiny_config(tmp_path, checkpoint=str(tmp_path / "b.ckpt"))
    monkeypatch.setattr(tr, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg2, data)
    monkeypatch.setattr(tr, "train_epoch", real_epoch)
    cfg2.resume = True
    resumed, history = fit(cfg2, data)
    assert [h["epoch"] for h in history] == [1, 2]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_cam_peak_falls_inside_the_blob(tmp_path: Path) -> None:
    """Train on blob/no-blob images; the shipped Classifier's CAM must point at the blob."""
    from pipeline.classifier.network import default_meta, save_weights

    size, rng = 96, np.random.default_rng(1)
    imgs = np.stack([blob_image(rng, size, i % 2 == 1)[0] for i in range(64)])
    labels = torch.tensor([i % 2 for i in range(64)])
    torch.manual_seed(0)
    model = build_model("resnet18", 2).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(64), 3))
    tr.train_epoch(
        model,
        opt,
        None,
        torch.from_numpy(imgs),
        labels,
        order,
        16,
        torch.Generator(),
        (0.5, 0.25),
        augment_fn=lambda x, g, m: (x.float().div(255).unsqueeze(1), m),
    )
    meta = default_meta() | {"classes": ["normal", "blob"], "input_size": size}
    save_weights(model, meta, tmp_path / "blob.pt")
    clf = Classifier(tmp_path / "blob.pt", device="cpu")
    tests = [blob_image(rng, size, True) for _ in range(16)]
    out = clf.predict(np.stack([t[0] for t in tests]))
    assert (out.cam_index == 1).mean() >= 0.9
    cell, radius = size / out.cams.shape[1], size // 8
    yy, xx = np.mgrid[:size, :size]
    hits = inside_hotter = 0
    for (_, (cy, cx)), cam in zip(tests, out.cams, strict=True):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        # The CAM's resolution is one layer4 cell: its peak is "in the blob" when that cell
        # overlaps the blob.
        r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
        peak_cell = np.zeros_like(disc)
        peak_cell[int(r * cell) : int((r + 1) * cell), int(c * cell) : int((c + 1) * cell)] = True
        hits += bool((disc & peak_cell).any())
        up = upsample_cam(cam.astype(np.float32), size)  # as the overlay renders it
        inside_hotter += bool(up[disc].mean() > up[~disc].mean())
    assert hits / len(tests) >= 0.8
    assert inside_hotter / len(tests) >= 0.9


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


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights yet")
def test_shipped_weights_are_trained_and_ordered() -> None:
    meta = torch.load(SHIPPED, weights_only=True)["meta"]
    t = meta["thresholds"]
    assert meta["trained"] is True and t["routine"] < t["urgent"] < t["critical"]
    assert meta["metrics"]["validation"]["sensitivity_abnormal"] >= 0.95
    # The model card's numbers are the file's own: recorded by `evaluate --record`.
    assert {"paediatric_test", "adult_holdout", "nih_holdout", "loso"} <= set(meta["metrics"])
    assert meta["metrics"]["adult_holdout"]["n"] == 1006
    # Leave-one-source-out, the headline: a model per held-out source, scored on all of it.
    loso = meta["metrics"]["loso"]
    assert sorted(loso["sources"]) == [
        "covid19-radiography",
        "kaggle-pneumonia",
        "nih-cxr14-sample",
    ]
    assert [v["n"] for v in loso["sources"].values()] == [5400, 5840, 904]
    aucs = [v["auc_abnormal"] for v in loso["sources"].values()]
    assert loso["worst_auc"] == min(aucs) and abs(loso["mean_auc"] - sum(aucs) / 3) < 1e-9
    assert set(meta["training_data"]["sources"]) == set(loso["sources"])  # the final sees all


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights yet")
def test_shipped_model_reads_the_thorax_at_128_px_and_maps_an_8x8_cam() -> None:
    from pipeline.classifier.network import Classifier

    clf = Classifier(SHIPPED, "cpu", 1)
    assert clf.input_size == 128 and clf.trained and clf.preprocess == "thorax"
    assert clf.head == "abnormal" and clf.classes == ["normal", "pneumonia", "covid19", "other"]
    x = np.random.default_rng(0).integers(0, 256, (3, 128, 128), dtype=np.uint8)
    out = clf.predict(x)
    assert out.cams.shape == (3, 8, 8) and out.cams.dtype == np.float16
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)
